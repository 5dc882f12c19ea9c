"""The OpenAI protocol as msgspec Structs: request bodies (decoded strictly) and response bodies.

Requests are decoded with ``forbid_unknown_fields`` and msgspec's strict typing, so a misspelt
parameter or a wrong type is a 400 naming the field rather than a silently ignored value (the
OpenAI API itself refuses unknown arguments). Parameters OpenAI defines but this engine cannot
honour (tools, structured output, ...) are declared so that they can be refused by name.

Field names and defaults follow the OpenAI API plus vLLM's extra sampling parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from frontend.server.errors import APIError, bad_request, from_decode_error, from_value_error
from ipc.sampling_params import MAX_LOGPROBS, RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

_SAMPLING_FIELDS = frozenset(f.name for f in msgspec.structs.fields(SamplingParams))


# ---------------------------------------------------------------------------------------- requests


# forbid_unknown_fields is inherited by subclasses; kw_only is not, so each class repeats it
# (it lets required fields such as ``prompt`` follow the shared optional ones).
class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in msgspec.structs.fields(cls)) | _SAMPLING_FIELDS


class StreamOptions(_Request, kw_only=True):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None  # vLLM extra: usage on every chunk


class _GenerationRequest(_Request, kw_only=True):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    # An end-user id for the caller's abuse monitoring; it changes nothing about the answer.
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extra sampling parameters.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None  # SamplingParams refuses it, saying why
    # Only requests with the same salt share prefix-cache entries (vLLM's field).
    cache_salt: str | None = None

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options can only be set when stream is true.", "stream_options")
        if self.cache_salt is not None and not self.cache_salt:
            raise bad_request("cache_salt must be a non-empty string if provided.", "cache_salt")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    def to_sampling_params(
        self,
        *,
        max_tokens: int,
        logprobs: int | None,
        vocab_size: int,
        kind: RequestOutputKind,
        defaults: Mapping[str, float | int],
    ) -> SamplingParams:
        """The body's SamplingParams. A sampling field the body leaves out (or sends as null) takes
        the model's default from ``defaults`` (GenerationDefaults.sampling_defaults), else vLLM's."""

        def pick(name: str, neutral: float) -> Any:
            value = getattr(self, name)
            return defaults.get(name, neutral) if value is None else value

        if self.logit_bias:
            bad = next((t for t in self.logit_bias if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise bad_request(
                    f"logit_bias has token id {bad}, outside the vocabulary [0, {vocab_size}).", "logit_bias"
                )
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        try:
            return SamplingParams(
                n=self.n,
                temperature=pick("temperature", 1.0),
                top_p=pick("top_p", 1.0),
                top_k=pick("top_k", 0),
                min_p=pick("min_p", 0.0),
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=pick("repetition_penalty", 1.0),
                seed=self.seed,
                stop=stop,
                stop_token_ids=list(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=self.prompt_logprobs,
                include_stop_str_in_output=self.include_stop_str_in_output,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
                logit_bias=dict(self.logit_bias) if self.logit_bias else None,
                output_kind=kind,
            )
        except ValueError as exc:
            raise from_value_error(exc, self.field_names()) from None


class CompletionRequest(_GenerationRequest, kw_only=True):
    prompt: str | list[str | int | list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM extra: let the tokenizer add BOS where it would

    def check_supported(self) -> None:
        self.check_common()
        if self.suffix is not None:
            raise bad_request(
                "suffix is not supported: this engine does not do fill-in-the-middle.", "suffix"
            )
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(
                f"best_of={self.best_of} is not supported; only best_of equal to n ({self.n}) is.", "best_of"
            )
        if self.echo and self.logprobs is not None:
            raise bad_request(
                "echo with logprobs needs the prompt's logprobs, which this engine does not compute.",
                "logprobs",
            )

    def prompt_inputs(self) -> list[str | list[int]]:
        """The prompt as a batch: each item a text or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty.", "prompt")
        kinds = {type(item) for item in prompt}
        if kinds == {int}:
            return [list(prompt)]  # type: ignore[arg-type]
        if kinds == {str} or kinds == {list}:
            return list(prompt)  # type: ignore[arg-type]
        raise bad_request(
            "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists; "
            "it mixes these.",
            "prompt",
        )


