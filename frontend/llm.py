"""The offline API: ``LLM(model=..., **engine_args).generate(prompts, sampling_params)``."""

from __future__ import annotations

import itertools
import logging
import queue
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.engine_args import DEFAULT_MODEL, EngineArgs
from core.engine_core import EngineCore
from core.errors import EngineDeadError
from frontend.engine_client import EngineCoreClient, EngineDead
from frontend.output_processor import OutputProcessor
from frontend.outputs import RequestOutput
from frontend.processor import InputProcessor, PromptType, cache_salt_of
from frontend.stat_logger import LoggingStatLogger
from frontend.tokenizer import Tokenizer, load_tokenizer
from ipc.config import EngineConfig
from ipc.logging_setup import setup_logging
from ipc.messages import EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from ipc.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

Message = dict[str, Any]


@dataclass(slots=True)
class EngineStats:
    """What the engine reported, accumulated over the LLM's life."""

    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    kv_cache_usage: float = 0.0
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0

    def add(self, stats: SchedulerStats) -> None:
        self.num_preemptions += stats.num_preemptions
        self.prefix_cache_queries += stats.prefix_cache_queries
        self.prefix_cache_hits += stats.prefix_cache_hits
        self.kv_cache_usage = stats.kv_cache_usage
        self.num_running_reqs = stats.num_running_reqs
        self.num_waiting_reqs = stats.num_waiting_reqs


class _ProcessEngine:
    """The engine core in its own process (the default, as vLLM's)."""

    def __init__(self, config: EngineConfig) -> None:
        self._outputs: queue.Queue[EngineCoreOutputs | EngineDead] = queue.Queue()
        self.client = EngineCoreClient(config, self._outputs.put, wait=False)

    def wait_until_ready(self) -> None:
        self.client.wait_until_ready()
        self.kv_capacity_tokens = self.client.info["kv_capacity_tokens"]

    def add_request(self, request: EngineCoreRequest) -> None:
        self.client.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.client.abort_requests(request_ids)

    def next_outputs(self) -> EngineCoreOutputs:
        item = self._outputs.get()
        if isinstance(item, EngineDead):
            raise EngineDeadError(item.reason)
        return item

    def call(self, method: str) -> Any:
        return self.client.call_utility(method).result(timeout=60)

    def shutdown(self) -> None:
        self.client.shutdown()


class _InProcessEngine:
    """The engine core in this process: no IPC; for tests that look inside, and for debugging."""

    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.kv_capacity_tokens = self.core.kv_capacity_tokens

    def wait_until_ready(self) -> None:
        pass

    def add_request(self, request: EngineCoreRequest) -> None:
        self.core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)

    def next_outputs(self) -> EngineCoreOutputs:
        return self.core.step()

    def call(self, method: str) -> Any:
        if method == "reset_prefix_cache":
            return self.core.reset_prefix_cache()
        if method == "get_stats":
            return {
                "num_unfinished": self.core.scheduler.num_unfinished,
                "kv_cache_usage": self.core.kv_cache.usage,
            }
        raise ValueError(f"unknown utility method {method!r}")

    def shutdown(self) -> None:
        self.core.shutdown()


