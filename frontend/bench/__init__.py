"""``pagedserve bench``: the benchmarks as packaged commands with ``vllm bench``'s flag names.

Modules: ``cli`` (the ``bench`` command and its subcommands), ``datasets`` (the seeded token-id
workloads), ``throughput`` and ``latency`` (offline, through the LLM API), ``serve`` (a load
generator for a running OpenAI-compatible server) with ``serve_report`` (its metrics, table and
JSON record) and ``server_probe`` (the server's own histograms and CPU use), and ``record``
(what every JSON result records about the run). The repository's benchmarks/*.py scripts are
thin wrappers over these.
"""
