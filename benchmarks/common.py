"""Shared pieces of the benchmarks: model presets, the result records. The workload and the
run's record (environment, git state) are the packaged ones of frontend.bench, re-exported here."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

from frontend.bench.datasets import make_workload
from frontend.bench.record import environment, git, write_result

__all__ = ["environment", "git", "make_workload", "resolve_preset", "write_result"]

ROOT = Path(__file__).resolve().parents[1]
PRESET_DIRS = (ROOT.parent / "shared" / "bench" / "presets", ROOT / "benchmarks" / "presets")


def resolve_preset(model: str) -> str:
    """A preset name (llama3-8b, llama3.2-1b, smollm2-135m, llama3-70b) or any model path."""
    for base in PRESET_DIRS:
        if (base / model / "config.json").is_file():
            return str(base / model)
    return model


def cpu_model() -> str:
    """The CPU's model name (for result records of CPU-side benchmarks)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_bench_record(
    name: str,
    description: str,
    load_before: float,
    versions: dict[str, str],
    params: dict[str, Any],
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    """The result record of a CPU-side benchmark (ring, engine loop): the host, its load before
    and after (other tenants move these numbers a lot on a shared box), versions, git state."""
    return {
        "benchmark": name,
        "description": description,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "device": {
            "kind": "cpu",
            "cpu_model": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)),
            "machine": platform.machine(),
            "kernel": platform.release(),
            "loadavg_1m_before": load_before,
            "loadavg_1m_after": os.getloadavg()[0],
        },
        "versions": {"python": platform.python_version(), **versions},
        "git": {
            "commit": git("rev-parse", "HEAD") or "none (no commit yet)",
            "dirty": bool(git("status", "--porcelain")),
        },
        "params": params,
        "results": results,
    }


def save_json(path: str | Path, record: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
