"""``python -m frontend --model MODEL [flags]``: the OpenAI-compatible server (see frontend.cli)."""

from __future__ import annotations

import sys

from frontend.cli import run

# The guard matters: the engine core starts with multiprocessing's "spawn", which re-imports the
# main module in the child.
if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], prog="python -m frontend"))
