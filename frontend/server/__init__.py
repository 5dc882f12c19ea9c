"""The OpenAI-compatible HTTP server (``python -m frontend`` / ``pagedserve serve``).

Modules: ``protocol`` (request and response shapes), ``errors`` (OpenAI-shaped errors),
``serving`` (what every generation route shares: state, streaming, disconnects),
``completions`` and ``chat`` (the two generation routes), ``metrics`` (Prometheus) and ``app``
(the starlette app factory and the small routes). The CLI that builds the configs lives in
``frontend.cli``.

Only the frozen server configuration lives here, so that importing it stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What the HTTP layer needs to know, fixed at startup from the command line."""

    model: str  # the --model string as typed
    served_model_names: tuple[str, ...]  # the first one is reported in responses
    host: str | None = None  # None: every interface, as vLLM
    port: int = 8000
    # Bearer keys accepted under /v1; empty means no authentication. Read once, at startup.
    api_keys: tuple[str, ...] = ()
    uvicorn_log_level: str = "info"
    log_level: str | None = None  # None: $PAGEDSERVE_LOGGING_LEVEL, else info (ipc.logging_setup)
    disable_log_requests: bool = False
    # How long a SIGINT/SIGTERM waits for in-flight responses before cancelling them.
    graceful_shutdown_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
