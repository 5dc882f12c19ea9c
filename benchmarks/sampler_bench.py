"""The sampler's step time on mixed batches: does a minority of rows with top-k / top-p or a
penalty cost the whole batch? (CPU or CUDA, whichever the machine has; the same command.)

    python benchmarks/sampler_bench.py
    mkdir /tmp/base && git archive <commit> ipc kernels workers | tar -x -C /tmp/base && \\
        python benchmarks/sampler_bench.py --baseline-root /tmp/base --baseline-commit <commit>

One sampler step at --batch rows and --vocab tokens (logits in the engine's dtype: fp32 on CPU,
bf16 on CUDA) of requests in a persistent batch with --prompt-len prompt and --output-len output
tokens each, temperature 0.8, unseeded:
  temperature   every row temperature-only                                          (a)
  mixed         10 % of rows top_p=0.9 + top_k=50, 10 % repetition_penalty=1.1,
                the rest temperature-only                                           (b)
  top_p_only    10 % of rows top_p=0.9 without top-k (the rows that must sort)
A step is what the engine does per step: the sampling inputs built on the host from the
persistent batch, their upload, the sampler, and (CUDA) a synchronize; untimed, its tokens then
join the batch, as a decode step's do. After a warm-up the cases take turns in blocks of --block
timed steps, each block after one untimed step of its case; the record holds medians and the
ratio mixed / temperature (the target is at most 1.15).

--baseline-root runs the same measurement, in a subprocess, on another checkout (the code before
the logits-processor pipeline: ModelRunner._sampling_arrays + workers.sampler.sample) and records
its numbers and ratio beside these.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CASES = ("temperature", "mixed", "top_p_only")


def case_params(case: str, batch: int) -> list[Any]:
    from ipc.sampling_params import SamplingParams

    plain = SamplingParams(temperature=0.8)
    params = [plain] * batch
    tenth = batch // 10
    if case == "mixed":
        params[:tenth] = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50)] * tenth
        params[tenth : 2 * tenth] = [SamplingParams(temperature=0.8, repetition_penalty=1.1)] * tenth
    elif case == "top_p_only":
        params[:tenth] = [SamplingParams(temperature=0.8, top_p=0.9)] * tenth
    # Spread the special rows over the batch, as a scheduler would.
    order = sorted(range(batch), key=lambda i: (i * 7919) % batch)
    return [params[i] for i in order]


def fill_batch(batch: Any, params: list[Any], prompt_len: int, output_len: int, vocab: int) -> list[Any]:
    import numpy as np

    from ipc.messages import NewRequestData

    rng = np.random.default_rng(0)
    states = []
    for i, p in enumerate(params):
        tokens = rng.integers(0, vocab, prompt_len + output_len).tolist()
        new = NewRequestData(
            str(i),
            tokens[:prompt_len],
            p,
            [0],
            prompt_len + output_len - 1,
            output_token_ids=tokens[prompt_len:],
        )
        states.append(batch.add(new))
    return states


def step_fn(
    case: str, args: argparse.Namespace, device: Any, logits: Any
) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    """One sampler step of ``case``, with whichever sampler API this checkout has."""
    import numpy as np

    params = case_params(case, args.batch)
    max_len = args.prompt_len + args.output_len + args.warmup + 2 * args.repeats + 8
    try:
        from workers.input_batch import InputBatch
        from workers.sampling import SamplingInputBuilder, sample
    except ImportError:  # the checkout before workers/sampling/
        return _baseline_step_fn(params, args, device, logits, max_len)
    batch = InputBatch(args.batch, max_len, 1)
    states = fill_batch(batch, params, args.prompt_len, args.output_len, args.vocab)
    rows = np.array([s.row for s in states], dtype=np.int64)
    builder = SamplingInputBuilder(batch, args.vocab, noise_seed=0)
    upload = _uploader(device)

    def step() -> Any:
        inputs = builder.build(rows, states)
        return sample(logits, inputs.metadata(upload(inputs.arrays), None)).token_ids

    return _growing(step, batch, rows)


def _baseline_step_fn(
    params: list[Any], args: argparse.Namespace, device: Any, logits: Any, max_len: int
) -> Any:
    import numpy as np
    from workers.sampler import sample  # type: ignore[import-not-found]

    from workers.model_runner import ModelRunner

    runner = ModelRunner(None, device, 16, args.batch, max_len, args.vocab)  # type: ignore[arg-type]
    states = fill_batch(runner.batch, params, args.prompt_len, args.output_len, args.vocab)
    rows = np.array([s.row for s in states], dtype=np.int64)
    upload = _uploader(device)

    def step() -> Any:
        sampling = runner._sampling_arrays(rows, states)
        return sample(logits, sampling.metadata(upload(sampling.host), runner)).token_ids

    return _growing(step, runner.batch, rows)


def _growing(
    step: Callable[[], Any], batch: Any, rows: Any
) -> tuple[Callable[[], Any], Callable[[Any], None]]:
    """The step and what follows it untimed: its tokens join the batch, as a decode step's do."""

    def append(token_ids: Any) -> None:
        for row, token in zip(rows.tolist(), token_ids.tolist()):
            batch.append_token(row, token)

    return step, append


