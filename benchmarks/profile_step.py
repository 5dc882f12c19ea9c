"""Where a step's time goes: torch.profiler over a window of engine steps, in-process engine.

    python3 benchmarks/profile_step.py --model llama3-8b --batch 256 --prompt-len 512 --decode-steps 64
Prints the top CUDA kernels by total time and the CPU-side split of a step (schedule, execute,
update) measured around the engine's own calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import resolve_preset
from frontend import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.6)
    args = parser.parse_args()
    llm = LLM(
        model=resolve_preset(args.model),
        engine_process=False,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=2048,
        max_num_seqs=args.batch,
        max_num_batched_tokens=16384,
    )
    core = llm.engine.core
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 10000, size=args.prompt_len).tolist() for _ in range(args.batch)]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.decode_steps + 8, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)
    for i, p in enumerate(prompts):
        from ipc.messages import EngineCoreRequest

        core.add_request(EngineCoreRequest(request_id=f"r{i}", prompt_token_ids=p, sampling_params=params))
    # Prefill until every request decodes.
    while (
        any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.running)
        or core.scheduler.waiting
    ):
        core.step()
    timings = {"schedule": [], "execute": [], "update": [], "step": []}
    sched, executor = core.scheduler, core.executor

    def step() -> None:
        t0 = time.perf_counter()
        so = sched.schedule()
        t1 = time.perf_counter()
        ro = executor.execute_model(so)
        t2 = time.perf_counter()
        sched.update_from_output(so, ro)
        t3 = time.perf_counter()
        timings["schedule"].append(t1 - t0)
        timings["execute"].append(t2 - t1)
        timings["update"].append(t3 - t2)
        timings["step"].append(t3 - t0)

    for _ in range(8):
        step()
    for v in timings.values():
        v.clear()
    for _ in range(args.decode_steps // 2):
        step()
    print(
        {k: f"{1000 * float(np.median(v)):.3f} ms" for k, v in timings.items()}, "batch", len(sched.running)
    )
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    ) as prof:
        for _ in range(8):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