class ChatCompletionRequest(_GenerationRequest, kw_only=True):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None  # None: whatever room max_model_len leaves
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # OpenAI parameters this engine does not implement: declared so they are refused by name.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None  # tags for stored completions; informational here
    service_tier: str | None = None
    # vLLM extras for rendering the chat template.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the template writes its own special tokens
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        self.check_common()
        if not self.messages:
            raise bad_request("messages must not be empty.", "messages")
        if self.tools:
            raise bad_request("tools are not supported by this server (no tool-call parsing).", "tools")
        if self.tool_choice not in (None, "none"):
            raise bad_request(
                "tool_choice other than 'none' is not supported (tools are not).", "tool_choice"
            )
        if self.functions or self.function_call not in (None, "none"):
            name = "functions" if self.functions else "function_call"
            raise bad_request(f"{name} is not supported by this server (no tool-call parsing).", name)
        if self.response_format is not None and self.response_format.get("type") != "text":
            kind = self.response_format.get("type")
            raise bad_request(
                f"response_format {kind!r} is not supported; only 'text' is (no structured output).",
                "response_format",
            )
        unsupported = {
            "audio": self.audio is not None,
            "modalities": self.modalities is not None and self.modalities != ["text"],
            "prediction": self.prediction is not None,
            "reasoning_effort": self.reasoning_effort is not None,
            "web_search_options": self.web_search_options is not None,
            "store": bool(self.store),
            "service_tier": self.service_tier not in (None, "auto", "default"),
        }
        for name, refused in unsupported.items():
            if refused:
                raise bad_request(f"{name} is not supported by this server.", name)
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true.", "top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(
                    f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}.",
                    "top_logprobs",
                )
        if self.add_generation_prompt and self.continue_final_message:
            raise bad_request(
                "continue_final_message and add_generation_prompt cannot both be true.",
                "continue_final_message",
            )

    @property
    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The completion budget asked for and the name it was asked by."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Request, kw_only=True):
    """vLLM's /tokenize: a text prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise bad_request("give exactly one of prompt and messages.", "prompt")
        if self.messages is not None and not self.messages:
            raise bad_request("messages must not be empty.", "messages")


class DetokenizeRequest(_Request, kw_only=True):
    model: str | None = None
    tokens: list[int]


RequestT = TypeVar("RequestT", bound=_Request)


def decode_request(body: bytes, request_type: type[RequestT]) -> RequestT:
    if not body:
        raise APIError(400, "The request body is empty; a JSON object is expected.")
    try:
        return msgspec.json.decode(body, type=request_type)
    except msgspec.DecodeError as exc:
        raise from_decode_error(exc) from None


# --------------------------------------------------------------------------------------- responses
# Encoded as they are, None as null: the OpenAI SDK reads absent and null alike.


class _Response(msgspec.Struct, kw_only=True):
    pass


class PromptTokensDetails(_Response, kw_only=True):
    cached_tokens: int = 0


class Usage(_Response, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ModelCard(_Response, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "pagedserve"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(_Response, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class CompletionLogprobs(_Response, kw_only=True):
    text_offset: list[int] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    tokens: list[str] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)


class CompletionChoice(_Response, kw_only=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM extra: the stop string or token that ended it


class CompletionResponse(_Response, kw_only=True):
    """A whole completion, or (object "text_completion" too, as OpenAI) one streamed chunk."""

    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(_Response, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = msgspec.field(default_factory=list)


class ChatLogprobs(_Response, kw_only=True):
    content: list[TokenLogprob] | None = None


class ChatMessage(_Response, kw_only=True):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(_Response, kw_only=True):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Response, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(_Response, kw_only=True, omit_defaults=True):
    # Only what is new: the role in the first chunk of a choice, then content.
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(_Response, kw_only=True):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Response, kw_only=True):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class TokenizeResponse(_Response, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response, kw_only=True):
    prompt: str


class VersionResponse(_Response, kw_only=True):
    version: str
