"""What the generation routes share: the server state, prompt limits, running requests on the
engine with metrics, and the two ways a client can leave (a closed stream, a dropped request).

Disconnects abort at once. Both paths watch the ASGI ``receive`` channel for
``http.disconnect`` while the engine works, and cancel the work when it arrives; cancellation
closes the AsyncLLM generator, which aborts the request in the engine and frees its blocks.
Every engine stream is closed explicitly (``aclosing``) rather than left to the garbage
collector, so an abort never waits for a finalizer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from core.errors import EngineDeadError
from frontend.async_llm import AsyncLLM
from frontend.outputs import RequestOutput
from frontend.server import ServerConfig
from frontend.server.errors import APIError, bad_request, from_value_error
from frontend.server.metrics import ServerMetrics
from frontend.tokenizer import Tokenizer
from ipc.config import GenerationDefaults
from ipc.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies (nginx) must not buffer the stream
]
# Chat-template keywords the server sets itself; a request's chat_template_kwargs may not.
_OWN_TEMPLATE_KWARGS = frozenset(
    {"add_generation_prompt", "chat_template", "tools", "continue_final_message"}
)


@dataclass(slots=True)
class ServerState:
    engine: AsyncLLM
    config: ServerConfig
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        return self.engine.config.model.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.config.model.vocab_size

    @property
    def generation(self) -> GenerationDefaults:
        return self.engine.config.model.generation

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.config.served_model_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")

    def require_tokenizer(self) -> Tokenizer:
        if self.engine.tokenizer is None:
            raise bad_request("This server runs without a tokenizer: only token-id prompts are accepted.")
        return self.engine.tokenizer


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str | None  # None for token-id prompts
    token_ids: list[int]


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def encode_json(payload: msgspec.Struct) -> Response:
    return Response(msgspec.json.encode(payload), media_type="application/json")


def sse_event(payload: msgspec.Struct | Mapping[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def sse_error(error: APIError) -> bytes:
    """An error after the 200 went out: an error event; the caller ends with [DONE], as vLLM."""
    return sse_event(error.body())


# ------------------------------------------------------------------------------------ prompts


def resolve_max_tokens(
    requested: int | None,
    requested_as: str,
    prompt_len: int,
    max_model_len: int,
    prompt_as: str,
    generation: GenerationDefaults,
) -> int:
    """The completion budget, refusing what cannot fit in max_model_len with vLLM's wording.

    Unrequested, it is the model's default (its generation config's max_new_tokens) within the
    room max_model_len leaves, else all that room; ``generation.max_tokens_limit`` caps both."""
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_len} input tokens, which leaves no room for the completion. "
            f"Please reduce the length of the {prompt_as}.",
            prompt_as,
        )
    room = max_model_len - prompt_len
    if requested is None:
        budget = room if generation.max_tokens is None else min(generation.max_tokens, room)
    elif requested > 0 and requested > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the {prompt_as}, {requested} in the "
            f"completion). Please reduce the length of the {prompt_as} or completion.",
            requested_as,
        )
    else:
        budget = requested
    limit = generation.max_tokens_limit
    return budget if limit is None else min(budget, limit)


def validate_prompt(state: ServerState, prompt: Prompt, params: SamplingParams, prompt_as: str) -> None:
    """The engine's own checks (empty prompt, token ids outside the vocabulary), up front, so a
    streaming request is refused with a 400 rather than an error event after a 200."""
    try:
        state.engine.processor.validate(prompt.token_ids, params)
    except ValueError as exc:
        raise bad_request(str(exc), prompt_as) from None


def render_chat_prompt(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template: str | None,
    chat_template_kwargs: Mapping[str, Any] | None,
    add_special_tokens: bool,
) -> Prompt:
    kwargs = dict(chat_template_kwargs or {})
    clash = sorted(_OWN_TEMPLATE_KWARGS.intersection(kwargs))
    if clash:
        raise bad_request(
            f"chat_template_kwargs may not set {clash}; use the request fields of those names.",
            "chat_template_kwargs",
        )
    if continue_final_message:
        kwargs["continue_final_message"] = True
    try:
        text = tokenizer.render_chat_template(
            messages, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **kwargs
        )
    except ValueError as exc:
        error = from_value_error(exc, ("messages",))
        if error.param is None:
            error.param = "messages"
        raise error from None
    return Prompt(text, tokenizer.encode(text, add_special_tokens=add_special_tokens))


# ------------------------------------------------------------------------------ running requests


def engine_error(exc: Exception, prompt_as: str = "prompt") -> APIError:
    """An exception from the engine while serving, as the error the client gets."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"The engine is not running: {exc}")
    if isinstance(exc, ValueError):
        return bad_request(str(exc), prompt_as)
    logger.error("request failed", exc_info=exc)
    return APIError(500, f"Internal error: {type(exc).__name__}: {exc}")


