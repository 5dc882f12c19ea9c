"""EngineArgs: the flags of ``vllm serve`` / ``LLM(...)`` with vLLM's names, turned into frozen configs."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, fields
from typing import Any

from core.cuda_probe import cuda_available
from ipc.config import (
    DTYPES,
    LOAD_FORMATS,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(slots=True)
class EngineArgs:
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    chat_template: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    async_scheduling: bool = True
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    disable_custom_all_reduce: bool = False
    device: str = "auto"
    enforce_eager: bool = False
    cpu_threads: int | None = None  # None: half the cores, at least 1
    # The frontend's periodic stats line (frontend/stat_logger.py); the engine ignores both.
    disable_log_stats: bool = False
    log_stats_interval: float = 10.0  # seconds between lines
    # "auto" (the model's generation_config.json), "vllm" (neutral sampling defaults) or a
    # directory holding a generation_config.json; see core/generation_config.py.
    generation_config: str = "auto"
    # Laid over the generation config's sampling defaults: a dict, or its JSON text (the CLI's).
    override_generation_config: dict[str, Any] | str | None = None

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def _check(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}")

        if self.dtype not in DTYPES:
            raise bad("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise bad("load_format", f"must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise bad("block_size", f"must be a power of two up to 128, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1:
            raise bad("max_num_seqs", f"must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise bad("max_num_batched_tokens", f"must be at least 1, got {self.max_num_batched_tokens}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise bad("num_gpu_blocks_override", f"must be at least 1, got {self.num_gpu_blocks_override}")
        if self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", f"must be at least 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size != 1:
            raise bad("pipeline_parallel_size", "other than 1 is not supported yet")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise bad("cpu_threads", f"must be at least 1, got {self.cpu_threads}")
        if not self.log_stats_interval > 0:
            raise bad("log_stats_interval", f"must be positive, got {self.log_stats_interval}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", f"must be auto, cpu or cuda, got {self.device!r}")

    def create_engine_config(self) -> EngineConfig:
        # Neither torch nor (for Llama directories) transformers is imported here: this runs in
        # the frontend before the engine process starts, so on a fresh machine their slow imports
        # would come before, not beside, the engine's own start.
        from core.generation_config import load_generation_defaults, parse_override
        from workers.loaders.config import read_hf_config
        from workers.loaders.source import resolve_model

        start = time.perf_counter()
        self._check()
        override = parse_override(self.override_generation_config)
        source = resolve_model(self.model)
        hf = read_hf_config(source)
        read = time.perf_counter()
        device = self.device
        cuda = device != "cpu" and cuda_available()
        if device == "auto":
            device = "cuda" if cuda else "cpu"
        if device == "cuda" and not cuda:
            raise ValueError("device 'cuda' was asked for but no CUDA device is available")
        logger.info(
            "engine config: model config read in %.2f s, device probed in %.2f s",
            read - start,
            time.perf_counter() - read,
        )
        dtype = self.dtype
        if dtype == "auto":
            # fp32 on CPU keeps the CPU path exact against HF transformers.
            dtype = (
                "float32"
                if device == "cpu"
                else ("float16" if (hf.get("dtype") or hf.get("torch_dtype")) == "float16" else "bfloat16")
            )
        load_format = self.load_format
        if load_format == "auto":
            load_format = source.format if source.format == "gguf" else "safetensors"
        if load_format == "gguf" and source.format != "gguf":
            raise ValueError(f"load_format 'gguf' needs a .gguf file, got {source.path}")

        max_pos = int(hf.get("max_position_embeddings") or 2048)
        max_model_len = self.max_model_len or max_pos
        if max_model_len > max_pos:
            raise ValueError(
                f"max_model_len={max_model_len} is longer than the model's max_position_embeddings={max_pos}"
            )
        if max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
        window = hf.get("sliding_window")
        if window and hf.get("use_sliding_window", True) and max_model_len > window:
            raise ValueError(
                f"this model uses sliding-window attention (window {window}), which is not supported yet; "
                f"set max_model_len to at most {window} so that full attention is exact"
            )
        max_batched = self.max_num_batched_tokens or max(8192, self.max_num_seqs)
        if not self.enable_chunked_prefill and max_batched < max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({max_batched}) must be at least "
                f"max_model_len ({max_model_len})"
            )
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        bos = hf.get("bos_token_id")
        backend = self.distributed_executor_backend
        if backend is None:
            backend = "mp" if self.tensor_parallel_size > 1 else "uni"
        if backend not in ("uni", "mp"):
            raise ValueError(f"distributed_executor_backend must be 'uni' or 'mp', got {backend!r}")
        model_config = ModelConfig(
            model=self.model,
            path=str(source.path),
            format=source.format,
            served_model_name=self.served_model_name or self.model,
            architecture=(hf.get("architectures") or ["LlamaForCausalLM"])[0],
            dtype=dtype,
            max_model_len=max_model_len,
            vocab_size=hf["vocab_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            hidden_size=hf["hidden_size"],
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            bos_token_id=bos[0] if isinstance(bos, list) else bos,
            load_format=load_format,
            tokenizer=self.tokenizer,
            chat_template=self.chat_template,
            skip_tokenizer_init=self.skip_tokenizer_init,
            seed=self.seed,
            generation=load_generation_defaults(
                source, hf, hf["vocab_size"], self.generation_config, override
            ),
            hf_config=hf,
        )
        from workers.models.architectures import check_architecture

        check_architecture(model_config.architecture)  # unsupported architectures fail here, clearly
        return EngineConfig(
            model=model_config,
            cache=CacheConfig(
                block_size=self.block_size,
                enable_prefix_caching=self.enable_prefix_caching,
                gpu_memory_utilization=self.gpu_memory_utilization,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=max_batched,
                max_model_len=max_model_len,
                enable_chunked_prefill=self.enable_chunked_prefill,
                async_scheduling=self.async_scheduling,
            ),
            parallel=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                pipeline_parallel_size=self.pipeline_parallel_size,
                distributed_executor_backend=backend,
                disable_custom_all_reduce=self.disable_custom_all_reduce,
            ),
            device=DeviceConfig(
                device=device,
                enforce_eager=self.enforce_eager,
                cpu_threads=self.cpu_threads or max(1, (os.cpu_count() or 2) // 2),
            ),
        )

    def replace(self, **changes: Any) -> EngineArgs:
        return dataclasses.replace(self, **changes)


@dataclass(slots=True)
class AsyncEngineArgs(EngineArgs):
    """The engine arguments of ``AsyncLLM.from_engine_args``: the same fields as EngineArgs, under
    the name vLLM's asyncio users import."""
