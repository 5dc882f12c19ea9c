"""Shared pieces of the benchmarks: the workload, model presets, the result record."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRESET_DIRS = (ROOT.parent / "shared" / "bench" / "presets", ROOT / "benchmarks" / "presets")


def make_workload(n: int = 256, lin=(100, 1024), lout=(100, 1024), vocab: int = 10000, seed: int = 0):
    """The shared workload of ../shared/bench/workload.py (same seeded draws, same order):
    token-id prompts of U[lin] length and output lengths of U[lout]."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(lin[0], lin[1] + 1, size=n)
    out_lens = rng.integers(lout[0], lout[1] + 1, size=n)
    prompts = [rng.integers(0, vocab, size=int(length)).tolist() for length in in_lens]
    return prompts, [int(x) for x in out_lens]


def resolve_preset(model: str) -> str:
    """A preset name (llama3-8b, llama3.2-1b, smollm2-135m, llama3-70b) or any model path."""
    for base in PRESET_DIRS:
        if (base / model / "config.json").is_file():
            return str(base / model)
    return model


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    try:
        import transformers
        import triton

        info["triton"], info["transformers"] = triton.__version__, transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["num_gpus"] = torch.cuda.device_count()
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
    # The GPU machine gets a copy of the tree without .git: the caller passes the commit along.
    info["git_commit"] = os.environ.get("PAGEDSERVE_GIT_COMMIT") or git("rev-parse", "HEAD") or "unknown"
    return info


def write_result(path: str | Path, record: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


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


def git(*args: str) -> str:
    """Output of a git command in the repo, or "" where there is no git (the GPU machine)."""
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


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
