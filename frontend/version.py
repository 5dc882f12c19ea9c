"""The package version, as ``pagedserve --version`` and ``GET /version`` report it."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

DISTRIBUTION = "pagedserve"
# A source tree run without installing carries its version in pyproject.toml, next to frontend/.
_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def package_version() -> str:
    """The installed distribution's version; from a source tree that is not installed, the
    version in its pyproject.toml; "0+unknown" where neither exists."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        project = tomllib.loads(_PYPROJECT.read_text())["project"]
    except (OSError, tomllib.TOMLDecodeError, KeyError):
        return "0+unknown"
    return str(project.get("version", "0+unknown"))
