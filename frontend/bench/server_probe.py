"""Where a served request's time goes, seen from outside the server being measured.

Two probes the serving benchmark takes before and after its run:

* the server's Prometheus histograms (``/metrics``, vLLM's names under any prefix: ``vllm:`` or
  ``pagedserve:``): the mean time to first token, queue time and end-to-end latency the server
  itself measured, so that the client's TTFT splits into server time and transport;
* CPU seconds of the server's processes (``/proc``, Linux, when the server's pid is given) and of
  the load generator itself: a process near one core per second of wall time is a bottleneck that
  turns into queueing delay, not GPU time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Histogram base names (after the prefix) whose means the benchmark reports.
HISTOGRAMS = (
    "time_to_first_token_seconds",
    "request_queue_time_seconds",
    "time_per_output_token_seconds",
    "e2e_request_latency_seconds",
)
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)$")


def histogram_totals(text: str) -> dict[str, tuple[float, float]]:
    """(sum, count) per histogram of HISTOGRAMS in a Prometheus text exposition, summed over labels."""
    totals: dict[str, list[float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name = match["name"].rsplit(":", 1)[-1]
        for base in HISTOGRAMS:
            if name in (f"{base}_sum", f"{base}_count"):
                entry = totals.setdefault(base, [0.0, 0.0])
                entry[name.endswith("_count")] += float(match["value"])
    return {base: (s, c) for base, (s, c) in totals.items()}


def histogram_means_ms(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float | None]:
    """Mean of each histogram over the observations made between the two scrapes, in ms."""
    means: dict[str, float | None] = {}
    for base, (total, count) in after.items():
        total0, count0 = before.get(base, (0.0, 0.0))
        n = count - count0
        means[base.removesuffix("_seconds") + "_mean_ms"] = 1000.0 * (total - total0) / n if n > 0 else None
    return means


def process_tree_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """{pid: (command name, CPU seconds so far)} for a process and all its descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    seen: dict[int, tuple[str, float]] = {}
    pending = [pid]
    while pending:
        current = pending.pop()
        proc = Path(f"/proc/{current}")
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            children = [
                int(c) for task in (proc / "task").iterdir() for c in (task / "children").read_text().split()
            ]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        # Fields after the parenthesised command: utime and stime are the 12th and 13th.
        fields = stat.rsplit(")", 1)[1].split()
        seen[current] = (_label(cmdline), (int(fields[11]) + int(fields[12])) / tick)
        pending.extend(children)
    return seen


def _label(cmdline: str) -> str:
    if "-m frontend" in cmdline or "pagedserve serve" in cmdline:
        return "frontend"
    if "resource_tracker" in cmdline:
        return "resource_tracker"
    if "pagedserve-engine-core" in cmdline:
        return "engine core"
    if "pagedserve-worker-" in cmdline:
        return "worker " + cmdline.rsplit("pagedserve-worker-", 1)[1].split(" ", 1)[0]
    return cmdline.split(" ", 1)[0].rsplit("/", 1)[-1] or "?"


def cpu_utilisation(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], seconds: float
) -> list[dict[str, object]]:
    """CPU seconds per wall second for each process alive at both probes."""
    rows = []
    for pid, (name, cpu) in after.items():
        if pid in before and seconds > 0:
            rows.append({"pid": pid, "process": name, "cpu_per_wall_s": (cpu - before[pid][1]) / seconds})
    return rows
