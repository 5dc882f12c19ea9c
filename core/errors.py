"""Errors that cross the engine's layers."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine (core process or a worker) is gone: every in-flight request fails with this,
    and new requests are refused at once."""


class WorkerDiedError(EngineDeadError):
    """A worker process exited while the engine needed it."""
