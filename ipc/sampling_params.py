"""SamplingParams: how one request samples, as it travels on the wire.

It lives in ipc/ rather than core/ because it is part of the wire contract (EngineCoreRequest and
the worker's NewRequestData carry it) and ipc/ may import nothing above it. core/ and frontend/
re-export it. Validation happens in ``__post_init__``, which msgspec also runs on decode, so a
malformed message can never build an invalid object.
"""

from __future__ import annotations

import enum
import math

import msgspec

# Sampling with a temperature below this is treated as greedy (as vLLM does).
_GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20


class RequestOutputKind(enum.IntEnum):
    CUMULATIVE = 0  # every output carries all text/tokens so far
    DELTA = 1  # every output carries only what is new
    FINAL_ONLY = 2  # one output, when the request finishes


class SamplingParams(msgspec.Struct, omit_defaults=True, gc=False, kw_only=True):
    """Sampling parameters with vLLM's names and defaults.

    Every field is honoured by the engine; values the engine cannot honour raise ``ValueError``
    naming the field, never a silent default.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, vLLM's old spelling) disables top-k
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    detokenize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            # OpenAI clients send token ids as JSON object keys, i.e. strings.
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise ValueError("logit_bias keys must be token ids (integers)") from None
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{field} {why}")

        if self.n < 1:
            raise bad("n", f"must be at least 1, got {self.n}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise bad(name, f"must be in [-2, 2], got {value}.")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", f"must be greater than zero, got {self.repetition_penalty}.")
        if not math.isfinite(self.temperature) or self.temperature < 0.0:
            raise bad("temperature", f"must be non-negative, got {self.temperature}.")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise bad("top_k", f"must be 0 or -1 (disable) or at least 1, got {self.top_k}.")
        if not math.isfinite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", f"must be at least 1, got {self.max_tokens}.")
        if self.min_tokens < 0:
            raise bad("min_tokens", f"must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(
                "min_tokens",
                f"must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}.",
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}.")
        if self.prompt_logprobs is not None:
            raise bad("prompt_logprobs", "is not supported by this engine.")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must contain only non-empty strings.")
        if any(t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must contain only non-negative token ids.")
        if self.logit_bias:
            for token_id, bias in self.logit_bias.items():
                if token_id < 0:
                    raise bad("logit_bias", f"has a negative token id {token_id}.")
                if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                    raise bad("logit_bias", f"values must be in [-100, 100], got {bias}.")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise bad("seed", "must fit in a signed 64-bit integer.")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE

    def clone(self, **changes: object) -> SamplingParams:
        return msgspec.structs.replace(self, **changes)
