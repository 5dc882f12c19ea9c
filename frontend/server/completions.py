"""POST /v1/completions: text (or token-id) prompts, one or a batch, streamed or not."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from frontend.outputs import CompletionOutput, RequestOutput, SampleLogprobs
from frontend.server.errors import APIError
from frontend.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
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
    resolve_max_tokens,
    sse_error,
    sse_event,
    token_text,
    until_disconnected,
    validate_prompt,
)
from ipc.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Choice:
    """What has been sent of one choice so far (streaming) or all of it (non-streaming)."""

    index: int
    text: str = ""
    num_tokens: int = 0
    text_offset: int = 0  # where the next logprob token starts in the choice's text
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    started: bool = False  # the echoed prompt has gone out


async def create_completion(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body = decode_request(await request.body(), CompletionRequest)
    state.check_model(body.model)
    body.check_supported()
    prompts = [_prompt(state, item, body.add_special_tokens) for item in body.prompt_inputs()]
    kind = RequestOutputKind.DELTA if body.stream else RequestOutputKind.FINAL_ONLY
    params = []
    defaults = state.generation.sampling_defaults()
    for prompt in prompts:
        max_tokens = resolve_max_tokens(
            body.max_tokens,
            "max_tokens",
            len(prompt.token_ids),
            state.max_model_len,
            "prompt",
            state.generation,
        )
        sampling = body.to_sampling_params(
            max_tokens=max_tokens,
            logprobs=body.logprobs,
            vocab_size=state.vocab_size,
            kind=kind,
            defaults=defaults,
        )
        validate_prompt(state, prompt, sampling, "prompt")
        params.append(sampling)
    if state.engine.errored:
        raise APIError(503, "The engine is not running.")

    request_id = new_request_id("cmpl")
    job = _Completion(state, body, prompts, params, request_id)
    if body.stream:
        return EventStream(job.stream())  # type: ignore[return-value]  # an ASGI app, as a Response is
    try:
        return encode_json(await until_disconnected(request, job.collect()))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody reads it; the requests are already aborted


def _prompt(state: ServerState, item: str | list[int], add_special_tokens: bool) -> Prompt:
    if isinstance(item, str):
        tokenizer = state.require_tokenizer()
        return Prompt(item, tokenizer.encode(item, add_special_tokens=add_special_tokens))
    return Prompt(None, item)


class _Completion:
    def __init__(
        self,
        state: ServerState,
        body: CompletionRequest,
        prompts: list[Prompt],
        params: list[SamplingParams],
        request_id: str,
    ) -> None:
        self.state = state
        self.body = body
        self.prompts = prompts
        self.params = params
        self.request_id = request_id
        self.created = int(time.time())
        self.n = body.n
        self.choices = [_Choice(index=i) for i in range(len(prompts) * body.n)]
        self.cached_tokens = [0] * len(prompts)

    def _streams(self) -> list[AsyncGenerator[RequestOutput, None]]:
        ids = (
            [self.request_id]
            if len(self.prompts) == 1
            else [f"{self.request_id}-{i}" for i in range(len(self.prompts))]
        )
        return [
            generate(self.state, prompt, params, rid, self.body.cache_salt)
            for prompt, params, rid in zip(self.prompts, self.params, ids)
        ]

    def _prompt_text(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        tokenizer = self.state.engine.tokenizer
        return tokenizer.decode(prompt.token_ids) if tokenizer is not None else ""

    def _apply(self, prompt_index: int, completion: CompletionOutput) -> _Choice:
        """Fold one output (a delta when streaming, the whole text otherwise) into its choice;
        ``choice.text`` / ``choice.logprobs`` then hold what is new."""
        choice = self.choices[prompt_index * self.n + completion.index]
        text = completion.text
        if not choice.started:
            choice.started = True
            if self.body.echo:
                text = self._prompt_text(self.prompts[prompt_index]) + text
        choice.text = text
        choice.num_tokens += len(completion.token_ids)
        if self.body.logprobs is not None:
            choice.logprobs = self._logprobs(choice, completion.token_ids, completion.logprobs or [])
        choice.finish_reason = completion.finish_reason
        choice.stop_reason = completion.stop_reason
        return choice

    def _logprobs(
        self, choice: _Choice, token_ids: list[int], logprobs: SampleLogprobs
    ) -> CompletionLogprobs:
        tokenizer = self.state.engine.tokenizer
        result = CompletionLogprobs()
        for token_id, entry in zip(token_ids, logprobs):
            sampled = entry.get(token_id)
            token = token_text(token_id, sampled.decoded_token if sampled else None, tokenizer)
            result.tokens.append(token)
            result.token_logprobs.append(finite_logprob(sampled.logprob) if sampled else None)
            result.top_logprobs.append(
                {
                    token_text(tid, lp.decoded_token, tokenizer): finite_logprob(lp.logprob)
                    for tid, lp in entry.items()
                }
            )
            result.text_offset.append(choice.text_offset)
            choice.text_offset += len(token)
        return result

    def _usage(self) -> Usage:
        prompt_tokens = sum(len(p.token_ids) for p in self.prompts)
        completion_tokens = sum(c.num_tokens for c in self.choices)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens)),
        )

    async def collect(self) -> CompletionResponse:
        try:
            async for prompt_index, output in merge(self._streams()):
                self.cached_tokens[prompt_index] = output.num_cached_tokens
                for completion in output.outputs:
                    self._apply(prompt_index, completion)
        except Exception as exc:
            raise engine_error(exc) from None
        return CompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.state.config.model_name,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=c.text,
                    logprobs=c.logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                for c in self.choices
            ],
            usage=self._usage(),
        )

    async def stream(self) -> AsyncGenerator[bytes, None]:
        body = self.body
        try:
            async for prompt_index, output in merge(self._streams()):
                self.cached_tokens[prompt_index] = output.num_cached_tokens
                for completion in output.outputs:
                    choice = self._apply(prompt_index, completion)
                    if (
                        not choice.text
                        and choice.finish_reason is None
                        and choice.logprobs is None
                        and (self.state.engine.tokenizer is not None or not completion.token_ids)
                    ):
                        # e.g. half of a multi-byte character: nothing to show yet. Without a
                        # tokenizer there is never text, and every token still gets its chunk.
                        continue
                    yield sse_event(
                        CompletionResponse(
                            id=self.request_id,
                            created=self.created,
                            model=self.state.config.model_name,
                            choices=[
                                CompletionChoice(
                                    index=choice.index,
                                    text=choice.text,
                                    logprobs=choice.logprobs,
                                    finish_reason=choice.finish_reason,
                                    stop_reason=choice.stop_reason,
                                )
                            ],
                            usage=self._usage() if body.continuous_usage else None,
                        )
                    )
            if body.include_usage:
                yield sse_event(
                    CompletionResponse(
                        id=self.request_id,
                        created=self.created,
                        model=self.state.config.model_name,
                        choices=[],
                        usage=self._usage(),
                    )
                )
        except Exception as exc:
            yield sse_error(engine_error(exc))
        yield SSE_DONE
