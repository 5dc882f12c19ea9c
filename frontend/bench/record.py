"""What every benchmark result records about its run: versions, device, command, git commit."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from frontend.cli import engine_args_from

# The source tree the package runs from (a checkout has its .git here; an installed wheel does not).
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def git(*args: str) -> str:
    """Output of a git command in the source tree, or "" where there is no git (the GPU machine,
    an installed wheel)."""
    try:
        return subprocess.run(
            ["git", *args], cwd=SOURCE_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def environment() -> dict[str, Any]:
    """Versions, host, device, command line and git commit of this run."""
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


def add_result_args(group: argparse._ArgumentGroup) -> None:
    """The offline benchmarks' output flags (vLLM names the file --output-json)."""
    group.add_argument("--result-file", "--output-json", dest="result_file", default=None,
                       help="Write the results as JSON here.")  # fmt: skip
    group.add_argument("--disable-tqdm", action="store_true", help="Show no progress bar.")


def model_label(args: argparse.Namespace) -> str:
    """The model's name in an offline result: the first --served-model-name, else --model."""
    engine_args = engine_args_from(args)
    return engine_args.served_model_name or engine_args.model


def write_result(path: str | Path, record: dict[str, Any], echo: bool = True) -> None:
    """Write the record as JSON; ``echo`` prints it too (the GPU suites grep the printed figures),
    otherwise one line names the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=1)
    path.write_text(text)
    print(text if echo else f"wrote {path}")
