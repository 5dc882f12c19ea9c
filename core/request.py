"""Per-request state owned by the engine core."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from core.kv_cache.hashing import prefix_cache_key
from ipc.messages import EngineCoreRequest, FinishReason, TokenLogprobs
from ipc.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED = 3


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    arrival_time: float
    priority: int = 0
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache (or scheduled into it this step).
    num_computed_tokens: int = 0
    # Prompt tokens that came from the prefix cache at the first admission.
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    # Tokens being sampled by steps in flight (async scheduling): scheduled as inputs of the next
    # step before their values are known on the host.
    num_output_placeholders: int = 0
    # Hashes of the full blocks of all_token_ids so far (the prefix-cache chain), append-only.
    block_hashes: list[bytes] = field(default_factory=list)
    # Mixed into every block hash (core.kv_cache.hashing.prefix_cache_key): requests share cached
    # KV only when their keys are equal, so tenants (cache_salt) and adapters never share it.
    prefix_cache_key: bytes = b""
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)
    first_scheduled_time: float | None = None
    # The model's EOS ids besides eos_token_id (EngineCoreRequest.extra_eos_token_ids).
    extra_eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_engine_core_request(cls, req: EngineCoreRequest) -> Request:
        return cls(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            sampling_params=req.sampling_params,
            eos_token_id=req.eos_token_id,
            arrival_time=req.arrival_time or time.time(),
            priority=req.priority,
            extra_eos_token_ids=tuple(req.extra_eos_token_ids),
            prefix_cache_key=prefix_cache_key(cache_salt=req.cache_salt),
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @property
    def max_tokens(self) -> int:
        # None means "until max_model_len": the scheduler enforces that bound separately.
        mt = self.sampling_params.max_tokens
        return mt if mt is not None else 1 << 62