def _uploader(device: Any) -> Callable[[list[Any]], list[Any]]:
    """The step's one host-to-device copy, as the ModelRunner makes it."""
    import numpy as np
    import torch

    if device.type == "cpu":
        return lambda arrays: [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    from workers.staging import HostStaging

    staging = HostStaging(device)
    return lambda arrays: staging.upload(*arrays)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(args.batch, args.vocab, device=device, generator=gen).to(dtype)
    steps = {case: step_fn(case, args, device, logits) for case in CASES}

    def timed(fn: tuple[Callable[[], Any], Callable[[Any], None]]) -> float:
        step, after = fn
        start = time.perf_counter()
        tokens = step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = (time.perf_counter() - start) * 1e3
        after(tokens)
        return elapsed

    for _ in range(args.warmup):
        for fn in steps.values():
            timed(fn)
    samples: dict[str, list[float]] = {case: [] for case in CASES}
    # Blocks of consecutive steps per case, the cases in turn: a shared host's drift hits every
    # case alike, and each timed step follows a step of its own kind, as in an engine (a step
    # right after another case's pays for that case's allocation pattern: it is not timed).
    for _ in range(-(-args.repeats // args.block)):
        for case, fn in steps.items():
            timed(fn)
            samples[case] += [timed(fn) for _ in range(args.block)]
    median = {case: statistics.median(ms) for case, ms in samples.items()}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "logits_dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "median_ms": median,
        "min_ms": {case: min(ms) for case, ms in samples.items()},
        "ratio_mixed_over_temperature": median["mixed"] / median["temperature"],
        "ratio_top_p_only_over_temperature": median["top_p_only"] / median["temperature"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152)  # SmolLM2's, the default model
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per case")
    parser.add_argument("--block", type=int, default=5, help="consecutive timed steps of one case")
    parser.add_argument("--baseline-root", help="another checkout to measure the same way")
    parser.add_argument("--baseline-commit", help="the baseline's commit, where its root has no git")
    parser.add_argument("--commit", help="this checkout's commit, where it has no git (the GPU machine)")
    parser.add_argument(
        "--out", help="JSON path (default benchmarks/results/sampler_pipeline_<device>_<commit>.json)"
    )
    parser.add_argument(
        "--measure-only", action="store_true", help=argparse.SUPPRESS
    )  # the baseline's subprocess
    args = parser.parse_args()
    if args.measure_only:  # imports come from PYTHONPATH: the checkout measured
        print(json.dumps(measure(args)))
        return
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import cpu_bench_record, git, save_json

    load_before = os.getloadavg()[0]
    result = measure(args)
    print(json.dumps(result, indent=2))
    record = cpu_bench_record(
        "sampler_pipeline",
        "Sampler step (host inputs + upload + sample) at a mixed batch against temperature-only",
        load_before,
        {"torch": result["torch"]},
        {k: v for k, v in vars(args).items() if k not in ("out", "measure_only", "commit")},
        [result],
    )
    record["device"]["sampler_device"] = result["device"]
    if args.baseline_root:
        base = Path(args.baseline_root).resolve()
        shared = ("batch", "vocab", "prompt_len", "output_len", "warmup", "repeats", "block")
        forwarded = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in shared]
        # The baseline's packages first: its ``workers`` hides this checkout's.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(base), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--measure-only", *forwarded],
            cwd=base, env=env, check=True, capture_output=True, text=True,
        )  # fmt: skip
        baseline = json.loads(done.stdout.strip().splitlines()[-1])
        found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=base, capture_output=True, text=True)
        baseline["commit"] = args.baseline_commit or found.stdout.strip()
        print("baseline:", json.dumps(baseline, indent=2))
        record["baseline"] = baseline
    kind = "cpu" if result["device"] == "cpu" else "cuda"
    if args.commit:
        record["git"]["commit"] = args.commit
    commit = (args.commit or git("rev-parse", "HEAD") or "none")[:7]
    out = args.out or ROOT / "benchmarks" / "results" / f"sampler_pipeline_{kind}_{commit}.json"
    save_json(out, record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
