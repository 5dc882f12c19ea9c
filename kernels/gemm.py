"""Which GEMM runs each projection: cuBLAS, cuBLASLt or the Triton skinny GEMM, chosen by timing
them on the model's own weights at start-up.

No single implementation wins every decode-sized shape (``kernels_bench --only linear_sweep``;
BENCHMARKS.md, kernels): the Triton GEMM wins narrow projections at a few rows, cuBLASLt some
shapes at a few dozen rows, and cuBLAS everything larger. A fixed table would be right for one
GPU and one model only, so the engine measures: for every weight shape of at
least MIN_TUNED_WEIGHT_BYTES and every captured decode batch size the worker asks for (up to 128
rows), each candidate runs over all the layers' weights from a CUDA graph (as a decode step reads
them, none of them in L2), and the fastest wins when it beats cuBLAS by ``MIN_GAIN``. Shapes that
were not measured (prefills, mixed steps) use cuBLAS.

A choice is baked into a CUDA graph at capture; in eager steps the same lookup runs per call.
"""

from __future__ import annotations

import functools
import logging
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CUBLAS = "cublas"
CUBLASLT = "cublaslt"
TRITON = "triton"
# Below this the difference is within run-to-run noise of the measurement: keep cuBLAS.
MIN_GAIN = 0.03
# Weights smaller than this are not tuned: their GEMMs take a few microseconds, mostly launch and
# latency, where the 3 % margin is below what the timing resolves. smollm2-135m (every projection
# under 4 MB) had nothing beat cuBLAS, and its offline throughput was lower and noisier after the
# tuning ran (52.6k vs 61.0k output tok/s, medians of 12 interleaved runs on an H200): a cost with
# no gain, so such models skip it.
MIN_TUNED_WEIGHT_BYTES = 16 * 2**20
_TIMED_PASSES = 5


def torch_linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [M, N], written when given
) -> torch.Tensor:
    """Torch's GEMM (cuBLAS on CUDA): ``F.linear``, or into a caller's buffer (the same GEMM, no
    copy). The production path of every shape a plan did not measure, and the baseline each
    measured candidate must beat."""
    if out is None:
        return F.linear(x, weight, bias)
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


@dataclass(frozen=True, slots=True)
class GemmChoice:
    backend: str = CUBLAS
    config: Any = None  # kernels.triton.linear.LinearConfig when backend is TRITON

    def run(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None
    ) -> torch.Tensor:
        if self.backend == TRITON:
            from kernels.triton.linear import skinny_linear_launch  # CUDA only

            return skinny_linear_launch(x, weight, bias, out, self.config)
        if self.backend == CUBLASLT:
            # torch reads the preference when it dispatches the GEMM; restoring it at once keeps
            # the setting local to this call.
            previous = torch.backends.cuda.preferred_blas_library()
            torch.backends.cuda.preferred_blas_library(CUBLASLT)
            try:
                return torch_linear(x, weight, bias, out)
            finally:
                torch.backends.cuda.preferred_blas_library(previous)
        return torch_linear(x, weight, bias, out)

    def describe(self) -> str:
        if self.config is None:
            return self.backend
        c = self.config
        return (
            f"{self.backend}({c.block_m}x{c.block_n}x{c.block_k}, split {c.split_k}, {c.num_stages} stages)"
        )


_DEFAULT = GemmChoice()


@dataclass(slots=True)
class GemmPlan:
    """The measured choice per (rows, out_features, in_features); cuBLAS for every other shape."""

    choices: dict[tuple[int, int, int], GemmChoice] = field(default_factory=dict)

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``F.linear(x, weight, bias)``, into ``out`` when given."""
        choice = None
        if self.choices and x.dim() == 2 and x.stride(1) == 1 and (out is None or out.stride(1) == 1):
            choice = self.choices.get((x.shape[0], weight.shape[0], weight.shape[1]))
        if choice is None:  # every shape that was not measured: cuBLAS, without the choice's frame
            return torch_linear(x, weight, bias, out)
        return choice.run(x, weight, bias, out)

    def summary(self) -> str:
        counts = Counter(choice.backend for choice in self.choices.values())
        return ", ".join(f"{backend} {n}" for backend, n in sorted(counts.items())) or "nothing tuned"


def time_passes(
    calls: Sequence[Callable[[], Any]],
    pool: Any = None,
    stream: torch.cuda.Stream | None = None,
    passes: int = _TIMED_PASSES,
) -> float:
    """Median seconds per call of one pass over ``calls``, replayed from a CUDA graph as a decode
    step runs them: timed eagerly, a Triton launch's Python overhead would starve the GPU and
    lose to cuBLAS for that reason alone. CUDA events; a warm-up run before the capture and a
    replay before the timing."""
    stream = stream or torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        for call in calls:
            call()
    graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(passes)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(passes)]
    for start, end in zip(starts, ends):
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3 / len(calls)


def choose(
    candidates: Sequence[GemmChoice],
    measure: Callable[[GemmChoice], float],
    min_gain: float = MIN_GAIN,
) -> tuple[GemmChoice, dict[str, float]]:
    """The fastest candidate if it beats the first (cuBLAS) by ``min_gain``, else the first; with
    every candidate's time. A candidate whose launch fails (e.g. out of shared memory) is skipped."""
    timings: dict[str, float] = {}
    baseline = measure(candidates[0])
    timings[candidates[0].describe()] = baseline
    best, best_time = candidates[0], baseline
    for candidate in candidates[1:]:
        try:
            seconds = measure(candidate)
        except RuntimeError as exc:  # triton's OutOfResources is a RuntimeError too
            logger.debug("GEMM candidate %s failed: %s", candidate.describe(), exc)
            continue
        timings[candidate.describe()] = seconds
        if seconds < best_time:
            best, best_time = candidate, seconds
    if best_time > baseline * (1 - min_gain):
        best = candidates[0]
    return best, timings


