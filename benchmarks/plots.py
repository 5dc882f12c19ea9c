"""Plots of benchmarks/results/*.json against the peer numbers, written as PNGs to benchmarks/plots/.

    python benchmarks/plots.py [--results-dir benchmarks/results] [--out-dir benchmarks/plots] [--tag h200]

(a) offline_throughput_<tag>.png: output tok/s by model, pagedserve vs vLLM 0.20.1 vs HF
    transformers (from throughput_*_<tag>[_*].json);
(b) single_stream_<tag>.png: single-stream ms/token by model, pagedserve vs vLLM
    (latency_*_<tag>[_*].json);
(c) serving_<model>.png: TTFT and TPOT p50/p99 against request rate, pagedserve vs vLLM
    (serving_*.json from benchmarks/serving.py; skipped when there are none).

(a) and (b) draw, per model, the single-GPU files of the build measured last (the newest
timestamp among a commit's files); where one build has several files (several engines), the
median of their figures is drawn. The x labels name that commit.

Uses matplotlib's object API (Figure, no pyplot), so no global backend or figure state is touched.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

ROOT = Path(__file__).resolve().parents[1]
MODEL_ORDER = ("llama3-8b", "llama3.2-1b", "smollm2-135m", "llama3-70b")
OURS = "pagedserve"
VLLM = "vLLM 0.20.1"
COLORS = {OURS: "#1f77b4", VLLM: "#d62728", "HF generate (batches of 64)": "#7f7f7f",
          "HF continuous batching": "#bcbd22"}  # fmt: skip
DPI = 120

# ---------------------------------------------------------------------- peer numbers
# Copied from ../shared/bench/README.md ("Peers on one NVIDIA H200, 2026-11-22 (torch 2.11, CUDA 13)"):
# vLLM 0.20.1 and HF transformers 5.17 on the shared workload, random bf16 weights. Keep in sync
# with that file; nothing here is measured by this repository.
PEER_DEVICE = "NVIDIA H200"

# Offline output tok/s, the 256-request shared workload, temperature 0.6.
PEER_OFFLINE_TOK_S: dict[str, dict[str, float]] = {
    VLLM: {"llama3-8b": 9694, "llama3.2-1b": 31187, "smollm2-135m": 36139},
    "HF generate (batches of 64)": {"llama3-8b": 402},
    "HF continuous batching": {"llama3-8b": 556},
}

# Single stream, 128-token prompt: ms per output token.
PEER_SINGLE_STREAM_MS: dict[str, dict[str, float]] = {
    VLLM: {"llama3-8b": 4.96, "llama3.2-1b": 1.40, "smollm2-135m": 1.40},
}

# The README's bandwidth bound for single-stream llama3-8b: 16.06 GB of weights at ~4.3 TB/s.
SINGLE_STREAM_BOUND_MS = {"llama3-8b": 3.74}


@dataclass(frozen=True)
class ServingPoint:
    """One row of an online serving run (times in ms); rate inf means all requests at once."""

    engine: str
    model: str
    rate: float
    num_requests: int
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float


# `vllm serve`, /v1/completions streaming, token-id prompts, ignore_eos, Poisson arrivals.
PEER_SERVING = (
    ServingPoint(VLLM, "llama3-8b", 4.0, 200, 30, 134, 5.87, 6.33),
    ServingPoint(VLLM, "llama3-8b", 12.0, 300, 40, 78, 8.11, 8.77),
    ServingPoint(VLLM, "llama3-8b", math.inf, 256, 1772, 3433, 15.1, 34.0),
    ServingPoint(VLLM, "smollm2-135m", math.inf, 256, 690, 819, 7.21, 9.61),
    ServingPoint(VLLM, "smollm2-135m", 20.0, 300, 26, 62, 2.77, 3.64),
)


# ---------------------------------------------------------------------- reading results


def load_results(results_dir: Path, pattern: str) -> list[dict[str, Any]]:
    records = []
    for path in sorted(results_dir.glob(pattern)):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
    return records


def tagged_results(results_dir: Path, kind: str, tag: str) -> list[dict[str, Any]]:
    """``<kind>_*_<tag>.json`` and ``<kind>_*_<tag>_<suffix>.json`` (a suffix names the commit or
    the run), not the files of other machine tags (``<tag>x2``)."""
    patterns = (f"{kind}_*_{tag}.json", f"{kind}_*_{tag}_*.json")
    return [record for pattern in patterns for record in load_results(results_dir, pattern)]


def tensor_parallel_size(record: dict[str, Any]) -> int:
    settings = record.get("settings") or {}
    return int(record.get("tensor_parallel_size") or settings.get("tensor_parallel_size") or 1)


def newest_build(records: list[dict[str, Any]]) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """Per model: the commit of the single-GPU build measured last and all its records."""
    builds: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        if tensor_parallel_size(record) != 1:
            continue
        # "b6a9f20 (tree as run; ...)" and full hashes name the same short commit
        commit = str(record.get("git_commit") or "?").split()[0][:7]
        builds.setdefault((model_key(str(record["model"])), commit), []).append(record)
    newest: dict[str, tuple[str, str, list[dict[str, Any]]]] = {}
    for (model, commit), group in builds.items():
        stamp = max(str(r.get("timestamp", "")) for r in group)
        if model not in newest or stamp > newest[model][0]:
            newest[model] = (stamp, commit, group)
    return {model: (commit, group) for model, (_, commit, group) in newest.items()}


def model_key(name: str) -> str:
    """A preset name from a model label or path (".../presets/llama3-8b" -> "llama3-8b")."""
    return Path(name.rstrip("/")).name


def ordered_models(models: set[str]) -> list[str]:
    known = [m for m in MODEL_ORDER if m in models]
    return known + sorted(models - set(known))


def device_of(records: list[dict[str, Any]]) -> str:
    devices = sorted({str(r.get("device", "?")) for r in records})
    return " / ".join(devices)


def device_line(records: list[dict[str, Any]]) -> str:
    """The title line naming where pagedserve and the peers ran."""
    ours = device_of(records)
    peers = "vLLM/HF numbers from ../shared/bench/README.md"
    if ours == PEER_DEVICE:
        return f"one {ours}; {peers} (same GPU)"
    return f"pagedserve on {ours}; {peers} ({PEER_DEVICE})"


# ---------------------------------------------------------------------- drawing helpers


def grouped_bars(
    ax: Axes, models: list[str], series: dict[str, dict[str, float]], fmt: str, labels: list[str]
) -> None:
    """One group per model (x label ``labels[i]``), one bar per series that has a value there,
    centred on the group (a series without a value for a model leaves no gap)."""
    width = 0.8 / max(1, len(series))
    labelled: set[str] = set()
    for i, model in enumerate(models):
        present = [name for name in series if model in series[name]]
        for j, name in enumerate(present):
            x = i + (j - (len(present) - 1) / 2) * width
            value = series[name][model]
            ax.bar(x, value, width * 0.95, color=COLORS.get(name), label=None if name in labelled else name)
            labelled.add(name)
            ax.annotate(fmt.format(value), (x, value), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")  # fmt: skip
    ax.set_xticks(range(len(models)), labels)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    print(f"wrote {path}")
    return path


# ---------------------------------------------------------------------- (a) offline throughput


def plot_offline(results_dir: Path, out_dir: Path, tag: str) -> Path | None:
    builds = newest_build(tagged_results(results_dir, "throughput", tag))
    if not builds:
        print(f"no single-GPU throughput_*_{tag}*.json in {results_dir}: skipping the offline plot")
        return None
    ours = {
        model: statistics.median(float(r["output_tokens_per_s"]) for r in group)
        for model, (_, group) in builds.items()
    }
    records = [r for _, group in builds.values() for r in group]
    models = ordered_models(set(ours))
    series = {OURS: ours, **{name: dict(v) for name, v in PEER_OFFLINE_TOK_S.items()}}
    fig = Figure(figsize=(8.5, 5))
    ax = fig.add_subplot()
    grouped_bars(ax, models, series, "{:,.0f}", [f"{m}\n({builds[m][0]})" for m in models])
    for model in models:  # the ratio that matters, above each group
        if model in PEER_OFFLINE_TOK_S[VLLM]:
            ratio = ours[model] / PEER_OFFLINE_TOK_S[VLLM][model]
            top = max(ours[model], PEER_OFFLINE_TOK_S[VLLM][model])
            ax.annotate(f"{ratio:.2f}x vLLM", (models.index(model), top), ha="center", va="bottom",
                        xytext=(0, 14), textcoords="offset points", fontweight="bold")  # fmt: skip
    ax.set_ylabel("output tokens / s (higher is better)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.set_title(
        f"Offline throughput, shared workload (256 requests, U[100,1024] in/out, ignore_eos)\n"
        f"{device_line(records)}; HF on llama3-8b only",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8)
    return save(fig, out_dir / f"offline_throughput_{tag}.png")


# ---------------------------------------------------------------------- (b) single stream


def plot_single_stream(results_dir: Path, out_dir: Path, tag: str) -> Path | None:
    builds = newest_build(tagged_results(results_dir, "latency", tag))
    if not builds:
        print(f"no single-GPU latency_*_{tag}*.json in {results_dir}: skipping the single-stream plot")
        return None
    ours = {
        model: statistics.median(float(r["ms_per_output_token_median"]) for r in group)
        for model, (_, group) in builds.items()
    }
    records = [r for _, group in builds.values() for r in group]
    models = ordered_models(set(ours))
    series = {OURS: ours, VLLM: dict(PEER_SINGLE_STREAM_MS[VLLM])}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    grouped_bars(ax, models, series, "{:.2f}", [f"{m}\n({builds[m][0]})" for m in models])
    for model, bound in SINGLE_STREAM_BOUND_MS.items():
        if model in models:
            i = models.index(model)
            ax.hlines(bound, i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1,
                      label=f"{model} weights / HBM bandwidth ({bound:.2f} ms)")  # fmt: skip
    ax.set_ylabel("ms per output token (lower is better)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    ax.set_title(
        f"Single stream: 128-token prompt, 512 greedy tokens, median of 5\n{device_line(records)}",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    return save(fig, out_dir / f"single_stream_{tag}.png")


# ---------------------------------------------------------------------- (c) online serving


def serving_point(record: dict[str, Any]) -> ServingPoint | None:
    res = record.get("results") or {}
    try:
        engine = str(record.get("engine", "?"))
        engine = VLLM if engine.lower() == "vllm" else OURS if engine == "pagedserve" else engine
        tp = int(record.get("tensor_parallel_size") or 1)
        return ServingPoint(
            engine=engine if tp == 1 else f"{engine} TP={tp}",
            model=model_key(str(record["model"])),
            rate=float(record["settings"]["request_rate"]),  # "inf" reads as math.inf
            num_requests=int(res["completed"]) + int(res["failed"]),
            ttft_p50=float(res["ttft_ms"]["p50"]),
            ttft_p99=float(res["ttft_ms"]["p99"]),
            tpot_p50=float(res["tpot_ms"]["p50"]),
            tpot_p99=float(res["tpot_ms"]["p99"]),
        )
    except (KeyError, TypeError, ValueError) as exc:  # an incomplete run (e.g. every request failed)
        print(f"skipping a serving record of {record.get('model')}: {exc!r}", file=sys.stderr)
        return None


def rate_positions(rates: list[float]) -> tuple[dict[float, float], list[float], list[str]]:
    """x positions: finite rates as themselves, "all at once" one step to the right of the largest."""
    finite = sorted({r for r in rates if not math.isinf(r)})
    inf_x = (finite[-1] * 1.5 if finite else 1.0) if any(math.isinf(r) for r in rates) else None
    positions = {r: r for r in finite}
    if inf_x is not None:
        positions[math.inf] = inf_x
    ticks = [*finite, *([inf_x] if inf_x is not None else [])]
    labels = [f"{r:g}" for r in finite] + (["all at\nonce"] if inf_x is not None else [])
    return positions, ticks, labels


def plot_serving_model(model: str, points: list[ServingPoint], device: str, out_dir: Path) -> Path:
    positions, ticks, labels = rate_positions([p.rate for p in points])
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, title in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
        engines = sorted({p.engine for p in points}, key=lambda e: (e != OURS, e))
        for index, engine in enumerate(engines):
            mine = sorted((p for p in points if p.engine == engine), key=lambda p: p.rate)
            xs = [positions[p.rate] for p in mine]
            color = COLORS.get(engine) or f"C{index + 2}"  # one colour per series, p50 and p99 alike
            for stat, style in (("p50", "-o"), ("p99", "--s")):
                ys = [getattr(p, f"{metric}_{stat}") for p in mine]
                ax.plot(xs, ys, style, color=color, label=f"{engine} {stat}", markersize=4)
        ax.set_xticks(ticks, labels)
        ax.set_yscale("log")  # all-at-once TTFT is seconds, light load tens of ms
        # Plain 1-2-5 labels ("20", "500") instead of the log axis' "2x10^1".
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel(f"{title} (ms, lower is better)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Online serving, {model}: streaming /v1/completions, shared workload - {device}", fontsize=10
    )
    return save(fig, out_dir / f"serving_{model}.png")


def plot_serving(results_dir: Path, out_dir: Path) -> list[Path]:
    records = load_results(results_dir, "serving_*.json")
    if not records:
        print(f"no serving_*.json in {results_dir}: skipping the online serving plots")
        return []
    # One point per (engine, model, rate): the newest run. Runs of other server settings belong in
    # results/variants/, which is not read.
    newest: dict[tuple[str, str, float], tuple[str, ServingPoint]] = {}
    for record in records:
        point = serving_point(record)
        if point is None:
            continue
        key = (point.engine, point.model, point.rate)
        stamp = str(record.get("timestamp", ""))
        if key not in newest or stamp >= newest[key][0]:
            newest[key] = (stamp, point)
    ours = [point for _, point in newest.values()]
    written = []
    for model in ordered_models({p.model for p in ours}):
        points = [p for p in ours if p.model == model]
        # The README's vLLM rows, unless a vLLM run of ours at the same rate replaces them.
        measured = {p.rate for p in points if p.engine == VLLM}
        points += [p for p in PEER_SERVING if p.model == model and p.rate not in measured]
        device = device_of([r for r in records if model_key(str(r.get("model", ""))) == model])
        written.append(plot_serving_model(model, points, device, out_dir))
    return written


# ---------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "plots")
    parser.add_argument("--tag", default="h200", help="device suffix of the offline result files")
    args = parser.parse_args(argv)
    plot_offline(args.results_dir, args.out_dir, args.tag)
    plot_single_stream(args.results_dir, args.out_dir, args.tag)
    plot_serving(args.results_dir, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
