"""Frozen engine configuration, built once from the CLI / keyword arguments (EngineArgs).

It lives in ipc/ because every process is started with it (engine core, each worker) and
workers/ may not import core/.

Nothing in the engine reads environment variables for behaviour: what it needs is here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """The model's generation config as the engine applies it (vLLM's ``--generation-config``).

    ``eos_token_ids`` are the ids the model's generation config names as end of sequence (from
    ``generation_config.json``, else ``config.json``, or a GGUF's eos/eot/eom ids): each ends a
    request as the tokenizer's EOS does unless ``ignore_eos``. The sampling fields (vLLM's
    SamplingParams names; None: not set) are the defaults of requests that leave them unset.
    ``max_tokens_limit`` caps an OpenAI request's max_tokens (vLLM's ``override_max_tokens``: the
    override's max_new_tokens, or the file's when the config comes from a ``--generation-config``
    directory).
    """

    eos_token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    max_tokens_limit: int | None = None

    def sampling_defaults(self) -> dict[str, float | int]:
        """The set sampling fields by SamplingParams name (vLLM's ``get_diff_sampling_param()``)."""
        names = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_tokens")
        return {name: value for name in names if (value := getattr(self, name)) is not None}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model: str  # what the user typed (alias, path)
    path: str  # resolved file or directory
    format: Literal["gguf", "hf"]
    served_model_name: str
    architecture: str
    dtype: str  # resolved: float32 / float16 / bfloat16
    max_model_len: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    eos_token_id: int | None
    bos_token_id: int | None
    load_format: str = "auto"
    tokenizer: str | None = None
    chat_template: str | None = None
    skip_tokenizer_init: bool = False
    seed: int = 0
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    # The HF config as a plain dict (picklable, hashable by identity only).
    hf_config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    # When set, exactly this many KV blocks (vLLM's --num-gpu-blocks-override).
    num_gpu_blocks_override: int | None = None
    # KV-cache budget on CPU devices, in bytes (vLLM's --kv-cache-memory-bytes).
    kv_cache_memory_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    # Schedule step N+1 while step N runs (executors that support it); off = strictly sequential.
    async_scheduling: bool = True


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # "uni": the model runs in the engine-core process; "mp": one worker process per rank.
    distributed_executor_backend: Literal["uni", "mp"] = "uni"
    # Small all-reduces (decode steps) through symmetric memory instead of NCCL, on CUDA with
    # TP > 1 (workers/custom_all_reduce.py); NCCL remains for large messages and as fallback.
    disable_custom_all_reduce: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def check_tp_heads(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Raise ValueError unless ``tp_size`` divides the query heads and divides, or is a multiple of,
    the KV heads (a rank holds whole heads; KV heads fewer than the ranks are replicated). The
    executor checks this before it starts worker processes, so a bad tensor_parallel_size fails at
    once in the parent rather than in every rank; the attention layers check it again."""
    if num_heads % tp_size:
        raise ValueError(
            f"number of attention heads ({num_heads}) is not divisible by tensor_parallel_size ({tp_size})"
        )
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(
                f"number of KV heads ({num_kv_heads}) is not divisible by tensor_parallel_size ({tp_size})"
            )
    elif tp_size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel_size ({tp_size}) must divide the number of KV heads ({num_kv_heads}) "
            f"or be a multiple of it"
        )


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    device: str = "cpu"  # "cpu" or "cuda"
    enforce_eager: bool = False
    # Intra-op threads of a CPU worker. Few: OpenMP threads that spin against other busy
    # processes (the frontend, the engine loop, a test runner) are slower than one thread.
    cpu_threads: int = 1


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: DeviceConfig

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)
