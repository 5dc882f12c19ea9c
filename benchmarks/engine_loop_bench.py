"""The engine loop's per-step cost, split into schedule / execute / update, for each executor.

EngineCore steps with ``--num-requests`` requests decoding at once (prompts of ``--prompt-len``
tokens, ignore_eos, one token per request per step). Each step is timed in three parts:

  schedule   Scheduler.schedule() -> SchedulerOutput (the diff sent to the workers)
  execute    executor.execute_model(): in-process call (uni), or encode + broadcast through the
             shm ring + the worker's work + rank 0's reply through its reply ring + decode (mp)
  update     Scheduler.update_from_output() -> EngineCoreOutputs

Executors: ``uni`` (UniProcExecutor, the worker in this process), ``mp-1`` and ``mp-2``
(MultiprocExecutor with one / two worker processes). Models:

  noop   a Worker whose execute_model decodes the SchedulerOutput and answers one fixed token per
         request (no model, no persistent batch): ``execute(mp) - execute(uni)`` is what the
         process architecture adds per step
  tiny   the real ModelRunner on a random 1-layer, hidden-64 Llama (persistent batch, inputs,
         attention over the growing context, sampler; with TP=2 also the gloo collectives)

Medians (and p90) of each part in microseconds, and steps per second, go to the JSON file and a
table. On a shared 2-core box the mp cases run 2-3 processes on 2 cores: the load average
before and after is recorded with the results.

Usage: python benchmarks/engine_loop_bench.py [--out benchmarks/results/engine_loop_<host>.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import cpu_bench_record, save_json  # noqa: E402
from ipc.config import EngineConfig  # noqa: E402
from ipc.messages import ModelRunnerOutput, SchedulerOutput  # noqa: E402
from workers.model_runner import PendingStep  # noqa: E402
from workers.worker import Worker  # noqa: E402

TOKEN = 7  # what the no-op model "samples" (not the EOS; ignore_eos is set anyway)
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}


class NoOpWorker(Worker):
    """No model: answers every scheduled request with one fixed token (see the module doc)."""

    def load_model(self) -> None:
        pass

    def determine_num_blocks(self) -> int:
        return 1 << 16

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        req_ids = list(scheduler_output.num_scheduled_tokens)
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=[TOKEN] * len(req_ids))

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> PendingStep:
        return PendingStep.finished(self.execute_model(scheduler_output))

    def shutdown(self) -> None:
        pass


PARTS = ("schedule", "execute", "update", "step")


@dataclass(slots=True)
class RunResult:
    """One run of one case."""

    startup_s: float
    steps_per_s: float
    median_us: dict[str, float] = field(default_factory=dict)
    p90_us: dict[str, float] = field(default_factory=dict)
    mean_us: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class CaseResult:
    """A case over its repeats; the summary figures are medians of the runs' figures."""

    model: str
    executor: str
    world_size: int
    steps: int
    runs: list[RunResult] = field(default_factory=list)
    steps_per_s: float = 0.0
    median_us: dict[str, float] = field(default_factory=dict)
    p90_us: dict[str, float] = field(default_factory=dict)

    def summarize(self) -> None:
        self.steps_per_s = statistics.median(r.steps_per_s for r in self.runs)
        for part in PARTS:
            self.median_us[part] = statistics.median(r.median_us[part] for r in self.runs)
            self.p90_us[part] = statistics.median(r.p90_us[part] for r in self.runs)


def _config(model_dir: str, args: argparse.Namespace, tp: int, backend: str) -> EngineConfig:
    from core.engine_args import EngineArgs

    max_len = args.prompt_len + args.warmup + max(args.steps, args.tiny_steps) + 8
    blocks_per_req = -(-max_len // 16)
    return EngineArgs(
        model=model_dir,
        load_format="dummy",
        skip_tokenizer_init=True,
        max_model_len=max_len,
        max_num_seqs=max(args.num_requests, 1),
        num_gpu_blocks_override=args.num_requests * blocks_per_req + 16,
        enable_prefix_caching=False,
        tensor_parallel_size=tp,
        distributed_executor_backend=backend,
        device="cpu",
        cpu_threads=1,
    ).create_engine_config()


def _run_case(
    model_dir: str, args: argparse.Namespace, model: str, executor_name: str, steps: int
) -> RunResult:
    from core.engine_core import EngineCore
    from core.executor import UniProcExecutor
    from core.mp_executor import MultiprocExecutor
    from ipc.messages import EngineCoreRequest
    from ipc.sampling_params import SamplingParams

    world_size = _world_size(executor_name)
    backend = "uni" if executor_name == "uni" else "mp"
    config = _config(model_dir, args, world_size, backend)
    worker_cls = NoOpWorker if model == "noop" else None
    started = time.perf_counter()
    if backend == "uni":
        executor: Any = UniProcExecutor(config, worker_cls=worker_cls)
    else:
        executor = MultiprocExecutor(config, worker_cls=worker_cls)
    engine = EngineCore(config, executor=executor)
    startup_s = time.perf_counter() - started
    try:
        params = SamplingParams(temperature=0.0, max_tokens=args.warmup + steps + 4, ignore_eos=True)
        for i in range(args.num_requests):
            prompt = [(3 + i * 31 + j * 7) % 500 + 3 for j in range(args.prompt_len)]
            engine.add_request(
                EngineCoreRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling_params=params)
            )
        scheduler = engine.scheduler
        clock = time.perf_counter_ns
        parts: dict[str, list[int]] = {"schedule": [], "execute": [], "update": [], "step": []}
        for step in range(args.warmup + steps):
            t0 = clock()
            so = scheduler.schedule()
            t1 = clock()
            out = executor.execute_model(so)
            t2 = clock()
            scheduler.update_from_output(so, out)
            t3 = clock()
            if step < args.warmup:  # the first step is the prefill; the rest of warmup settles caches
                continue
            if len(so.num_scheduled_tokens) != args.num_requests:
                raise RuntimeError(f"step {step}: {len(so.num_scheduled_tokens)} requests scheduled")
            parts["schedule"].append(t1 - t0)
            parts["execute"].append(t2 - t1)
            parts["update"].append(t3 - t2)
            parts["step"].append(t3 - t0)
    finally:
        engine.shutdown()
    total_s = sum(parts["step"]) / 1e9
    result = RunResult(startup_s, steps / total_s)
    for name, ns in parts.items():
        us = sorted(n / 1e3 for n in ns)
        result.median_us[name] = statistics.median(us)
        result.p90_us[name] = us[int(0.9 * (len(us) - 1))]
        result.mean_us[name] = statistics.fmean(us)
    return result