def _time_choice(
    candidate: GemmChoice, x: torch.Tensor, weights: list[torch.Tensor], pool: Any, stream: torch.cuda.Stream
) -> float:
    return time_passes([functools.partial(candidate.run, x, w, None, None) for w in weights], pool, stream)


def _past_l2(weights: list[torch.Tensor], min_bytes: int = 128 * 2**20) -> list[torch.Tensor]:
    """The weights, repeated as copies until one pass reads ``min_bytes``: a small model's layers
    would otherwise sit in L2 (50 MB on an H100/H200) while the pass is timed, which they do not
    in a decode step, where every other weight is read in between."""
    per_pass = sum(w.numel() * w.element_size() for w in weights)
    copies = max(0, -(-min_bytes // per_pass) - 1)
    return weights + [w.clone() for _ in range(copies) for w in weights]


def _agrees(choice: GemmChoice, x: torch.Tensor, weight: torch.Tensor) -> bool:
    expected = torch_linear(x, weight).float()
    got = choice.run(x, weight, None, None).float()
    return bool(torch.allclose(got, expected, atol=5e-2, rtol=5e-2))


def tune_gemm_plan(
    weights_by_shape: dict[tuple[int, int], list[torch.Tensor]],
    sizes: Sequence[int],
    compile_threads: int,
) -> GemmPlan:
    """Measure cuBLAS, cuBLASLt and the Triton GEMM's candidate tiles for each weight shape of at
    least MIN_TUNED_WEIGHT_BYTES at each row count in ``sizes``, over all the weights of that
    shape; the plan keeps the winners."""
    plan = GemmPlan()
    tunable = {
        shape: weights
        for shape, weights in weights_by_shape.items()
        if weights[0].numel() * weights[0].element_size() >= MIN_TUNED_WEIGHT_BYTES
    }
    if not tunable:
        return plan
    from kernels.triton.launch import num_sms, parallel_compile
    from kernels.triton.linear import candidate_configs

    pool = torch.cuda.graph_pool_handle()  # one memory pool for every timing graph
    # and one capture stream: torch keeps a cuBLAS workspace (32 MiB on Hopper) per stream for the
    # life of the process, and a new stream per timing (torch cycles through 32) is the likely
    # reason the 8B's KV cache came out 9k tokens (~1.1 GB) smaller after the tuning.
    stream = torch.cuda.Stream()
    for (out_features, in_features), layer_weights in tunable.items():
        weight = layer_weights[0]
        weights = _past_l2(layer_weights)
        sms = num_sms(weight.device)
        for rows in sizes:
            x = torch.randn(rows, in_features, dtype=weight.dtype, device=weight.device)
            candidates = [GemmChoice(CUBLAS), GemmChoice(CUBLASLT)]
            candidates += [
                GemmChoice(TRITON, c) for c in candidate_configs(rows, out_features, in_features, sms)
            ]
            if len(candidates) > 2:
                with parallel_compile(compile_threads):  # every tile's compile at once
                    for candidate in candidates[2:]:
                        candidate.run(x, weight, None, None)
            best, timings = choose(
                candidates, functools.partial(_time_choice, x=x, weights=weights, pool=pool, stream=stream)
            )
            if best.backend == TRITON and not _agrees(best, x, weight):
                logger.warning(
                    "GEMM %s disagrees with cuBLAS at %s rows; keeping cuBLAS", best.describe(), rows
                )
                best = _DEFAULT
            logger.debug(
                "GEMM %d x %d at %d rows: %s -> %s",
                out_features,
                in_features,
                rows,
                {k: round(v * 1e6, 1) for k, v in timings.items()},
                best.describe(),
            )
            if best.backend != CUBLAS:
                plan.choices[(rows, out_features, in_features)] = best
    return plan
