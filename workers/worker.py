"""Worker: one rank's device, model, KV cache and ModelRunner.

It runs inside the engine-core process (UniProcExecutor) or in a worker process of its own; it
schedules nothing.
"""

from __future__ import annotations

import logging
import time

import torch

from ipc.config import EngineConfig
from ipc.messages import ModelRunnerOutput, SchedulerOutput
from kernels.gemm import MIN_GAIN, MIN_TUNED_WEIGHT_BYTES, tune_gemm_plan
from workers.cuda_graphs import capture_sizes
from workers.distributed import TPGroup
from workers.model_runner import ModelRunner, PendingStep, compile_threads
from workers.models.layers import linear_layers
from workers.models.registry import build_model, load_model_weights
from workers.quantization import attach_gemm_plan, gemm_weights

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


# Without a memory profile (CPU), this much memory goes to the KV cache unless configured.
DEFAULT_CPU_KV_CACHE_BYTES = 2 << 30
# Left free for the CUDA-graph memory pool, which is filled after the KV cache is allocated.
CUDA_GRAPH_RESERVE_BYTES = 512 << 20
# GEMMs of more rows than this are not tuned: from ~128 rows they turn compute-bound, the two
# cuBLAS paths mostly differ by less than the 3 % margin, and their timings swung by 10-20 %
# from one batch size to the next (llama3-8b on an H200), too noisy to choose by.
GEMM_TUNING_MAX_ROWS = 128


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, tp: TPGroup | None = None) -> None:
        self.config = config
        self.rank = rank
        self.tp = tp or TPGroup()
        self.device = torch.device(config.device.device)
        if self.device.type == "cuda":
            # One GPU per rank (ranks of one host).
            start = time.perf_counter()
            self.device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)  # creates the device's context (torch's lazy init)
            logger.info("CUDA initialised on %s in %.2f s", self.device, time.perf_counter() - start)
        self.dtype = _DTYPES[config.model.dtype]
        self.model: torch.nn.Module | None = None
        self.runner: ModelRunner | None = None

    def load_model(self) -> None:
        start = time.perf_counter()
        if self.device.type == "cpu":
            torch.set_num_threads(self.config.device.cpu_threads)
        torch.manual_seed(self.config.model.seed)
        model = build_model(self.config.model, self.tp, self.dtype, self.device)
        load_model_weights(model, self.config.model)
        model.eval()
        self.model = model
        sched = self.config.scheduler
        self.runner = ModelRunner(
            model,
            self.device,
            self.config.cache.block_size,
            sched.max_num_seqs,
            sched.max_model_len,
            self.config.model.vocab_size,
        )
        logger.info("model loaded in %.2f s on %s (%s)", time.perf_counter() - start, self.device, self.dtype)
        if self.device.type == "cuda":  # before the memory profile, so that it compiles nothing
            self._tune_gemms()
            done = self.runner.warmup()
            logger.info(
                "kernels compiled for %d step shapes in %.1f s (%d threads); warm-up passes %.1f s",
                done.num_shapes,
                done.compile_s,
                done.compile_threads,
                done.run_s,
            )

    def _tune_gemms(self) -> None:
        """Time cuBLAS, cuBLASLt and the Triton GEMM on the unquantized linears' weights at every
        decode batch size that gets a CUDA graph, and let those linears run the winners
        (kernels/gemm.py)."""
        start = time.perf_counter()
        sizes = [s for s in capture_sizes(self.config.scheduler.max_num_seqs) if s <= GEMM_TUNING_MAX_ROWS]
        layers = list(linear_layers(self.model))
        with torch.inference_mode():
            plan = tune_gemm_plan(gemm_weights(layers), sizes, compile_threads())
        if plan.choices:  # otherwise the linears keep their empty plan: cuBLAS
            attach_gemm_plan(layers, plan)
        logger.info(
            "GEMMs of weights >= %d MiB tuned for %d batch sizes in %.1f s: %s beat cuBLAS by >= %.0f %%",
            MIN_TUNED_WEIGHT_BYTES >> 20,
            len(sizes),
            time.perf_counter() - start,
            plan.summary(),
            100 * MIN_GAIN,
        )

    @property
    def kv_bytes_per_block(self) -> int:
        m = self.config.model
        local_kv_heads = max(1, m.num_kv_heads // self.tp.size)
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.config.cache.block_size * local_kv_heads * m.head_dim * elem

    def determine_num_blocks(self) -> int:
        """KV blocks that fit: a fixed budget on CPU; on CUDA, gpu_memory_utilization of the device
        less the weights, the peak activations of a profiled forward pass at
        max_num_batched_tokens, and what other allocators (CUDA context, NCCL) hold."""
        explicit = self.config.cache.kv_cache_memory_bytes
        if self.device.type == "cpu" or explicit:
            budget = explicit or DEFAULT_CPU_KV_CACHE_BYTES
            return max(1, budget // self.kv_bytes_per_block)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.runner.profile_run(self.config.scheduler.max_num_batched_tokens)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        budget = (
            total * self.config.cache.gpu_memory_utilization - peak - non_torch - CUDA_GRAPH_RESERVE_BYTES
        )
        num_blocks = int(budget // self.kv_bytes_per_block)
        logger.info(
            "memory profile: %.2f GiB total, %.2f GiB peak torch (weights + activations), %.2f GiB other, "
            "%.2f GiB for the KV cache = %d blocks",
            total / 2**30,
            peak / 2**30,
            non_torch / 2**30,
            max(budget, 0) / 2**30,
            num_blocks,
        )
        torch.cuda.empty_cache()
        if num_blocks < 1:
            raise ValueError(
                f"no memory left for the KV cache at gpu_memory_utilization={self.config.cache.gpu_memory_utilization}"
                f" (weights and activations peak at {peak / 2**30:.1f} GiB of {total / 2**30:.1f} GiB)"
            )
        return num_blocks

    def initialize_cache(self, num_blocks: int) -> None:
        m = self.config.model
        local_kv_heads = max(1, m.num_kv_heads // self.tp.size)
        shape = (2, num_blocks, self.config.cache.block_size, local_kv_heads, m.head_dim)
        # Never read before written: attention only looks at slots below each sequence's length.
        self.runner.kv_caches = [
            torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(m.num_layers)
        ]
        logger.info(
            "KV cache allocated: %d blocks, %.1f MiB",
            num_blocks,
            num_blocks * self.kv_bytes_per_block / 2**20,
        )
        if self.device.type == "cuda" and not self.config.device.enforce_eager:
            reserved = torch.cuda.memory_reserved(self.device)
            start = time.perf_counter()
            sizes, token_sizes = self.runner.capture_cuda_graphs(self.config.scheduler.max_num_batched_tokens)
            logger.info(
                "captured %d decode CUDA graphs (batch sizes up to %d) and %d piecewise graph sets "
                "for other steps (up to %d tokens) in %.1f s; graph pools hold %.2f GiB",
                len(sizes),
                sizes[-1],
                len(token_sizes),
                token_sizes[-1],
                time.perf_counter() - start,
                (torch.cuda.memory_reserved(self.device) - reserved) / 2**30,
            )

    def uses_custom_all_reduce(self) -> bool:
        return self.tp.custom_all_reduce is not None

    def graph_replays(self) -> int:
        """How many steps ran from a captured CUDA graph, decode or piecewise (GPU tests)."""
        runner = self.runner
        if runner is None:
            return 0
        return sum(g.replays for g in (runner.graphs, runner.pieces) if g is not None)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> PendingStep:
        return self.runner.execute_model_async(scheduler_output)

    def shutdown(self) -> None:
        if self.runner is not None:  # free device memory now, not at the next GC cycle
            self.runner.graphs = self.runner.pieces = None
            self.runner.kv_caches = []
        self.runner = None
        self.model = None
