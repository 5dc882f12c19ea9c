"""Running user code the ways users run it, and checking that nothing it started outlives it.

A script runs as a file, piped into ``python -``, under ``python -c``, typed into the interactive
interpreter (``python -i`` reading stdin), or as a notebook cell (exec'd into a fresh ``__main__``
module that has neither a file nor a spec, as Jupyter kernels run cells). Every process the script
starts inherits a marker in its environment, so any survivor is found in /proc afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("file", "stdin", "command", "interactive", "notebook")
_MARKER_VAR = "PAGEDSERVE_TEST_SCRIPT_MARKER"

# A notebook kernel: cells are exec'd into a __main__ module with no __file__ and no __spec__.
_NOTEBOOK_DRIVER = """
import sys, types
cell = sys.stdin.read()
main = types.ModuleType("__main__")
main.__dict__["__builtins__"] = __builtins__
sys.modules["__main__"] = main
exec(compile(cell, "<cell>", "exec"), main.__dict__)
"""


def run_user_code(
    code: str, mode: str, workdir: Path, timeout: float = 300.0
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``code`` in ``mode``; returns the finished process and the command lines of processes
    it started that are still alive 10 s after it exited (there must be none)."""
    marker = uuid.uuid4().hex
    env = dict(os.environ, **{_MARKER_VAR: marker, "TOKENIZERS_PARALLELISM": "false"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    stdin: str | None = None
    if mode == "file":
        script = workdir / "user_script.py"
        script.write_text(code)
        argv = [sys.executable, str(script)]
    elif mode == "stdin":
        argv, stdin = [sys.executable, "-"], code
    elif mode == "command":
        argv = [sys.executable, "-c", code]
    elif mode == "interactive":
        # The interactive interpreter ends a compound statement at a blank line, as a user would.
        argv, stdin = [sys.executable, "-i", "-q"], code + "\n\n"
    elif mode == "notebook":
        argv, stdin = [sys.executable, "-c", _NOTEBOOK_DRIVER], code
    else:
        raise ValueError(f"unknown mode {mode!r}")
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=workdir, env=env
    )
    return done, survivors(marker)


def survivors(marker: str, wait_s: float = 10.0) -> list[str]:
    deadline = time.monotonic() + wait_s
    while True:
        alive = _marked_processes(marker)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _marked_processes(marker: str) -> list[str]:
    needle = f"{_MARKER_VAR}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":  # exited, not yet reaped by its adopter
                continue
            found.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


def readme_blocks(language: str) -> list[str]:
    """The README's fenced code blocks in ``language``, in order."""
    blocks, current, fence = [], [], None
    for line in (REPO / "README.md").read_text().splitlines():
        if fence is None and line.startswith("```"):
            fence = line[3:].strip()
            current = []
        elif fence is not None and line.startswith("```"):
            if fence == language:
                blocks.append("\n".join(current) + "\n")
            fence = None
        elif fence is not None:
            current.append(line)
    return blocks
