"""The wire contract: every message that crosses a process boundary.

frontend <-> engine core: EngineCoreRequest in, EngineCoreOutputs out.
engine core <-> workers:   SchedulerOutput in (a diff against the worker's persistent batch),
                           ModelRunnerOutput out (rank 0 only).

All are msgspec Structs with ``array_like=True`` (field names never go on the wire),
``omit_defaults=True`` and ``gc=False`` (no cycles; the GC need not track them). Bump
WIRE_SCHEMA_VERSION whenever a field changes meaning or position.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from ipc.sampling_params import SamplingParams

WIRE_SCHEMA_VERSION = 4


class _Wire(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, kw_only=True):
    pass


class FinishReason(enum.IntEnum):
    STOP = 0
    LENGTH = 1
    ABORT = 2
    ERROR = 3

    def __str__(self) -> str:
        return self.name.lower()


# ---------------------------------------------------------------- frontend <-> engine core


class EngineCoreRequest(_Wire):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # The tokenizer's EOS: it ends the request (stop_reason None) unless ignore_eos.
    eos_token_id: int | None = None
    arrival_time: float = 0.0
    priority: int = 0
    # Isolates this request's prefix-cache entries: only requests with the same salt share KV.
    cache_salt: str | None = None
    # The model's other EOS ids (its generation config's): each ends the request as a stop token
    # (stop_reason the id) unless ignore_eos. min_tokens masks all of them either way, as vLLM.
    extra_eos_token_ids: list[int] = msgspec.field(default_factory=list)


class TokenLogprobs(_Wire):
    """Logprobs for one generated position: the sampled token first, then the top-k."""

    token_ids: list[int]
    logprobs: list[float]
    sampled_rank: int  # 1-based rank of the sampled token in the full distribution


class EngineCoreOutput(_Wire):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # with FinishReason.ERROR: why the engine refused or failed it
    first_scheduled_time: float | None = None  # set on a request's first output (queue time)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(_Wire):
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks in use, in [0, 1]
    prefix_cache_queries: int = 0  # tokens looked up since the last stats (a delta)
    prefix_cache_hits: int = 0  # tokens found since the last stats (a delta)
    num_preemptions: int = 0  # preemptions since the last stats (a delta)
    num_prompt_tokens: int = 0  # prompt tokens computed since the last stats (a delta)
    num_generation_tokens: int = 0  # tokens generated since the last stats (a delta)


class EngineCoreOutputs(_Wire):
    outputs: list[EngineCoreOutput] = msgspec.field(default_factory=list)
    scheduler_stats: SchedulerStats | None = None
    timestamp: float = 0.0
    # Set on the last message of an engine core that hit a fatal error; it exits right after.
    engine_error: str | None = None


# ---------------------------------------------------------------- engine core <-> workers


class NewRequestData(_Wire):
    """A request the worker has not seen (or must rebuild after a preemption)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    output_token_ids: list[int] = msgspec.field(default_factory=list)  # non-empty when resumed
    # Masked, with stop_token_ids, until min_tokens are out (even with ignore_eos, as vLLM).
    eos_token_id: int | None = None
    extra_eos_token_ids: list[int] = msgspec.field(default_factory=list)


class CachedRequestData(_Wire):
    """Requests already in the worker's persistent batch: only what changed."""

    req_ids: list[str] = msgspec.field(default_factory=list)
    new_block_ids: list[list[int]] = msgspec.field(default_factory=list)
    num_computed_tokens: list[int] = msgspec.field(default_factory=list)


class SchedulerOutput(_Wire):
    scheduled_new_reqs: list[NewRequestData] = msgspec.field(default_factory=list)
    scheduled_cached_reqs: CachedRequestData = msgspec.field(default_factory=CachedRequestData)
    num_scheduled_tokens: dict[str, int] = msgspec.field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # Requests the worker must drop from its persistent batch (finished, aborted or preempted).
    finished_req_ids: list[str] = msgspec.field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


class ModelRunnerOutput(_Wire):
    """One entry per request that sampled a token this step, in the same order as ``req_ids``."""

    req_ids: list[str] = msgspec.field(default_factory=list)
    sampled_token_ids: list[int] = msgspec.field(default_factory=list)
    logprobs: dict[str, TokenLogprobs] = msgspec.field(default_factory=dict)


EMPTY_MODEL_RUNNER_OUTPUT = ModelRunnerOutput()


# ---------------------------------------------------------------- handshake and utility calls


class Handshake(_Wire):
    """The first message on every new connection, in both directions.

    Every frame header already carries the version, but the handshake lets the receiver fail at
    startup with who the peer is (``role``, ``pid``) rather than on the first request.
    """

    wire_schema_version: int
    role: str  # "frontend", "engine_core", "worker"
    pid: int = 0
    info: dict[str, Any] = msgspec.field(default_factory=dict)  # role-specific facts (e.g. num_gpu_blocks)


class UtilityCall(_Wire):
    """A request to run ``method(*args)`` in the peer (e.g. reset_prefix_cache, profile)."""

    call_id: int
    method: str
    args: list[Any] = msgspec.field(default_factory=list)  # arrays and tensors allowed (raw frames)


class UtilityResult(_Wire):
    """The answer to a UtilityCall with the same ``call_id``: a result, or an error message."""

    call_id: int
    result: Any = None
    error: str | None = None
