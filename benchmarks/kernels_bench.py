"""GPU micro-benchmark of the Triton kernels at real model shapes; writes JSON.

    python benchmarks/kernels_bench.py --out benchmarks/results/kernels_h100.json

Reports, per preset (llama3-8b, smollm2-135m by default):
* decode paged attention: achieved bandwidth (bytes of K and V read / time) as a fraction of the
  measured device copy bandwidth (torch copy of 1 GiB, bytes read + written), for the split-KV
  heuristic's choice, no split, and twice its split;
* prefill attention (fresh, and chunked over a cached prefix): causal TFLOP/s;
* rms_norm, fused_add_rms_norm, rope_write_kv, silu_and_mul: bandwidth and fraction of copy;
* with --only decode_sweep: the decode tile heuristic against every tile / warps / stages choice
  at serving-sized llama3-8b batches; with --only linear: the model's projections (cuBLAS) at
  decode batch sizes; with --only linear_sweep: cuBLAS, cuBLASLt and every Triton skinny-GEMM tile
  on those projections at 1-256 rows.

Method: --layers calls, each on its own buffers, are captured in one CUDA graph (as a decode step
runs its layers; it also proves the ops capture) and replayed; L2 is flushed by overwriting a large
buffer before each timed replay; CUDA events time each replay; the figure is the median over
repeats, after warmup, divided by the calls per graph.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PRESETS_DIR = ROOT / "benchmarks" / "presets"  # the checkout's copy of ../shared/bench/presets


@dataclass(frozen=True)
class Shapes:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    rope_theta: float
    rope_scaling: dict | None


DECODE_SHAPES = [
    (1, 8192),
    (4, 4096),
    (8, 4096),
    (16, 2048),
    (32, 4096),
    (64, 2048),
    (128, 1024),
    (256, 1024),
]
PREFILL_SHAPES = [
    (1, 0, 4096),
    (4, 0, 2048),
    (16, 0, 512),
    (2, 2048, 512),
]  # (seqs, cached prefix, new tokens)
TOKEN_COUNTS = [1, 64, 512, 4096, 16384]


def load_shapes(name: str, presets_dir: Path) -> Shapes:
    path = presets_dir / name / "config.json"
    if not path.exists():
        raise SystemExit(f"no preset {name!r} at {path}")
    cfg = json.loads(path.read_text())
    heads = cfg["num_attention_heads"]
    return Shapes(
        name=name,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        hidden=cfg["hidden_size"],
        intermediate=cfg["intermediate_size"],
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=cfg.get("rope_scaling"),
    )


class Timer:
    """Median CUDA-event time per call of graph-captured calls, L2 flushed before every replay.

    Several calls (e.g. one per layer, each on its own buffers, as a model's decode step runs them)
    go into one graph and the time is divided by their number: this amortises the graph launch and
    event overhead (~4 us) the way a whole-model graph does, without letting the calls share L2.
    """

    def __init__(self, warmup: int, repeats: int, use_graphs: bool) -> None:
        self.warmup = warmup
        self.repeats = repeats
        self.use_graphs = use_graphs
        # 2x the largest Hopper L2 (50-60 MB): overwriting it evicts every line the kernel reads.
        self.flush_buf = torch.empty(128 * 2**20, dtype=torch.int8, device="cuda")

    def __call__(self, calls: Callable[[], Any] | Sequence[Callable[[], Any]]) -> float:
        """Median microseconds per call."""
        call_list = [calls] if callable(calls) else list(calls)

        def fn() -> None:
            for call in call_list:
                call()

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # compile and warm up outside the capture; capture on the same stream
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        run = fn
        if self.use_graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run = graph.replay
        for _ in range(self.warmup):
            run()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for start, end in zip(starts, ends):
            # The flush also keeps the GPU busy while the host enqueues the call, so host launch
            # latency is not counted.
            self.flush_buf.fill_(1)
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        median_ms = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
        return median_ms * 1e3 / len(call_list)


def measure_copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written, GB/s."""
    n = 2**30
    # fp32 elements: torch's byte-wise copy kernel is slower than its wide ones.
    src = torch.randn(n // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    us = timer(functools.partial(dst.copy_, src))
    return 2 * n / us / 1e3


def make_paged(
    shapes: Shapes, seqs: list[tuple[int, int]], page_size: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random bf16 cache with a shuffled block table; returns paged_attention's tensor arguments."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = [ctx + q for ctx, q in seqs]
    blocks = [math.ceil(n / page_size) for n in seq_lens]
    num_blocks = sum(blocks) + 1
    cache_shape = (num_blocks, page_size, shapes.num_kv_heads, shapes.head_dim)
    k_cache = torch.randn(cache_shape, device="cuda", dtype=dtype, generator=gen)
    v_cache = torch.randn(cache_shape, device="cuda", dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    table = torch.zeros(len(seqs), max(blocks), dtype=torch.int32, device="cuda")
    used = 0
    for s, n in enumerate(blocks):
        table[s, :n] = perm[used : used + n]
        used += n
    q_lens = torch.tensor([q for _, q in seqs], dtype=torch.int32)
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    query = torch.randn(
        int(qsl[-1]), shapes.num_heads, shapes.head_dim, device="cuda", dtype=dtype, generator=gen
    )
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    return query, k_cache, v_cache, table, seq_lens_t, qsl.cuda()


def bench_decode(
    shapes: Shapes, timer: Timer, copy_gbps: float, page_size: int, layers: int, quick: bool
) -> list[dict]:
    from kernels.triton import attention

    rows = []
    elem = 2
    scale = shapes.head_dim**-0.5
    group = shapes.num_heads // shapes.num_kv_heads
    for batch, ctx in DECODE_SHAPES[:3] if quick else DECODE_SHAPES:
        # seq_len = ctx (the new token included), so the kernel reads exactly ctx positions.
        per_layer = [
            make_paged(shapes, [(ctx - 1, 1)] * batch, page_size, torch.bfloat16, i) for i in range(layers)
        ]
        outs = [torch.empty_like(args[0]) for args in per_layer]
        kv_bytes = 2 * batch * ctx * shapes.num_kv_heads * shapes.head_dim * elem
        sms = attention.num_sms(outs[0].device)
        auto = attention.choose_num_splits(batch, batch, shapes.num_kv_heads, sms)
        # The heuristic's choice next to no split and twice its split, to show it is a local optimum.
        variants = {"auto": auto, "no_split": 1, "double_split": min(2 * auto, attention.MAX_SPLITS)}
        for label, splits in variants.items():
            if label != "auto" and splits == auto:
                continue
            programs_per_sm = batch * shapes.num_kv_heads * splits / sms
            config = attention.choose_config(batch, batch, group, shapes.head_dim, programs_per_sm)
            calls = [
                functools.partial(attention.paged_attention_launch, *args, scale, out, config, splits)
                for args, out in zip(per_layer, outs)
            ]
            us = timer(calls)
            gbps = kv_bytes / us / 1e3
            rows.append(
                {
                    "kernel": "paged_attention_decode",
                    "preset": shapes.name,
                    "variant": label,
                    "batch": batch,
                    "context": ctx,
                    "page_size": page_size,
                    "num_splits": splits,
                    "kv_bytes": kv_bytes,
                    "median_us": us,
                    "GBps": gbps,
                    "fraction_of_copy": gbps / copy_gbps,
                }
            )
        del per_layer, outs
    return rows


# Decode shapes of serving (batch, context) and the tile configurations tried on each. (A first
# sweep on the H200 also tried 256-position tiles, 8 warps and 5 stages: never among the best.)
SWEEP_SHAPES = [(16, 1024), (64, 512), (128, 768), (256, 576)]
SWEEP_TILES = (32, 64, 128)
SWEEP_WARPS = (2, 4)
SWEEP_STAGES = (2, 3, 4)


def bench_decode_sweep(
    shapes: Shapes, timer: Timer, copy_gbps: float, page_size: int, layers: int, quick: bool
) -> list[dict]:
    """The decode tile heuristic against every (tile_n, warps, stages) that fits shared memory."""
    from triton.runtime.errors import OutOfResources

    from kernels.triton import attention

    rows = []
    scale = shapes.head_dim**-0.5
    group = shapes.num_heads // shapes.num_kv_heads
    for batch, ctx in SWEEP_SHAPES[:1] if quick else SWEEP_SHAPES:
        per_layer = [
            make_paged(shapes, [(ctx - 1, 1)] * batch, page_size, torch.bfloat16, i) for i in range(layers)
        ]
        outs = [torch.empty_like(args[0]) for args in per_layer]
        kv_bytes = 2 * batch * ctx * shapes.num_kv_heads * shapes.head_dim * 2
        sms = attention.num_sms(outs[0].device)
        splits = attention.choose_num_splits(batch, batch, shapes.num_kv_heads, sms)
        programs_per_sm = batch * shapes.num_kv_heads * splits / sms
        auto = attention.choose_config(batch, batch, group, shapes.head_dim, programs_per_sm)
        configs = [auto] + [
            attention.AttentionConfig(auto.block_m, tile_n, warps, stages)
            for tile_n in SWEEP_TILES
            for warps in SWEEP_WARPS
            for stages in SWEEP_STAGES
        ]
        for i, config in enumerate(configs):
            if i > 0 and config == auto:
                continue
            calls = [
                functools.partial(attention.paged_attention_launch, *args, scale, out, config, splits)
                for args, out in zip(per_layer, outs)
            ]
            try:
                us = timer(calls)
            except OutOfResources:
                continue  # the tiles do not fit shared memory at this depth
            gbps = kv_bytes / us / 1e3
            rows.append(
                {
                    "kernel": "paged_attention_decode_sweep",
                    "preset": shapes.name,
                    "variant": "auto" if i == 0 else "sweep",
                    "batch": batch,
                    "context": ctx,
                    "tile_n": config.tile_n,
                    "num_warps": config.num_warps,
                    "num_stages": config.num_stages,
                    "num_splits": splits,
                    "median_us": us,
                    "GBps": gbps,
                    "fraction_of_copy": gbps / copy_gbps,
                }
            )
        del per_layer, outs
    return rows


LINEAR_TOKENS = (1, 16, 32, 64, 96, 128, 192, 256)


def projection_shapes(shapes: Shapes) -> dict[str, tuple[int, int]]:
    """The decoder layer's projections as (in_features, out_features)."""
    hq, hkv, d = shapes.num_heads, shapes.num_kv_heads, shapes.head_dim
    return {
        "qkv_proj": (shapes.hidden, (hq + 2 * hkv) * d),
        "o_proj": (hq * d, shapes.hidden),
        "gate_up_proj": (shapes.hidden, 2 * shapes.intermediate),
        "down_proj": (shapes.intermediate, shapes.hidden),
    }


def linear_row(
    kernel: str, preset: str, projection: str, m: int, k: int, n: int, us: float, copy_gbps: float
) -> dict:
    """A GEMM's result row: bytes of weight, input and output over the time."""
    gbps = 2 * (n * k + m * k + m * n) / us / 1e3
    return {
        "kernel": kernel,
        "preset": preset,
        "projection": projection,
        "tokens": m,
        "in_features": k,
        "out_features": n,
        "median_us": us,
        "GBps": gbps,
        "fraction_of_copy": gbps / copy_gbps,
    }


def bench_linear(shapes: Shapes, timer: Timer, copy_gbps: float, layers: int, quick: bool) -> list[dict]:
    """The model's projections (``F.linear``, cuBLAS) at decode batch sizes: weight bandwidth and
    TFLOP/s, to see where the GEMMs leave the bandwidth bound."""
    import torch.nn.functional as F

    projections = projection_shapes(shapes)
    rows = []
    for m in LINEAR_TOKENS[::3] if quick else LINEAR_TOKENS:
        for name, (k, n) in projections.items():
            calls = []
            for _ in range(layers):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                calls.append(functools.partial(F.linear, x, w))
            us = timer(calls)
            row = linear_row("linear", shapes.name, name, m, k, n, us, copy_gbps)
            rows.append({**row, "TFLOPs_achieved": 2 * m * n * k / us / 1e6})
            del calls
    return rows


LINEAR_SWEEP_TOKENS = (1, 16, 32, 64, 128, 256)


def _linear_sweep_configs(num_rows: int, out_features: int, in_features: int, sms: int) -> list:
    """Every tile / split / depth that covers the shape, fits shared memory and gives the grid
    between half a program and 32 programs per SM."""
    from kernels.triton.linear import LinearConfig

    first_m = max(16, triton_next_power_of_2(num_rows))
    block_ms = [first_m] if num_rows <= 64 else [64, 128]
    configs = []
    for block_m in block_ms:
        for block_n in (16, 32, 64, 128):
            for block_k in (64, 128, 256):
                for split in (1, 2, 4, 8):
                    for stages in (3, 4, 5):
                        for warps in (4, 8) if block_m * block_n >= 64 * 128 else (4,):
                            config = LinearConfig(block_m, block_n, block_k, split, warps, stages)
                            programs = -(-num_rows // block_m) * out_features // block_n * split
                            if (
                                config.fits(num_rows, out_features, in_features)
                                and sms / 2 <= programs <= 32 * sms
                            ):
                                configs.append(config)
    return configs


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def bench_linear_sweep(
    shapes: Shapes, timer: Timer, copy_gbps: float, layers: int, quick: bool
) -> list[dict]:
    """Every decode-sized projection of a preset: cuBLAS (``F.linear``; with cuBLASLt preferred;
    on a [K, N] copy of the weight) against every Triton skinny-GEMM tile choice."""
    import dataclasses

    import torch.nn.functional as F
    from triton.runtime.errors import OutOfResources

    from kernels.triton import linear as skinny
    from kernels.triton.launch import parallel_compile

    projections = projection_shapes(shapes)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    default_blas = torch.backends.cuda.preferred_blas_library()
    rows = []
    for m in LINEAR_SWEEP_TOKENS[:2] if quick else LINEAR_SWEEP_TOKENS:
        for name, (k, n) in projections.items():
            operands = [
                (
                    torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                    torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5,
                )
                for _ in range(layers)
            ]
            configs = _linear_sweep_configs(m, n, k, sms)
            with parallel_compile(16):  # every variant's compile at once, on threads
                for config in configs:
                    skinny.skinny_linear_launch(*operands[0], None, None, config)
            expected = F.linear(*operands[0])
            variants: list[tuple[str, Any, list]] = [
                ("cublas", None, [functools.partial(F.linear, x, w) for x, w in operands]),
            ]
            transposed = [(x, w.t().contiguous()) for x, w in operands[:layers]]
            variants.append(("cublas_kn", None, [functools.partial(torch.mm, x, wt) for x, wt in transposed]))
            variants += [
                (
                    "triton",
                    c,
                    [
                        functools.partial(skinny.skinny_linear_launch, x, w, None, None, c)
                        for x, w in operands
                    ],
                )
                for c in configs
            ]
            for label, config, calls in variants:
                try:
                    if config is not None:  # a wrong tile choice must not enter the table
                        got = calls[0]()
                        torch.testing.assert_close(got.float(), expected.float(), atol=5e-2, rtol=5e-2)
                    us = timer(calls)
                except OutOfResources:
                    continue
                config_fields = None if config is None else dataclasses.asdict(config)
                row = linear_row("linear_sweep", shapes.name, name, m, k, n, us, copy_gbps)
                rows.append({**row, "variant": label, "config": config_fields})
                if label == "cublas":  # the same calls with cuBLASLt preferred
                    torch.backends.cuda.preferred_blas_library("cublaslt")
                    try:
                        us = timer(calls)
                    finally:
                        torch.backends.cuda.preferred_blas_library(default_blas)
                    row = linear_row("linear_sweep", shapes.name, name, m, k, n, us, copy_gbps)
                    rows.append({**row, "variant": "cublaslt", "config": None})
            best: dict[str, dict] = {}
            for r in rows:
                same_shape = r["projection"] == name and r["tokens"] == m and r["preset"] == shapes.name
                if same_shape and r["median_us"] < best.get(r["variant"], {}).get("median_us", math.inf):
                    best[r["variant"]] = r
            print(
                f"{shapes.name} {name} M={m}: "
                + ", ".join(f"{v} {r['median_us']:.1f} us" for v, r in best.items())
                + f"; best triton {best.get('triton', {}).get('config')}",
                flush=True,
            )
            del operands, transposed, variants
    return rows


def bench_prefill(shapes: Shapes, timer: Timer, page_size: int, layers: int, quick: bool) -> list[dict]:
    from kernels.triton import attention

    rows = []
    scale = shapes.head_dim**-0.5
    for num_seqs, ctx, q_len in PREFILL_SHAPES[:2] if quick else PREFILL_SHAPES:
        per_layer = [
            make_paged(shapes, [(ctx, q_len)] * num_seqs, page_size, torch.bfloat16, i) for i in range(layers)
        ]
        calls = [
            functools.partial(attention.paged_attention, *args, scale, torch.empty_like(args[0]))
            for args in per_layer
        ]
        us = timer(calls)
        # Causal: query i of a sequence (0-based, after ctx cached tokens) sees ctx + i + 1 keys;
        # QK^T and PV are 2 FLOPs per multiply-add each.
        keys_seen = num_seqs * (q_len * ctx + q_len * (q_len + 1) // 2)
        flops = 4 * keys_seen * shapes.head_dim * shapes.num_heads
        rows.append(
            {
                "kernel": "paged_attention_prefill",
                "preset": shapes.name,
                "num_seqs": num_seqs,
                "cached_prefix": ctx,
                "new_tokens": q_len,
                "page_size": page_size,
                "median_us": us,
                "TFLOPs": flops / us / 1e6,
            }
        )
        del per_layer, calls
    return rows


def bench_pointwise(shapes: Shapes, timer: Timer, copy_gbps: float, layers: int, quick: bool) -> list[dict]:
    from kernels.reference import build_rope_cache
    from kernels.triton.activation import silu_and_mul
    from kernels.triton.norm import fused_add_rms_norm, rms_norm
    from kernels.triton.rope import rope_write_kv

    dt = torch.bfloat16
    elem = 2
    hq, hkv, d = shapes.num_heads, shapes.num_kv_heads, shapes.head_dim
    hidden, inter = shapes.hidden, shapes.intermediate
    rope_cache = build_rope_cache(d, 32768, shapes.rope_theta, shapes.rope_scaling, device="cuda")
    page = 16

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=dt)

    def norm_call(m: int) -> Callable[[], Any]:
        return functools.partial(rms_norm, rand(m, hidden), rand(hidden), 1e-5)

    def add_norm_call(m: int) -> Callable[[], Any]:
        return functools.partial(fused_add_rms_norm, rand(m, hidden), rand(m, hidden), rand(hidden), 1e-5)

    def silu_call(m: int) -> Callable[[], Any]:
        return functools.partial(silu_and_mul, rand(m, 2 * inter))

    def rope_kv_args(m: int) -> tuple[torch.Tensor, ...]:
        qkv = rand(m, (hq + 2 * hkv) * d)
        q = qkv[:, : hq * d].view(m, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(m, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(m, hkv, d)
        num_blocks = math.ceil(m / page) + 1
        k_cache, v_cache = rand(num_blocks, page, hkv, d), rand(num_blocks, page, hkv, d)
        slots = torch.randperm(num_blocks * page, device="cuda")[:m]
        positions = torch.randint(0, 32768, (m,), device="cuda")
        return positions, q, k, v, k_cache, v_cache, slots

    def rope_write_kv_call(m: int) -> Callable[[], Any]:
        return functools.partial(rope_write_kv, *rope_kv_args(m), rope_cache)

    def rope_kv_bytes(m: int) -> int:
        """What the fused kernel must move: q read and written, k and v read, both written to the
        cache, the cos/sin row read."""
        return (2 * hq + 2 * hkv) * m * d * elem + 2 * m * hkv * d * elem + m * d * 4

    kernels: dict[str, tuple[Callable[[int], Callable[[], Any]], Callable[[int], int]]] = {
        "rms_norm": (norm_call, lambda m: 2 * m * hidden * elem),
        "fused_add_rms_norm": (add_norm_call, lambda m: 4 * m * hidden * elem),
        "silu_and_mul": (silu_call, lambda m: 3 * m * inter * elem),
        "rope_write_kv": (rope_write_kv_call, rope_kv_bytes),
    }
    rows = []
    for m in TOKEN_COUNTS[::2] if quick else TOKEN_COUNTS:
        for kernel, (make_call, nbytes) in kernels.items():
            us = timer([make_call(m) for _ in range(layers)])
            gbps = nbytes(m) / us / 1e3
            rows.append(
                {
                    "kernel": kernel,
                    "preset": shapes.name,
                    "tokens": m,
                    "bytes": nbytes(m),
                    "median_us": us,
                    "GBps": gbps,
                    "fraction_of_copy": gbps / copy_gbps,
                }
            )
    return rows


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--presets", nargs="+", default=["llama3-8b", "smollm2-135m"])
    parser.add_argument("--presets-dir", type=Path, default=DEFAULT_PRESETS_DIR)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument(
        "--layers", type=int, default=4, help="calls per graph, each on its own buffers (like model layers)"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-graphs", action="store_true", help="time eager calls instead of graph replays")
    parser.add_argument("--quick", action="store_true", help="a few shapes per kernel only")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["decode", "decode_sweep", "prefill", "pointwise", "linear", "linear_sweep"],
        default=["decode", "prefill", "pointwise"],
    )
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("kernels_bench needs a CUDA device", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))  # `kernels` from this checkout, however the script is started
    import triton

    timer = Timer(args.warmup, args.repeats, use_graphs=not args.no_graphs)
    props = torch.cuda.get_device_properties(0)
    copy_gbps = measure_copy_bandwidth(timer)
    print(f"{props.name}: device copy {copy_gbps:.0f} GB/s (read + write)", flush=True)

    results: list[dict] = []
    for name in args.presets:
        shapes = load_shapes(name, args.presets_dir)
        if "decode" in args.only:
            results += bench_decode(shapes, timer, copy_gbps, args.page_size, args.layers, args.quick)
        if "decode_sweep" in args.only:
            results += bench_decode_sweep(shapes, timer, copy_gbps, args.page_size, args.layers, args.quick)
        if "linear" in args.only:
            results += bench_linear(shapes, timer, copy_gbps, args.layers, args.quick)
        if "linear_sweep" in args.only:
            results += bench_linear_sweep(shapes, timer, copy_gbps, args.layers, args.quick)
        if "prefill" in args.only:
            results += bench_prefill(shapes, timer, args.page_size, args.layers, args.quick)
        if "pointwise" in args.only:
            results += bench_pointwise(shapes, timer, copy_gbps, args.layers, args.quick)
        torch.cuda.empty_cache()

    for r in results:
        shape = {k: v for k, v in r.items() if k not in ("kernel", "preset", "median_us", "GBps", "TFLOPs")}
        figure = f"{r['TFLOPs']:7.1f} TFLOP/s" if "TFLOPs" in r else f"{r['GBps']:7.0f} GB/s"
        print(f"{r['kernel']:26s} {r['preset']:13s} {r['median_us']:9.1f} us {figure}  {shape}")

    report = {
        "device": props.name,
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": git_commit(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": "CUDA graph of --layers calls on separate buffers, L2 flushed before each replay, "
        "CUDA events, median of repeats divided by the calls per graph",
        "layers": args.layers,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "copy_GBps": copy_gbps,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
