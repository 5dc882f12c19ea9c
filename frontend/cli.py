"""The command line: ``pagedserve serve MODEL [flags]`` and ``python -m frontend --model MODEL [flags]``.

Flags have vLLM's names and meanings. They become two frozen objects, EngineArgs (the engine)
and ServerConfig (the HTTP layer), and nothing reads the command line or the environment after
that: the API key is taken from ``--api-key`` or, failing that, from ``VLLM_API_KEY`` /
``PAGEDSERVE_API_KEY`` once, here.

Startup order: the engine first (load, profile, allocate the KV cache), then the HTTP server, so
nothing is served before the engine is ready. SIGINT and SIGTERM stop the HTTP server gracefully
and then shut the engine down, leaving no process behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from core.engine_args import DEFAULT_MODEL, EngineArgs
from frontend.server import ServerConfig
from ipc.config import DTYPES, LOAD_FORMATS

if TYPE_CHECKING:  # the engine (torch) is imported only when serving, not for --help
    from frontend.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

API_KEY_ENV_VARS = ("VLLM_API_KEY", "PAGEDSERVE_API_KEY")
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
_HUMAN_INT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)\s*$")


def human_readable_int(value: str) -> int:
    """An integer, optionally with vLLM's size suffixes: k/m/g/t are powers of 1000,
    K/M/G/T powers of 1024 (``--max-model-len 32k``, ``--kv-cache-memory-bytes 4G``)."""
    match = _HUMAN_INT.match(value)
    if match is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer (suffixes k, m, g, K, M, G allowed)")
    number, suffix = match.groups()
    base = 1024 if suffix.isupper() else 1000
    scale = base ** ("kmgt".index(suffix.lower()) + 1) if suffix else 1
    result = float(number) * scale
    if result != int(result):
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number")
    return int(result)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one that the help text does not already explain."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "Default:" in text:
            return text
        return super()._get_help_string(action)


def build_parser(prog: str = "pagedserve serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a model with an OpenAI-compatible API (a drop-in for `vllm serve`).",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="The model to serve (same as --model): a .gguf file, a HF directory with config.json and "
        "safetensors, or a built-in alias.",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help=f"The model to serve (a .gguf file, a HF directory, or a built-in alias). Default: {DEFAULT_MODEL}.",
    )
    model.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="The model name(s) the API accepts in the 'model' field; the first is reported in responses. "
        "Default: the --model string.",
    )
    model.add_argument(
        "--tokenizer", default=None, help="A tokenizer directory or .gguf file to use instead of the model's."
    )
    model.add_argument(
        "--skip-tokenizer-init",
        action="store_true",
        help="Load no tokenizer: prompts must be token ids, outputs carry no text, chat is refused "
        "(for benchmarks on random-weight checkpoints without a tokenizer).",
    )
    model.add_argument(
        "--chat-template",
        default=None,
        help="A chat template (a file path, or the Jinja text itself) replacing the tokenizer's own.",
    )
    model.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="Weight and activation dtype; auto is bfloat16 on "
        "CUDA (float16 for fp16 checkpoints) and float32 on CPU.",
    )  # fmt: skip
    model.add_argument(
        "--load-format",
        default="auto",
        choices=LOAD_FORMATS,
        help="How to load weights: auto (by file type), gguf, safetensors, or dummy (random weights).",
    )
    model.add_argument(
        "--max-model-len",
        type=human_readable_int,
        default=None,
        help="Context length (prompt + completion) in tokens, e.g. 2048 or 32k. Default: the model's "
        "max_position_embeddings.",
    )
    model.add_argument("--seed", type=int, default=0, help="Random seed of the engine.")
    model.add_argument(
        "--generation-config",
        default="auto",
        help="Where request defaults come from: auto (the model's generation_config.json: its EOS ids, "
        "temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), vllm (vLLM's neutral "
        "sampling defaults), or a directory holding a generation_config.json.",
    )
    model.add_argument(
        "--override-generation-config",
        default=None,
        help="A JSON object laid over the generation config's sampling defaults, e.g. '{\"temperature\": 0.5}'.",
    )

    cache = parser.add_argument_group("KV cache")
    cache.add_argument("--block-size", type=int, default=16, choices=(1, 2, 4, 8, 16, 32, 64, 128),
                       help="Tokens per KV-cache block.")  # fmt: skip
    cache.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Reuse the KV cache of shared prompt prefixes across requests.",
    )
    cache.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="Fraction of GPU memory the engine may use (weights, activations and KV cache), in (0, 1].",
    )
    cache.add_argument(
        "--num-gpu-blocks-override",
        type=int,
        default=None,
        help="Use exactly this many KV-cache blocks instead of the profiled number.",
    )
    cache.add_argument(
        "--kv-cache-memory-bytes",
        type=human_readable_int,
        default=None,
        help="KV-cache size in bytes (e.g. 4G), instead of deriving it from --gpu-memory-utilization.",
    )

    sched = parser.add_argument_group("scheduler and parallelism")
    sched.add_argument("--max-num-seqs", type=int, default=256, help="Most sequences in one batch.")
    sched.add_argument(
        "--max-num-batched-tokens",
        type=human_readable_int,
        default=None,
        help="Most tokens scheduled in one step (chunked prefill splits longer prompts). "
        "Default: max(8192, --max-num-seqs).",
    )
    sched.add_argument(
        "--tensor-parallel-size", "-tp", type=int, default=1, help="Number of tensor-parallel ranks (GPUs)."
    )
    sched.add_argument(
        "--disable-custom-all-reduce",
        action="store_true",
        help="Use NCCL for every tensor-parallel all-reduce (default: small ones go through a "
        "symmetric-memory one-shot all-reduce on CUDA, measured faster for decode steps).",
    )
    sched.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="Device to run on; auto picks CUDA when available.")  # fmt: skip
    sched.add_argument(
        "--enforce-eager", action="store_true", help="Never capture CUDA graphs; run every step eagerly."
    )

    server = parser.add_argument_group("server")
    server.add_argument("--host", default=None, help="Address to listen on. Default: every interface.")
    server.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    server.add_argument(
        "--api-key",
        nargs="+",
        default=None,
        help="Require one of these keys as 'Authorization: Bearer <key>' on /v1 routes. "
        f"Default: ${API_KEY_ENV_VARS[0]} or ${API_KEY_ENV_VARS[1]} if set, else no key.",
    )
    server.add_argument("--disable-log-requests", action="store_true", help="Do not log a line per request.")
    server.add_argument(
        "--uvicorn-log-level", default="info", choices=UVICORN_LOG_LEVELS, help="Log level of uvicorn."
    )
    return parser


def parse_args(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, prog: str = "pagedserve serve"
) -> tuple[EngineArgs, ServerConfig]:
    """Flags (and the API-key environment variables) to the frozen configs. Exits with a usage
    message on a bad flag, as argparse does."""
    parser = build_parser(prog)
    args = parser.parse_args(list(argv))
    environ = os.environ if environ is None else environ
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        parser.error(f"the positional model {args.model_tag!r} and --model {args.model!r} disagree")
    model = args.model_tag or args.model or DEFAULT_MODEL
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in [1, 65535], got {args.port}")
    api_keys = tuple(args.api_key or ())
    if not api_keys:  # the first variable that is set wins
        api_keys = next(((environ[name],) for name in API_KEY_ENV_VARS if environ.get(name)), ())
    served = tuple(args.served_model_name or (model,))
    engine_args = EngineArgs(
        model=model,
        served_model_name=served[0],
        tokenizer=args.tokenizer,
        skip_tokenizer_init=args.skip_tokenizer_init,
        chat_template=args.chat_template,
        dtype=args.dtype,
        load_format=args.load_format,
        seed=args.seed,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        enable_prefix_caching=args.enable_prefix_caching,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        tensor_parallel_size=args.tensor_parallel_size,
        disable_custom_all_reduce=args.disable_custom_all_reduce,
        device=args.device,
        enforce_eager=args.enforce_eager,
        generation_config=args.generation_config,
        override_generation_config=args.override_generation_config,
    )
    server_config = ServerConfig(
        model=model,
        served_model_names=served,
        host=args.host,
        port=args.port,
        api_keys=api_keys,
        uvicorn_log_level=args.uvicorn_log_level,
        disable_log_requests=args.disable_log_requests,
    )
    return engine_args, server_config


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C: through the finally blocks that stop the engine.
    raise KeyboardInterrupt


def serve(engine_args: EngineArgs, config: ServerConfig) -> None:
    """Start the engine, then serve HTTP until SIGINT/SIGTERM; the engine is always shut down."""
    import uvicorn

    from frontend.async_llm import AsyncLLM
    from frontend.server.app import create_app

    engine = AsyncLLM.from_engine_args(engine_args)
    try:
        _log_startup(engine, config)
        app = create_app(engine, config)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host or "0.0.0.0",
                port=config.port,
                loop="uvloop",
                lifespan="off",
                log_level=config.uvicorn_log_level,
                timeout_graceful_shutdown=config.graceful_shutdown_s,
            )
        )
        # uvicorn handles SIGINT/SIGTERM while serving, then re-raises them through the handlers
        # installed here, which lands us in the finally below.
        server.run()
    finally:
        logger.info("shutting down the engine")
        engine.shutdown()


def _log_startup(engine: AsyncLLM, config: ServerConfig) -> None:
    max_model_len = engine.config.model.max_model_len
    capacity = engine.kv_capacity_tokens
    host = config.host or "0.0.0.0"
    logger.info(
        "model %s (served as %s), %s, max_model_len %d",
        config.model,
        ", ".join(config.served_model_names),
        engine.config.model.dtype,
        max_model_len,
    )
    logger.info(
        "KV cache: %s tokens; maximum concurrency for %s tokens per request: %.2fx",
        f"{capacity:,}",
        f"{max_model_len:,}",
        capacity / max_model_len,
    )
    logger.info(
        "serving the OpenAI-compatible API on http://%s:%d/v1%s",
        host,
        config.port,
        " (API key required)" if config.api_keys else "",
    )


def run(argv: Sequence[str], prog: str) -> int:
    engine_args, config = parse_args(argv, prog=prog)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve(engine_args, config)
    except KeyboardInterrupt:
        logger.info("stopped")
    except (ValueError, RuntimeError, TimeoutError) as exc:  # a bad model or flag value, a failed start
        logger.debug("startup failed", exc_info=exc)
        logger.error("%s", exc)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``pagedserve`` console script: ``pagedserve serve MODEL [flags]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pagedserve serve [MODEL] [flags]  (pagedserve serve --help lists the flags)")
        return 0 if argv else 2
    if argv[0] != "serve":
        print(f"pagedserve: unknown command {argv[0]!r}; the command is 'serve'", file=sys.stderr)
        return 2
    return run(argv[1:], prog="pagedserve serve")
