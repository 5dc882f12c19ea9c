"""The executor seam: the engine core hands a SchedulerOutput to the workers and gets rank 0's
ModelRunnerOutput back. ``UniProcExecutor`` runs the single worker inside the engine-core process
(the CPU path and the tests); ``core.mp_executor.MultiprocExecutor`` runs one worker process per
tensor-parallel rank behind the same interface."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from ipc.config import EngineConfig
from ipc.messages import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)


class PendingOutput(Protocol):
    """A launched step; ``result()`` blocks until its tokens are on the host."""

    def result(self) -> ModelRunnerOutput: ...


class Executor(Protocol):
    def determine_num_blocks(self) -> int:
        """How many KV blocks fit in the memory budget (the minimum over ranks)."""
        ...

    def initialize_cache(self, num_blocks: int) -> None: ...

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def shutdown(self) -> None: ...


class UniProcExecutor:
    """One worker, in this process."""

    def __init__(self, config: EngineConfig, *, worker_cls: type | None = None) -> None:
        start = time.perf_counter()
        from workers.worker import Worker  # the executor is the one place core starts a worker

        # torch and the model code: on a machine whose disk cache is cold, a large part of a start.
        logger.info("worker modules imported in %.2f s", time.perf_counter() - start)

        # worker_cls: a Worker subclass (benchmarks swap in a no-op model; tests a failing one).
        self.worker = (worker_cls or Worker)(config, rank=0)
        self.worker.load_model()

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> PendingOutput:
        return self.worker.execute_model_async(scheduler_output)

    def shutdown(self) -> None:
        self.worker.shutdown()


def make_executor(config: EngineConfig) -> Executor:
    """One worker process per rank for "mp" or any world size above 1; in-process for "uni"."""
    if config.parallel.world_size > 1 or config.parallel.distributed_executor_backend == "mp":
        from core.mp_executor import MultiprocExecutor

        return MultiprocExecutor(config)
    return UniProcExecutor(config)
