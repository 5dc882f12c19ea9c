"""AsyncLLM: the asyncio client the server runs on.

``async for out in llm.generate(prompt, params, request_id)`` yields RequestOutputs as tokens
arrive. Cancelling the consuming task (a client disconnect) aborts the request in the engine at
once. Each request has a one-slot collector: when the engine outruns a slow consumer, DELTA
outputs are merged into the pending one instead of queueing, so memory stays flat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from core.engine_args import DEFAULT_MODEL, EngineArgs
from core.errors import EngineDeadError
from frontend.engine_client import EngineCoreClient, EngineDead
from frontend.output_processor import OutputProcessor
from frontend.outputs import CompletionOutput, RequestOutput
from frontend.processor import InputProcessor, PromptType, cache_salt_of, check_cache_salt
from frontend.stat_logger import LoggingStatLogger
from frontend.tokenizer import Tokenizer, load_tokenizer
from ipc.config import EngineConfig
from ipc.logging_setup import setup_logging
from ipc.messages import EngineCoreOutputs, SchedulerStats
from ipc.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)


def _merge_delta(into: RequestOutput, new: RequestOutput) -> None:
    by_index = {c.index: c for c in into.outputs}
    for completion in new.outputs:
        old = by_index.get(completion.index)
        if old is None:
            into.outputs.append(completion)
            continue
        old.text += completion.text
        old.token_ids = old.token_ids + completion.token_ids
        if completion.logprobs is not None:
            old.logprobs = (old.logprobs or []) + completion.logprobs
        old.cumulative_logprob = completion.cumulative_logprob
        old.finish_reason, old.stop_reason = completion.finish_reason, completion.stop_reason
    into.finished = new.finished
    into.num_cached_tokens = new.num_cached_tokens


class RequestOutputCollector:
    """One pending output per request, merged (DELTA) or replaced (CUMULATIVE) when not yet taken."""

    __slots__ = ("_error", "_kind", "_output", "_ready")

    def __init__(self, kind: RequestOutputKind) -> None:
        self._kind = kind
        self._output: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        if self._output is None or self._kind != RequestOutputKind.DELTA:
            self._output = output
        else:
            _merge_delta(self._output, output)
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._ready.set()

    async def get(self) -> RequestOutput:
        while self._output is None:
            if self._error is not None:
                raise self._error
            await self._ready.wait()
            self._ready.clear()
        output, self._output = self._output, None
        return output


class AsyncLLM:
    """The asyncio engine client: ``AsyncLLM(model=..., **engine_args)`` (keywords as LLM's) or
    ``AsyncLLM.from_engine_args(AsyncEngineArgs(model=...))``. The engine core starts in its own
    process at construction; call ``shutdown()`` (or use ``async with``) when done."""

    def __init__(self, model: str = DEFAULT_MODEL, **engine_kwargs: Any) -> None:
        self._start_from_args(EngineArgs.from_kwargs(model=model, **engine_kwargs))

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> AsyncLLM:
        llm = cls.__new__(cls)
        llm._start_from_args(args)
        return llm

    def _start_from_args(self, args: EngineArgs) -> None:
        setup_logging("frontend")
        self._start(args.create_engine_config())
        if not args.disable_log_stats:
            self.stats_listeners.append(LoggingStatLogger(args.log_stats_interval).record_on_loop)

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLM:
        llm = cls.__new__(cls)
        llm._start(config)
        return llm

    def _start(self, config: EngineConfig) -> None:
        self.config = config
        self._collectors: dict[str, RequestOutputCollector] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._early: list[EngineCoreOutputs | EngineDead] = []
        self.stats_listeners: list[Callable[[SchedulerStats], None]] = []
        self.dead_reason: str | None = None
        # The engine loads the model in its process while this one loads the tokenizer.
        self.client = EngineCoreClient(config, self._on_engine_item, wait=False)
        try:
            mc = config.model
            self.tokenizer: Tokenizer | None = None
            if not mc.skip_tokenizer_init:
                self.tokenizer = load_tokenizer(Path(mc.path), mc.format, mc.tokenizer, mc.chat_template)
            self.processor = InputProcessor(mc, self.tokenizer)
            self.output_processor = OutputProcessor(self.tokenizer)
            self.client.wait_until_ready()
        except BaseException:
            self.client.shutdown()
            raise

    @property
    def kv_capacity_tokens(self) -> int:
        return int(self.client.info["kv_capacity_tokens"])

    @property
    def errored(self) -> bool:
        return self.dead_reason is not None or not self.client.is_alive()

    # ------------------------------------------------------------------ engine -> here
    def _on_engine_item(self, item: EngineCoreOutputs | EngineDead) -> None:
        """Called on the client's receiver thread: hop onto the event loop."""
        loop = self._loop
        if loop is None:
            self._early.append(item)
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(self._process, item)

    def _bind_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            early, self._early = self._early, []
            for item in early:
                self._process(item)

    def _process(self, item: EngineCoreOutputs | EngineDead) -> None:
        if isinstance(item, EngineDead):
            self._fail_all(item.reason)
            return
        if item.scheduler_stats is not None:
            for listener in self.stats_listeners:
                listener(item.scheduler_stats)
        for out in item.outputs:
            if out.error is not None:  # the engine refused this request
                entry = self.output_processor.child_to_parent.get(out.request_id)
                if entry is not None:
                    parent_id = entry[0].request_id
                    self.client.abort_requests(self.output_processor.abort_request(parent_id))
                    collector = self._collectors.get(parent_id)
                    if collector is not None:
                        collector.fail(ValueError(out.error))
        processed = self.output_processor.process_outputs(item.outputs)
        for output in processed.request_outputs:
            collector = self._collectors.get(output.request_id)
            if collector is not None:
                collector.put(output)
        if processed.reqs_to_abort:
            self.client.abort_requests(processed.reqs_to_abort)
        if item.engine_error is not None:
            self._fail_all(f"the engine core failed: {item.engine_error}")

    def _fail_all(self, reason: str) -> None:
        self.dead_reason = reason
        error = EngineDeadError(reason)
        for request_id, collector in list(self._collectors.items()):
            self.output_processor.abort_request(request_id)
            collector.fail(error)

    # ------------------------------------------------------------------ API
    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        prompt_token_ids: list[int] | None = None,
        cache_salt: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream outputs of one request. ``prompt_token_ids`` skips tokenization (the prompt is
        then only reported back). ``cache_salt`` (or a prompt dict's) limits prefix-cache sharing
        to requests with the same salt. Raises ValueError for an invalid request and
        EngineDeadError if the engine dies; cancelling the consumer aborts the request."""
        self._bind_loop()
        if self.errored:
            raise EngineDeadError(self.dead_reason or "the engine core is not running")
        if prompt_token_ids is None:
            text, prompt_token_ids = self.processor.tokenize_prompt(prompt)
        else:
            text = prompt if isinstance(prompt, str) else None
        self.processor.validate(prompt_token_ids, sampling_params)
        check_cache_salt(cache_salt)
        cache_salt = cache_salt or cache_salt_of(prompt)
        if request_id in self._collectors:
            raise ValueError(f"request id {request_id!r} is already in use")
        collector = RequestOutputCollector(sampling_params.output_kind)
        self._collectors[request_id] = collector
        self.output_processor.add_request(request_id, text, prompt_token_ids, sampling_params)
        try:
            for request in self.processor.make_requests(
                request_id, prompt_token_ids, sampling_params, cache_salt=cache_salt
            ):
                self.client.add_request(request)
            while True:
                output = await collector.get()
                finished = output.finished
                yield output
                if finished:
                    break
        except BaseException:  # cancelled, consumer closed the generator, or the engine died
            self._abort_now(request_id)
            raise
        finally:
            self._collectors.pop(request_id, None)

    def _abort_now(self, request_id: str) -> None:
        child_ids = self.output_processor.abort_request(request_id)
        if child_ids and not self.errored:
            self.client.abort_requests(child_ids)

    async def abort(self, request_id: str) -> None:
        self._abort_now(request_id)
        collector = self._collectors.get(request_id)
        if collector is not None:
            collector.put(
                RequestOutput(
                    request_id=request_id,
                    prompt=None,
                    prompt_token_ids=[],
                    outputs=[CompletionOutput(index=0, text="", token_ids=[], finish_reason="abort")],
                    finished=True,
                )
            )

    async def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer (``apply_chat_template`` gives a chat prompt's token ids)."""
        if self.tokenizer is None:
            raise ValueError("this engine was started with skip_tokenizer_init: it has no tokenizer")
        return self.tokenizer

    async def reset_prefix_cache(self) -> bool:
        return bool(await asyncio.wrap_future(self.client.call_utility("reset_prefix_cache")))

    async def engine_stats(self) -> dict[str, Any]:
        return await asyncio.wrap_future(self.client.call_utility("get_stats"))

    async def check_health(self) -> None:
        if self.errored:
            raise EngineDeadError(self.dead_reason or "the engine core is not running")

    def shutdown(self) -> None:
        self.client.shutdown()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()
