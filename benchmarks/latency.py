"""Single-stream latency: one request at a time, 128-token prompt, 512 output tokens (greedy,
ignore_eos): time to first token and milliseconds per output token, median over repeats.

    python benchmarks/latency.py --model llama3-8b --out benchmarks/results/latency_llama3-8b_h200.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, resolve_preset, write_result
from frontend import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    llm = LLM(
        model=resolve_preset(args.model),
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=args.input_len + args.output_len + 16,
        max_num_seqs=8,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager,
    )
    prompt = [(7 * i + 3) % 10000 for i in range(args.input_len)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    ttfts, tpots, e2es = [], [], []
    for i in range(args.repeats):
        llm.reset_prefix_cache()  # every repeat pays its full prefill
        start = time.perf_counter()
        out = llm.generate([[*prompt[:-1], i]], params, use_tqdm=False)[0]
        e2e = time.perf_counter() - start
        m = out.metrics
        ttft = m.first_token_time - m.arrival_time
        n = len(out.outputs[0].token_ids)
        ttfts.append(ttft)
        tpots.append((m.last_token_time - m.first_token_time) / (n - 1))
        e2es.append(e2e)
    record = {
        "benchmark": "latency",
        "model": args.model,
        **environment(),
        "settings": vars(args),
        "ttft_ms_median": 1000 * statistics.median(ttfts),
        "ms_per_output_token_median": 1000 * statistics.median(tpots),
        "e2e_s_median": statistics.median(e2es),
        "ttft_ms_all": [1000 * t for t in ttfts],
        "ms_per_output_token_all": [1000 * t for t in tpots],
    }
    llm.shutdown()
    write_result(args.out or Path("benchmarks/results") / f"latency_{args.model}.json", record)


if __name__ == "__main__":
    main()
