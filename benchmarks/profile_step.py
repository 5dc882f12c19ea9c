"""Where a decode step's time goes, in the engine's own async loop (in-process engine).

    python3 benchmarks/profile_step.py --model smollm2-135m --batch 256 --prompt-len 512

``--batch`` requests with ``--prompt-len``-token prompts are prefilled, then ``--decode-steps``
decode steps run the way EngineCore.step runs them with async scheduling, each timed in parts:

  schedule   Scheduler.schedule() for step N+1
  launch     executor.execute_model_async(): inputs, graph replay, sampler launch (host side)
  wait       step N's result(): blocking on the GPU; near 0 means the host, not the GPU, sets the pace
  update     Scheduler.update_from_output() for step N

Then torch.profiler over a few steps (CUDA kernels by total time) and cProfile of the host loop
(functions by own time). Optional ``--out`` writes the medians as JSON.

``--prefill-len L [L ...]`` measures once per value; L > 0 makes every measured step a mixed one, as under online load: a new request with
an L-token prompt (one output token) joins each step, so the step is the decode batch plus one
L-token prefill, the step that sets a streamed request's time to first token.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import environment, resolve_preset, write_result
from frontend import LLM, SamplingParams
from ipc.messages import EngineCoreRequest

PARTS = ("schedule", "launch", "wait", "update", "step")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--seeded", action="store_true", help="give every request a seed")
    parser.add_argument(
        "--prefill-len",
        type=int,
        nargs="+",
        default=[0],
        help="one measurement per value: add one prompt of this many tokens to every step (0: none)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    llm = LLM(
        model=resolve_preset(args.model),
        engine_process=False,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=2048,
        max_num_seqs=args.batch + (4 if any(args.prefill_len) else 0),  # room for the joining prompts
        max_num_batched_tokens=16384,
    )
    core = llm.engine.core
    rng = np.random.default_rng(0)
    llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=4), use_tqdm=False)
    total_steps = len(args.prefill_len) * (args.decode_steps + 16) + args.decode_steps + 32
    for i in range(args.batch):
        params = SamplingParams(
            temperature=args.temperature,
            max_tokens=total_steps,
            ignore_eos=True,
            seed=i if args.seeded else None,
        )
        prompt = rng.integers(0, 10000, size=args.prompt_len).tolist()
        core.add_request(
            EngineCoreRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling_params=params)
        )
    sched, executor = core.scheduler, core.executor
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running) or sched.waiting:
        core.step()
    if core._in_flight is not None:  # finish the engine's in-flight step: the loop below owns the next
        previous, pending = core._in_flight
        sched.update_from_output(previous, pending.result())
        core._in_flight = None

    in_flight = None
    joined = 0
    prefill_len = 0
    timings: dict[str, list[float]] = {part: [] for part in PARTS}
    step_tokens: list[int] = []

    def step() -> None:
        nonlocal in_flight, joined
        if prefill_len:
            joined += 1
            prompt = rng.integers(0, 10000, size=prefill_len).tolist()
            params = SamplingParams(temperature=args.temperature, max_tokens=1, ignore_eos=True)
            core.add_request(
                EngineCoreRequest(request_id=f"p{joined}", prompt_token_ids=prompt, sampling_params=params)
            )
        t0 = time.perf_counter()
        so = sched.schedule()
        t1 = time.perf_counter()
        pending = executor.execute_model_async(so)
        t2 = time.perf_counter()
        t3 = t4 = t2
        if in_flight is not None:
            previous, previous_pending = in_flight
            result = previous_pending.result()
            t3 = time.perf_counter()
            sched.update_from_output(previous, result)
            t4 = time.perf_counter()
        in_flight = (so, pending)
        step_tokens.append(so.total_num_scheduled_tokens)
        for part, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            timings[part].append(seconds)

    runs = []
    for prefill_len in args.prefill_len:
        for _ in range(8):
            step()
        for values in timings.values():
            values.clear()
        step_tokens.clear()
        for _ in range(args.decode_steps):
            step()
        medians_ms = {part: 1000 * float(np.median(v)) for part, v in timings.items()}
        tokens = int(np.median(step_tokens))
        runs.append({"prefill_len": prefill_len, "median_ms": medians_ms, "median_tokens_per_step": tokens})
        print(f"prefill {prefill_len}: median ms per step:", {k: round(v, 3) for k, v in medians_ms.items()},
              "batch", len(sched.running), "tokens per step", tokens)  # fmt: skip
        if torch.cuda.is_available():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(8):
                    step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=20, max_name_column_width=60
            )
            print(table)

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.decode_steps):
        step()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    print(text.getvalue())
    if args.out:
        write_result(
            args.out,
            {"benchmark": "profile_step", "model": args.model, **environment(), "settings": vars(args),
             "median_ms": runs[0]["median_ms"], "runs": runs},
        )  # fmt: skip


if __name__ == "__main__":
    main()
