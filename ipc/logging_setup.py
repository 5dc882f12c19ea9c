"""One logging set-up for every process kind: the API server / library frontend, the engine core,
and each worker rank.

Line format: ``INFO 12-05 10:00:00 [engine pid=4242] core.engine_core: message``.

Only the project's own loggers (``core``, ``frontend``, ``workers``, ``kernels``, ``ipc``) are
configured, each with the one shared handler and ``propagate=False``; the root logger is never
touched. So, as with vLLM's own ``vllm`` logger, a script that uses LLM/AsyncLLM keeps its
``logging.basicConfig`` working for its own loggers (installing a handler on the root would make
a later ``basicConfig`` a silent no-op), and no project line is printed twice.

The level is, in order: the ``level`` argument (the ``--log-level`` flag, or the level a parent
process passes to its child), ``PAGEDSERVE_LOGGING_LEVEL``, then INFO.
``PAGEDSERVE_CONFIGURE_LOGGING=0`` leaves logging to the user in every process (vLLM's
``VLLM_CONFIGURE_LOGGING``). The handler itself is the process's record of the set-up: there is
no module state.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

PROJECT_LOGGERS = ("core", "frontend", "workers", "kernels", "ipc")
LEVEL_ENV = "PAGEDSERVE_LOGGING_LEVEL"
CONFIGURE_ENV = "PAGEDSERVE_CONFIGURE_LOGGING"
LEVEL_NAMES = ("debug", "info", "warning", "error", "critical")
DATE_FORMAT = "%m-%d %H:%M:%S"


class ProcessLogHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is at the time of the record (a redirect made after the
    set-up, as pytest's capture does, is followed) with the process's tag in every line."""

    def __init__(self, process_tag: str) -> None:
        super().__init__()
        self.process_tag = process_tag
        tag = process_tag.replace("%", "%%")  # the tag is literal text in the format string
        self.setFormatter(
            logging.Formatter(
                f"%(levelname)s %(asctime)s [{tag} pid=%(process)d] %(name)s: %(message)s", DATE_FORMAT
            )
        )

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass  # StreamHandler.__init__ assigns one; the property always answers sys.stderr


def parse_level(level: int | str, source: str = "log level") -> int:
    """A level name (any case; one of LEVEL_NAMES) or a logging level number."""
    if isinstance(level, bool) or not isinstance(level, int | str):
        raise ValueError(f"{source} must be a level name or number, got {level!r}")
    if isinstance(level, int):
        return level
    name = level.strip().lower()
    if name not in LEVEL_NAMES:
        raise ValueError(f"{source} must be one of {', '.join(LEVEL_NAMES)}, got {level!r}")
    return logging.getLevelNamesMapping()[name.upper()]


def configure_logging_enabled() -> bool:
    value = os.environ.get(CONFIGURE_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{CONFIGURE_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def installed_handler() -> ProcessLogHandler | None:
    """The handler a previous setup_logging call in this process installed, if any."""
    return next(
        (h for h in logging.getLogger(PROJECT_LOGGERS[0]).handlers if isinstance(h, ProcessLogHandler)), None
    )


def setup_logging(process_tag: str, level: int | str | None = None) -> int | None:
    """Configure the project's loggers for this process; returns the level in force, or None when
    ``PAGEDSERVE_CONFIGURE_LOGGING=0`` leaves logging to the user.

    Idempotent: the first call in a process installs the handler with ``process_tag`` (one process
    has one tag, so the API server's set-up is not renamed by the AsyncLLM it then creates); a
    later call changes only the level, and only when it names one."""
    if not configure_logging_enabled():
        return None
    handler = installed_handler()
    if handler is not None and level is None:
        return logging.getLogger(PROJECT_LOGGERS[0]).level
    if level is not None:
        resolved = parse_level(level)
    else:
        env = os.environ.get(LEVEL_ENV)
        resolved = parse_level(env, LEVEL_ENV) if env else logging.INFO
    if handler is None:
        handler = ProcessLogHandler(process_tag)
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(resolved)
        logger.propagate = False
        if handler not in logger.handlers:
            logger.addHandler(handler)
    return resolved
