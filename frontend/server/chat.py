"""POST /v1/chat/completions: messages rendered with the model's chat template (or
--chat-template, or the request's chat_template), streamed or not."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator

from starlette.requests import Request
from starlette.responses import Response

from frontend.outputs import SampleLogprobs
from frontend.server.errors import APIError
from frontend.server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
    decode_request,
)
from frontend.server.serving import (
    SSE_DONE,
    ClientDisconnected,
    EventStream,
    Prompt,
    ServerState,
    encode_json,
    engine_error,
    finite_logprob,
    generate,
    merge,
    new_request_id,
    render_chat_prompt,
    resolve_max_tokens,
    sse_error,
    sse_event,
    token_text,
    until_disconnected,
    validate_prompt,
)
from frontend.tokenizer import Tokenizer
from ipc.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


async def create_chat_completion(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = decode_request(await request.body(), ChatCompletionRequest)
    state.check_model(body.model)
    body.check_supported()
    prompt = render_chat_prompt(
        state.require_tokenizer(),
        body.messages,
        add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message,
        chat_template=body.chat_template,
        chat_template_kwargs=body.chat_template_kwargs,
        add_special_tokens=body.add_special_tokens,
    )
    requested, requested_as = body.requested_max_tokens
    max_tokens = resolve_max_tokens(
        requested, requested_as, len(prompt.token_ids), state.max_model_len, "messages", state.generation
    )
    params = body.to_sampling_params(
        max_tokens=max_tokens,
        logprobs=body.num_logprobs,
        vocab_size=state.vocab_size,
        kind=RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY,
        defaults=state.generation.sampling_defaults(),
    )
    validate_prompt(state, prompt, params, "messages")
    if state.engine.errored:
        raise APIError(503, "The engine is not running.")

    job = _Chat(state, body, prompt, params, new_request_id("chatcmpl"))
    if body.stream:
        return EventStream(job.stream())  # type: ignore[return-value]  # an ASGI app, as a Response is
    try:
        return encode_json(await until_disconnected(request, job.collect()))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the request is already aborted


class _Chat:
    def __init__(
        self,
        state: ServerState,
        body: ChatCompletionRequest,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str,
    ) -> None:
        self.state = state
        self.body = body
        self.prompt = prompt
        self.params = params
        self.request_id = request_id
        self.created = int(time.time())
        self.num_tokens = [0] * body.n
        self.cached_tokens = 0

    def _usage(self) -> Usage:
        prompt_tokens = len(self.prompt.token_ids)
        completion_tokens = sum(self.num_tokens)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens),
        )

    def _logprobs(self, token_ids: list[int], logprobs: SampleLogprobs | None) -> ChatLogprobs | None:
        if self.params.logprobs is None:
            return None
        return ChatLogprobs(
            content=_chat_logprobs(
                token_ids, logprobs or [], self.params.logprobs, self.state.engine.tokenizer
            )
        )

    async def collect(self) -> ChatCompletionResponse:
        choices: list[ChatChoice] = []
        try:
            async for _, output in merge(
                [generate(self.state, self.prompt, self.params, self.request_id, self.body.cache_salt)]
            ):
                self.cached_tokens = output.num_cached_tokens
                for completion in output.outputs:
                    self.num_tokens[completion.index] = len(completion.token_ids)
                    choices.append(
                        ChatChoice(
                            index=completion.index,
                            message=ChatMessage(content=completion.text),
                            logprobs=self._logprobs(completion.token_ids, completion.logprobs),
                            finish_reason=completion.finish_reason,
                            stop_reason=completion.stop_reason,
                        )
                    )
        except Exception as exc:
            raise engine_error(exc, "messages") from None
        choices.sort(key=lambda c: c.index)
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.state.config.model_name,
            choices=choices,
            usage=self._usage(),
        )

    def _chunk(self, choices: list[ChatStreamChoice], usage: Usage | None = None) -> bytes:
        return sse_event(
            ChatCompletionChunk(
                id=self.request_id,
                created=self.created,
                model=self.state.config.model_name,
                choices=choices,
                usage=usage,
            )
        )

    async def stream(self) -> AsyncGenerator[bytes, None]:
        body = self.body
        continuous = body.continuous_usage
        try:
            # The role goes first, on its own, for every choice: clients key the message on it.
            for index in range(body.n):
                yield self._chunk(
                    [ChatStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))],
                    self._usage() if continuous else None,
                )
            async for _, output in merge(
                [generate(self.state, self.prompt, self.params, self.request_id, self.body.cache_salt)]
            ):
                self.cached_tokens = output.num_cached_tokens
                for completion in output.outputs:
                    self.num_tokens[completion.index] += len(completion.token_ids)
                    logprobs = self._logprobs(completion.token_ids, completion.logprobs)
                    if not completion.text and completion.finish_reason is None and not completion.token_ids:
                        continue
                    yield self._chunk(
                        [
                            ChatStreamChoice(
                                index=completion.index,
                                delta=DeltaMessage(content=completion.text)
                                if completion.text
                                else DeltaMessage(),
                                logprobs=logprobs,
                                finish_reason=completion.finish_reason,
                                stop_reason=completion.stop_reason,
                            )
                        ],
                        self._usage() if continuous else None,
                    )
            if body.include_usage:
                yield self._chunk([], self._usage())
        except Exception as exc:
            yield sse_error(engine_error(exc, "messages"))
        yield SSE_DONE


def _chat_logprobs(
    token_ids: list[int], logprobs: SampleLogprobs, top_n: int, tokenizer: Tokenizer | None
) -> list[TokenLogprob]:
    """OpenAI's chat logprobs: the sampled token, then the ``top_n`` most likely by rank."""
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        sampled = entry.get(token_id)
        token = token_text(token_id, sampled.decoded_token if sampled else None, tokenizer)
        ranked = sorted(
            ((tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= top_n),
            key=lambda item: item[1].rank or 0,
        )
        tops = []
        for tid, lp in ranked[:top_n]:
            text = token_text(tid, lp.decoded_token, tokenizer)
            tops.append(TopLogprob(token=text, logprob=finite_logprob(lp.logprob), bytes=list(text.encode())))
        content.append(
            TokenLogprob(
                token=token,
                logprob=finite_logprob(sampled.logprob) if sampled else -9999.0,
                bytes=list(token.encode()),
                top_logprobs=tops,
            )
        )
    return content