async def generate(
    state: ServerState, prompt: Prompt, params: SamplingParams, request_id: str, cache_salt: str | None
) -> AsyncGenerator[RequestOutput, None]:
    """One request on the engine, with its request-level metrics and log line."""
    if not state.config.disable_log_requests:
        logger.info("request %s: %d prompt tokens, %s", request_id, len(prompt.token_ids), params)
    delta = params.output_kind == RequestOutputKind.DELTA
    tokens = [0] * params.n
    outcome: str | None = None
    stream = state.engine.generate(
        prompt.text, params, request_id, prompt_token_ids=prompt.token_ids, cache_salt=cache_salt
    )
    try:
        async with contextlib.aclosing(stream):
            async for output in stream:
                for completion in output.outputs:
                    if delta:
                        tokens[completion.index] += len(completion.token_ids)
                    else:
                        tokens[completion.index] = len(completion.token_ids)
                if output.finished:
                    outcome = "finished"
                    state.metrics.on_request_finished(output, max(tokens))
                yield output
    except ValueError:
        outcome = "refused"  # never ran: no outcome to count
        raise
    except EngineDeadError:
        outcome = "error"
        state.metrics.on_request_failed(params.n)
        raise
    finally:
        if outcome is None:  # cancelled or closed before the end: the client left
            state.metrics.on_request_aborted(params.n)
            if not state.config.disable_log_requests:
                logger.info("request %s aborted", request_id)


async def merge(
    streams: list[AsyncGenerator[RequestOutput, None]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the stream's index.

    The queue holds at most one item per stream: a slow reader makes the pumps wait, and the
    engine's per-request collector merges deltas meanwhile, so memory stays flat.
    """
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for output in only:
                yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | None, Exception | None]] = asyncio.Queue(len(streams))

    async def pump(index: int, stream: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for output in stream:
                    await queue.put((index, output, None))
        except Exception as exc:
            await queue.put((index, None, exc))
            return
        await queue.put((index, None, None))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                remaining -= 1
                continue
            yield index, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------------------ disconnects


class ClientDisconnected(Exception):
    """The client went away before the answer was ready."""


async def _wait_for_disconnect(receive: Receive) -> None:
    # The body has been read, so the next message on this channel is the disconnect.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it (and so aborting its requests) if the client disconnects."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


class EventStream:
    """An ASGI response streaming server-sent events from ``events``.

    It watches for the client's disconnect while streaming and then cancels the stream, closing
    the event generator (and with it the engine requests) right away.
    """

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            async for chunk in self._events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        sender = asyncio.create_task(pump())
        watcher = asyncio.create_task(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, watcher):
                task.cancel()
            results = await asyncio.gather(sender, watcher, return_exceptions=True)
            await self._events.aclose()
        error = results[0]
        if isinstance(error, Exception) and not isinstance(error, OSError):  # OSError: client gone
            logger.error("event stream failed", exc_info=error)


def token_text(token_id: int, decoded: str | None, tokenizer: Tokenizer | None) -> str:
    """A logprob entry's token as text (the detokenizer's, else the tokenizer's)."""
    if decoded is not None:
        return decoded
    return tokenizer.token_text(token_id) if tokenizer is not None else f"token_id:{token_id}"


def finite_logprob(logprob: float) -> float:
    # JSON has no -inf; a masked-out token reports the floor vLLM reports.
    return max(logprob, -9999.0)
