"""EngineCore: the in-process engine API (add_request / abort_requests / step).

The linear loop: ``step -> schedule -> execute -> update``. The engine-core process wraps this
object with sockets; the offline engine and the tests drive it directly.
"""

from __future__ import annotations

import logging
import time

from core.executor import Executor, PendingOutput, make_executor
from core.kv_cache.manager import KVCacheManager
from core.request import Request
from core.scheduler import Scheduler
from ipc.config import EngineConfig
from ipc.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, FinishReason, SchedulerOutput

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        self.config = config
        self.executor = executor if executor is not None else make_executor(config)
        self._async = config.scheduler.async_scheduling and hasattr(self.executor, "execute_model_async")
        self._in_flight: tuple[SchedulerOutput, PendingOutput] | None = None
        try:
            self._init_cache()
        except BaseException:
            self.executor.shutdown()  # do not leave worker processes behind a failed start
            raise

    def _init_cache(self) -> None:
        config = self.config
        num_blocks = config.cache.num_gpu_blocks_override or self.executor.determine_num_blocks()
        block_size = config.cache.block_size
        capacity = num_blocks * block_size
        max_model_len = config.scheduler.max_model_len
        if capacity < max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {block_size}), less than "
                f"max_model_len={max_model_len}: raise the KV-cache memory (gpu_memory_utilization, "
                f"kv_cache_memory_bytes, num_gpu_blocks_override) or lower max_model_len"
            )
        self.executor.initialize_cache(num_blocks)
        self.kv_cache = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.kv_cache)
        self.num_blocks = num_blocks
        logger.info(
            "KV cache: %d blocks of %d tokens = %d tokens; maximum concurrency at max_model_len=%d: %.2fx",
            num_blocks,
            block_size,
            capacity,
            max_model_len,
            capacity / max_model_len,
        )

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.config.cache.block_size

    # ------------------------------------------------------------------ API
    def validate_request(self, request: EngineCoreRequest) -> None:
        """Raise ValueError for a request the engine cannot serve (nothing is changed)."""
        prompt_len = len(request.prompt_token_ids)
        max_model_len = self.config.scheduler.max_model_len
        if prompt_len == 0:
            raise ValueError("the prompt is empty: at least one prompt token is needed")
        if prompt_len >= max_model_len:
            raise ValueError(
                f"the prompt has {prompt_len} tokens but max_model_len is {max_model_len}: "
                f"it must be shorter than max_model_len to leave room for output"
            )
        vocab = self.config.model.vocab_size
        bad = next((t for t in request.prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        bias = request.sampling_params.logit_bias
        bad = next((t for t in (bias or ()) if t >= vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})")

    def add_request(self, request: EngineCoreRequest) -> None:
        self.validate_request(request)
        self.scheduler.add_request(Request.from_engine_core_request(request))

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        finished = self.scheduler.finish_requests(request_ids, FinishReason.ABORT)
        return [
            EngineCoreOutput(request_id=r.request_id, new_token_ids=[], finish_reason=FinishReason.ABORT)
            for r in finished
        ]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def step(self) -> EngineCoreOutputs:
        """schedule -> execute -> update. With async scheduling, step N+1 is scheduled and
        launched before step N's tokens are waited for, so the CPU work of one overlaps the GPU
        work of the other; outputs then trail the launch by one step."""
        if not self._async:
            outputs = []
            if self.scheduler.has_unfinished_requests():
                scheduler_output = self.scheduler.schedule()
                runner_output = self.executor.execute_model(scheduler_output)
                outputs = self.scheduler.update_from_output(scheduler_output, runner_output)
            return self._outputs(outputs)
        launched = None
        if self.scheduler.has_unfinished_requests():
            scheduler_output = self.scheduler.schedule()
            launched = (scheduler_output, self.executor.execute_model_async(scheduler_output))
        outputs = []
        if self._in_flight is not None:
            previous_output, pending = self._in_flight
            outputs = self.scheduler.update_from_output(previous_output, pending.result())
        self._in_flight = launched
        return self._outputs(outputs)

    def _outputs(self, outputs: list[EngineCoreOutput]) -> EngineCoreOutputs:
        return EngineCoreOutputs(
            outputs=outputs, scheduler_stats=self.scheduler.make_stats(), timestamp=time.time()
        )

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache.reset_prefix_cache()

    def shutdown(self) -> None:
        self.executor.shutdown()
