"""The serving benchmark's measurements and what is made of them: per-request results, the
summary metrics, the printed table (vLLM's layout) and the JSON record.

TTFT is the time from sending a request to its first token, TPOT a request's (E2E - TTFT) /
(tokens - 1), ITL the gaps between tokens, E2E the whole request; each is summarised in
milliseconds as the mean and the percentiles of SUMMARY_PERCENTILES plus any asked for.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SUMMARY_PERCENTILES = (50.0, 90.0, 95.0, 99.0)
# --percentile-metrics name -> (key in the results, title in the table, short name)
METRICS = {
    "ttft": ("ttft_ms", "Time to First Token", "TTFT"),
    "tpot": ("tpot_ms", "Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("itl_ms", "Inter-token Latency", "ITL"),
    "e2el": ("e2e_ms", "End-to-end Latency", "E2EL"),
}
TABLE_WIDTH = 50


@dataclass(frozen=True, slots=True)
class Request:
    index: int
    prompt: list[int]
    output_len: int


@dataclass(slots=True)
class Result:
    """One request's measurements; times are seconds from its send (``sent_s``: from the run start)."""

    index: int
    prompt_len: int
    requested_output_len: int
    sent_s: float = 0.0
    success: bool = False
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    chunks: int = 0
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def percentile_key(p: float) -> str:
    """``p99``, ``p99.9``: the JSON key of a percentile."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


def summarize(values_s: Sequence[float], extra: Iterable[float] = ()) -> dict[str, float | None]:
    """Mean and percentiles in milliseconds (None for an empty sample)."""
    percentiles = sorted({*SUMMARY_PERCENTILES, *extra})
    if not values_s:
        return {"mean": None, **{percentile_key(p): None for p in percentiles}}
    values_ms = 1000.0 * np.asarray(values_s, dtype=np.float64)
    stats = {"mean": float(values_ms.mean())}
    stats.update({percentile_key(p): float(np.percentile(values_ms, p)) for p in percentiles})
    return stats


def metrics(
    results: list[Result], duration: float, ignore_eos: bool, extra_percentiles: Iterable[float] = ()
) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    extra = tuple(extra_percentiles)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        # With ignore_eos a request that returned another length than it asked for is a server bug.
        "output_len_mismatches": sum(r.output_tokens != r.requested_output_len for r in ok)
        if ignore_eos
        else 0,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": summarize([r.ttft_s for r in ok], extra),
        "tpot_ms": summarize([t for r in ok if (t := r.tpot_s) is not None], extra),
        "itl_ms": summarize([gap for r in ok for gap in r.itl_s], extra),
        "e2e_ms": summarize([r.e2e_s for r in ok], extra),
    }


def request_records(results: list[Result]) -> list[dict[str, Any]]:
    """Per-request rows for the JSON (without the ITL lists, which would dwarf everything else)."""
    rows = []
    for r in results:
        row = {k: v for k, v in asdict(r).items() if k != "itl_s"}
        row["tpot_s"] = r.tpot_s
        rows.append(row)
    return rows


def _line(label: str, value: Any, digits: int = 2) -> str:
    text = "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return f"{label:<40}{text}"


def format_table(record: dict[str, Any], names: Sequence[str], percentiles: Sequence[float]) -> str:
    """The summary as vLLM prints it: totals, then mean / median / percentiles per metric."""
    res, settings = record["results"], record["settings"]
    rate = float(settings["request_rate"])
    lines = [
        " Serving Benchmark Result ".center(TABLE_WIDTH, "="),
        _line("Engine / model:", f"{record['engine']} / {record['model']}"),
        _line("Request rate (req/s):", "inf" if math.isinf(rate) else rate),
        _line("Maximum request concurrency:", settings["max_concurrency"]),
        _line("Successful requests:", res["completed"]),
        _line("Failed requests:", res["failed"]),
        _line("Benchmark duration (s):", res["duration_s"]),
        _line("Total input tokens:", res["total_input_tokens"]),
        _line("Total generated tokens:", res["total_output_tokens"]),
        _line("Request throughput (req/s):", res["request_throughput"]),
        _line("Output token throughput (tok/s):", res["output_throughput"]),
        _line("Total token throughput (tok/s):", res["total_token_throughput"]),
    ]
    for name in names:
        key, title, short = METRICS[name]
        stats = res[key]
        lines.append(title.center(TABLE_WIDTH, "-"))
        lines.append(_line(f"Mean {short} (ms):", stats["mean"]))
        lines.append(_line(f"Median {short} (ms):", stats["p50"]))
        for p in percentiles:
            lines.append(_line(f"P{p:g} {short} (ms):", stats[percentile_key(p)]))
    if res["output_len_mismatches"]:
        lines.append(f"WARNING: {res['output_len_mismatches']} requests returned another output length")
    lines.append("=" * TABLE_WIDTH)
    return "\n".join(lines)


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as JSON can hold them, with no API key in them."""
    settings = {**vars(args), "api_key": "<set>" if args.api_key else None}
    if math.isinf(args.request_rate):
        settings["request_rate"] = "inf"  # strict JSON has no infinity; float("inf") reads it back
    return settings