class LLM:
    """Offline batch inference. Keyword arguments are the engine flags with vLLM's names
    (``max_model_len``, ``dtype``, ``load_format``, ``tensor_parallel_size``, ...).

    The engine core runs in a process of its own; ``engine_process=False`` keeps it in this
    process instead (no IPC; its state is then inspectable as ``llm.engine.core``)."""

    def __init__(
        self, model: str = DEFAULT_MODEL, *, engine_process: bool = True, **engine_kwargs: Any
    ) -> None:
        setup_logging("frontend")
        engine_kwargs.setdefault("disable_log_stats", True)  # as vLLM's LLM: stats lines are opt-in
        args = EngineArgs.from_kwargs(model=model, **engine_kwargs)
        self._stat_logger = None if args.disable_log_stats else LoggingStatLogger(args.log_stats_interval)
        self.config = args.create_engine_config()
        mc = self.config.model
        # The engine process loads the model while this one loads the tokenizer.
        self.engine = _ProcessEngine(self.config) if engine_process else _InProcessEngine(self.config)
        try:
            self.tokenizer: Tokenizer | None = None
            if not mc.skip_tokenizer_init:
                self.tokenizer = load_tokenizer(Path(mc.path), mc.format, mc.tokenizer, mc.chat_template)
            self.engine.wait_until_ready()
        except BaseException:
            self.engine.shutdown()
            raise
        self.stats = EngineStats()
        self.processor = InputProcessor(mc, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without sampling params uses: vLLM's defaults with the model's generation
        config (``--generation-config``, ``--override-generation-config``) laid over them."""
        return SamplingParams(**self.config.model.generation.sampling_defaults())

    # ------------------------------------------------------------------ generate
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs come back in prompt order. Every prompt is validated before any is queued, so
        one bad prompt fails the call without leaving the others running."""
        prompt_list = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params_list = _as_params_list(sampling_params, len(prompt_list))
        prepared = []
        for prompt, params in zip(prompt_list, params_list):
            text, token_ids = self.processor.tokenize_prompt(prompt)
            self.processor.validate(token_ids, params)
            salt = cache_salt_of(prompt)
            prepared.append((text, token_ids, params.clone(output_kind=RequestOutputKind.FINAL_ONLY), salt))
        return self._run(prepared, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Chat with the model's chat template (rendered exactly as HF transformers renders it)."""
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=False)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {
                "prompt_token_ids": self.tokenizer.apply_chat_template(
                    conversation, add_generation_prompt=add_generation_prompt, chat_template=chat_template
                )
            }
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(
        self, prepared: list[tuple[str | None, list[int], SamplingParams, str | None]], use_tqdm: bool
    ) -> list[RequestOutput]:
        order: dict[str, int] = {}
        for position, (text, token_ids, params, cache_salt) in enumerate(prepared):
            request_id = str(next(self._ids))
            order[request_id] = position
            self.output_processor.add_request(request_id, text, token_ids, params)
            for request in self.processor.make_requests(request_id, token_ids, params, cache_salt=cache_salt):
                self.engine.add_request(request)
        results: list[RequestOutput | None] = [None] * len(prepared)
        bar = tqdm(total=len(prepared), desc="Processed prompts", disable=not use_tqdm or len(prepared) < 2)
        try:
            while self.output_processor.has_unfinished_requests():
                step = self.engine.next_outputs()
                if step.scheduler_stats is not None:
                    self.stats.add(step.scheduler_stats)
                    if self._stat_logger is not None:
                        self._stat_logger.record(step.scheduler_stats)
                refused = next((o for o in step.outputs if o.error is not None), None)
                if refused is not None:  # validated above, so this is an engine-side refusal
                    raise ValueError(refused.error)
                processed = self.output_processor.process_outputs(step.outputs)
                if processed.reqs_to_abort:
                    self.engine.abort_requests(processed.reqs_to_abort)
                for output in processed.request_outputs:
                    if output.finished:
                        results[order[output.request_id]] = output
                        bar.update(1)
        except EngineDeadError:
            for request_id in list(order):
                self.output_processor.abort_request(request_id)
            raise
        except BaseException:
            # Leave no half-finished request behind in the engine (e.g. on KeyboardInterrupt).
            for request_id in list(order):
                self.engine.abort_requests(self.output_processor.abort_request(request_id))
            raise
        finally:
            bar.close()
        return [r for r in results if r is not None]

    def reset_prefix_cache(self) -> bool:
        return bool(self.engine.call("reset_prefix_cache"))

    def engine_stats(self) -> dict[str, Any]:
        """The engine's live numbers: unfinished requests and KV-cache usage in [0, 1]."""
        return self.engine.call("get_stats")

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, str | dict):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt of token ids
    return prompts


def _as_params_list(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params
