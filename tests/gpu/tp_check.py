"""Tensor-parallel checks on a machine of several GPUs (NCCL); writes a JSON report.

1. fp32 greedy tokens at TP=N equal TP=1's, on the same random weights (every size in --tp that
   the GPUs allow), with CUDA graphs on; the report counts the graph replays on rank 0.
2. bf16 at the largest TP: CUDA-graph decode gives the same tokens as eager decode.

Every engine runs its workers as processes (``distributed_executor_backend="mp"``, TP=1 too), so
this process never touches a GPU and each run starts from the same free memory.

    python3 tests/gpu/tp_check.py --presets smollm2-135m llama3-8b --tp 1 2 4 --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, resolve_preset  # noqa: E402
from frontend import LLM, SamplingParams  # noqa: E402

logger = logging.getLogger("tp_check")


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 10000, size=int(rng.integers(16, 300))).tolist() for _ in range(n)]


def run_engine(
    preset: str, tp: int, dtype: str, eager: bool, prompts: list[list[int]], max_tokens: int
) -> dict:
    start = time.perf_counter()
    llm = LLM(
        model=str(resolve_preset(preset)),
        engine_process=False,
        distributed_executor_backend="mp",
        tensor_parallel_size=tp,
        load_format="dummy",
        dtype=dtype,
        skip_tokenizer_init=True,
        max_model_len=1024,
        max_num_seqs=32,
        enforce_eager=eager,
        gpu_memory_utilization=0.85,
    )
    ready_s = time.perf_counter() - start
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        executor = llm.engine.core.executor
        replays = executor._call_all("graph_replays")[0]
        custom_all_reduce = executor._call_all("uses_custom_all_reduce")
        kv_tokens = llm.engine.kv_capacity_tokens
    finally:
        llm.shutdown()
        del llm
        gc.collect()
    return {
        "tokens": [o.outputs[0].token_ids for o in outs],
        "ready_s": round(ready_s, 1),
        "graph_replays_rank0": replays,
        "custom_all_reduce_per_rank": custom_all_reduce,
        "kv_capacity_tokens": kv_tokens,
    }


def greedy_tp_equality(preset: str, sizes: list[int], num_prompts: int, max_tokens: int) -> dict:
    """TP=1 against every other size; a size the model's heads cannot be split by is recorded
    with the engine's refusal (e.g. SmolLM2's 9 heads at TP=2)."""
    prompts = _prompts(num_prompts, seed=3)
    result: dict = {"preset": preset, "dtype": "float32", "prompts": num_prompts, "max_tokens": max_tokens}
    runs = {}
    for tp in sizes:
        try:
            runs[tp] = run_engine(preset, tp, "float32", False, prompts, max_tokens)
        except ValueError as e:
            if tp == 1:
                raise
            result[f"tp{tp}"] = {"refused": str(e)}
    base = runs[1]["tokens"]
    ok = len(runs) > 1
    for tp, run in runs.items():
        same = sum(a == b for a, b in zip(run["tokens"], base))
        first_diff = [
            next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            for a, b in zip(run["tokens"], base)
        ]
        result[f"tp{tp}"] = {
            "identical_to_tp1": same,
            "first_differing_position": first_diff,
            **{k: v for k, v in run.items() if k != "tokens"},
        }
        ok = ok and same == num_prompts and run["graph_replays_rank0"] > 0
    result["ok"] = ok
    return result


def graphs_vs_eager(preset: str, tp: int, num_prompts: int, max_tokens: int) -> dict:
    prompts = _prompts(num_prompts, seed=4)
    eager = run_engine(preset, tp, "bfloat16", True, prompts, max_tokens)
    graphs = run_engine(preset, tp, "bfloat16", False, prompts, max_tokens)
    same = sum(a == b for a, b in zip(eager["tokens"], graphs["tokens"]))
    return {
        "preset": preset,
        "tp": tp,
        "dtype": "bfloat16",
        "requests": num_prompts,
        "identical_requests": same,
        "graph_replays_rank0": {
            "eager": eager["graph_replays_rank0"],
            "cuda_graphs": graphs["graph_replays_rank0"],
        },
        "ready_s": {"eager": eager["ready_s"], "cuda_graphs": graphs["ready_s"]},
        "ok": same == num_prompts and graphs["graph_replays_rank0"] > 0 and eager["graph_replays_rank0"] == 0,
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["smollm2-135m", "llama3-8b"])
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--skip-graphs-check", action="store_true")
    parser.add_argument("--graphs-preset", default="llama3-8b")
    parser.add_argument("--graphs-tp", type=int, default=None, help="TP of the graphs check (largest --tp)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--name", default="tp_check")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    num_gpus = torch.cuda.device_count()
    sizes = sorted({1, *(t for t in args.tp if t <= max(num_gpus, 1) or not num_gpus)})
    report: dict = {
        **environment(),
        "device": f"{num_gpus}x {torch.cuda.get_device_name(0)}" if num_gpus else "no GPU",
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if num_gpus else None,
        "checks": {},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checks = report["checks"]
    for preset in args.presets:
        try:
            checks[f"greedy_{preset}"] = greedy_tp_equality(preset, sizes, args.num_prompts, args.max_tokens)
        except Exception as e:  # one failing check must not hide the others' results
            logger.exception("greedy check of %s failed", preset)
            checks[f"greedy_{preset}"] = {"ok": False, "error": repr(e)}
        (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    try:
        if not args.skip_graphs_check:
            checks["graphs_vs_eager"] = graphs_vs_eager(
                args.graphs_preset, args.graphs_tp or sizes[-1], 16, 48
            )
    except Exception as e:
        logger.exception("graphs check failed")
        checks["graphs_vs_eager"] = {"ok": False, "error": repr(e)}
    report["ok"] = all(c.get("ok") for c in checks.values())
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v.get("ok") for k, v in checks.items()}, indent=1))
    print("TP CHECK", "OK" if report["ok"] else "FAILED")


if __name__ == "__main__":
    main()