def _world_size(executor_name: str) -> int:
    return 1 if executor_name == "uni" else int(executor_name.split("-")[1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        default=os.path.join(ROOT, "benchmarks", "results", f"engine_loop_{socket.gethostname()}.json"),
    )
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2000, help="timed steps per case (noop model)")
    parser.add_argument("--tiny-steps", type=int, default=300, help="timed steps per case (tiny model)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3, help="runs per case, interleaved")
    parser.add_argument("--executors", default="uni,mp-1,mp-2")
    parser.add_argument("--models", default="noop,tiny")
    args = parser.parse_args()

    import msgspec
    import numpy as np
    import torch

    # A config-only model directory is what --load-format dummy is for: drop the loader's warning.
    logging.getLogger("workers.loaders.source").setLevel(logging.ERROR)
    load_before = os.getloadavg()
    cases = [
        CaseResult(model, name, _world_size(name), args.steps if model == "noop" else args.tiny_steps)
        for model in args.models.split(",")
        for name in args.executors.split(",")
    ]
    with tempfile.TemporaryDirectory(prefix="engine-loop-bench-") as model_dir:
        with open(os.path.join(model_dir, "config.json"), "w") as f:
            json.dump(TINY_CONFIG, f)
        # Repeats outermost: a burst of load from other tenants then hits one run of every case
        # rather than every run of one case.
        for repeat in range(args.repeats):
            for case in cases:
                run = _run_case(model_dir, args, case.model, case.executor, case.steps)
                case.runs.append(run)
                print(
                    f"  [{repeat + 1}/{args.repeats}] {case.model:<5} {case.executor:<5} step "
                    f"{run.median_us['step']:8.1f} us  ({run.steps_per_s:7.0f} steps/s)",
                    flush=True,
                )
    for case in cases:
        case.summarize()
    results = cases

    report = cpu_bench_record(
        "engine_loop_bench",
        "EngineCore per-step time (schedule / execute / update) per executor; "
        f"{args.num_requests} requests decoding; noop = no model, tiny = 1-layer hidden-64 random Llama",
        load_before[0],
        {"torch": torch.__version__, "msgspec": msgspec.__version__, "numpy": np.__version__},
        vars(args),
        [asdict(r) for r in results],
    )
    save_json(args.out, report)

    dev = report["device"]
    print(
        f"\nengine_loop_bench on {dev['cpu_model']} ({dev['usable_cpus']} usable CPUs, load "
        f"{dev['loadavg_1m_before']:.1f} -> {dev['loadavg_1m_after']:.1f}); "
        f"{args.num_requests} requests decoding; median (p90) us per step, median of {args.repeats} runs"
    )
    print(
        f"{'model':<6}{'executor':<9}{'schedule':>16}{'execute':>18}{'update':>16}{'step':>18}"
        f"{'steps/s':>9}{'exec - uni':>12}"
    )
    uni_exec = {r.model: r.median_us["execute"] for r in results if r.executor == "uni"}
    for r in results:
        cells = "".join(
            f"{r.median_us[k]:>9.1f} ({r.p90_us[k]:>6.1f})".rjust(w)
            for k, w in (("schedule", 16), ("execute", 18), ("update", 16), ("step", 18))
        )
        overhead = r.median_us["execute"] - uni_exec[r.model] if r.model in uni_exec else float("nan")
        print(f"{r.model:<6}{r.executor:<9}{cells}{r.steps_per_s:>9.0f}{overhead:>12.1f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
