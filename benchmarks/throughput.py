"""Offline throughput on the shared workload (../shared/bench): 256 token-id prompts, U[100,1024] in
and out, ignore_eos, temperature 0.6, random weights of a real shape.

    python benchmarks/throughput.py --model llama3-8b --out benchmarks/results/throughput_llama3-8b_h200.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, make_workload, resolve_preset, write_result
from frontend import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama3-8b", help="preset name or model path")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed runs of the workload in one engine; the median is reported",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    llm = LLM(
        model=resolve_preset(args.model),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager,
    )
    ready_s = time.perf_counter() - start
    prompts, out_lens = make_workload(n=args.num_prompts)
    params = [
        SamplingParams(temperature=args.temperature, max_tokens=n, ignore_eos=True, seed=i)
        for i, n in enumerate(out_lens)
    ]
    # Warm-up: a few short requests so first-call costs (kernel compilation) are not timed.
    llm.generate(
        prompts[:8],
        SamplingParams(temperature=args.temperature, max_tokens=16, ignore_eos=True),
        use_tqdm=False,
    )
    runs_s = []
    for _ in range(args.repeats):
        llm.reset_prefix_cache()  # a repeat must prefill its prompts again, not hit the cache
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=True)
        runs_s.append(time.perf_counter() - start)
        output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        assert output_tokens == sum(out_lens), "every request must produce exactly its output length"
    elapsed = statistics.median(runs_s)
    prompt_tokens = sum(len(p) for p in prompts)
    record = {
        "benchmark": "throughput",
        "model": args.model,
        **environment(),
        "settings": vars(args),
        "num_requests": len(prompts),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "elapsed_s": elapsed,
        "runs_s": runs_s,
        "runs_output_tokens_per_s": [output_tokens / t for t in runs_s],
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (output_tokens + prompt_tokens) / elapsed,
        "time_to_ready_s": ready_s,
        "kv_capacity_tokens": llm.engine.kv_capacity_tokens,
        "preemptions": llm.stats.num_preemptions,
    }
    llm.shutdown()
    if args.out:
        write_result(args.out, record)
    else:
        write_result(Path("benchmarks/results") / f"throughput_{args.model}.json", record)


if __name__ == "__main__":
    main()
