"""The command line, in vLLM's shape: ``pagedserve serve MODEL [flags]`` (also
``python -m frontend --model MODEL [flags]``), ``pagedserve chat``, ``pagedserve complete``,
``pagedserve bench throughput|latency|serve`` and ``pagedserve --version``.

Serve flags have vLLM's names and meanings; ``--config FILE.yaml`` supplies any of them from a
file, below the command line. They become two frozen objects, EngineArgs (the engine) and
ServerConfig (the HTTP layer), and nothing reads the command line or the environment after
that: the API key is taken from ``--api-key`` or, failing that, from ``VLLM_API_KEY`` /
``PAGEDSERVE_API_KEY`` once, here.

Startup order: the engine first (load, profile, allocate the KV cache), then the HTTP server, so
nothing is served before the engine is ready. SIGINT and SIGTERM stop the HTTP server gracefully
and then shut the engine down, leaving no process behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

from core.engine_args import DEFAULT_MODEL, EngineArgs
from frontend.config_file import add_config_arg, parse_with_config
from frontend.server import ServerConfig
from frontend.version import package_version
from ipc.config import DTYPES, LOAD_FORMATS
from ipc.logging_setup import LEVEL_ENV, LEVEL_NAMES, setup_logging

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default where it has one that the help text does not already explain."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "Default:" in text:
            return text
        return super()._get_help_string(action)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine's flags (one argument group per config), shared by ``serve`` and the offline
    benchmarks. A flag whose dest is an EngineArgs field reaches the engine with no more code."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help=f"The model (a .gguf file, a HF directory, or a built-in alias). Default: {DEFAULT_MODEL}.",
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
    stats = parser.add_argument_group("engine stats")
    stats.add_argument(
        "--log-stats-interval", type=float, default=10.0, help="Seconds between the engine stats lines."
    )
    stats.add_argument(
        "--disable-log-stats", action="store_true", help="Do not log the periodic engine stats line."
    )


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """The HTTP layer's flags. A flag whose dest is a ServerConfig field reaches it with no more code."""
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
    server.add_argument(
        "--log-level",
        default=None,
        choices=LEVEL_NAMES,
        help=f"Log level of pagedserve's own loggers in every process. Default: ${LEVEL_ENV}, else info.",
    )


def build_parser(prog: str = "pagedserve serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a model with an OpenAI-compatible API (a drop-in for `vllm serve`).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="The model to serve (same as --model): a .gguf file, a HF directory with config.json and "
        "safetensors, or a built-in alias.",
    )
    add_config_arg(parser)
    add_engine_args(parser)
    add_server_args(parser)
    return parser


def _matching_fields(config_class: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed values whose dest names a field of ``config_class``."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}


def engine_args_from(args: argparse.Namespace, model: str | None = None) -> EngineArgs:
    """EngineArgs from parsed engine flags: every field named like a flag's dest takes its value;
    ``model`` (default: --model, else the default model) and the first served name are resolved."""
    served = args.served_model_name
    return EngineArgs(
        **{
            **_matching_fields(EngineArgs, args),
            "model": model or args.model or DEFAULT_MODEL,
            "served_model_name": served[0] if served else None,
        }
    )


def parse_args(
    argv: Sequence[str], environ: Mapping[str, str] | None = None, prog: str = "pagedserve serve"
) -> tuple[EngineArgs, ServerConfig]:
    """Flags (a --config file below them, and the API-key environment variables) to the frozen
    configs. Exits with code 2 and a message on a bad flag or config file, as argparse does."""
    parser = build_parser(prog)
    # The positional MODEL on the command line wins over the file's model, so it is held back.
    args, held = parse_with_config(parser, argv, held=("model",))
    environ = os.environ if environ is None else environ
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        parser.error(f"the positional model {args.model_tag!r} and --model {args.model!r} disagree")
    model = args.model_tag or args.model or held.get("model") or DEFAULT_MODEL
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in [1, 65535], got {args.port}")
    api_keys = tuple(args.api_key or ())
    if not api_keys:  # the first variable that is set wins
        api_keys = next(((environ[name],) for name in API_KEY_ENV_VARS if environ.get(name)), ())
    served = tuple(args.served_model_name or (model,))
    engine_args = engine_args_from(args, model)
    server_config = ServerConfig(
        **{
            **_matching_fields(ServerConfig, args),
            "model": model,
            "served_model_names": served,
            "api_keys": api_keys,
        }
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
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        setup_logging("api_server", config.log_level)
        serve(engine_args, config)
    except KeyboardInterrupt:
        logger.info("stopped")
    except (ValueError, RuntimeError, TimeoutError) as exc:  # a bad model or flag value, a failed start
        logger.debug("startup failed", exc_info=exc)
        logger.error("%s", exc)
        return 1
    return 0


def _chat_command(argv: Sequence[str], prog: str) -> int:
    from frontend.client_cli import chat_main

    return chat_main(argv, prog)


def _complete_command(argv: Sequence[str], prog: str) -> int:
    from frontend.client_cli import complete_main

    return complete_main(argv, prog)


def _bench_command(argv: Sequence[str], prog: str) -> int:
    from frontend.bench.cli import main as bench_main

    return bench_main(argv, prog)


Command = Callable[[Sequence[str], str], int]
# name -> (one-line help, entry point taking the arguments after the name and its prog).
COMMANDS: dict[str, tuple[str, Command]] = {
    "serve": ("Start the OpenAI-compatible server.", run),
    "chat": ("Chat with a running server, interactively or with --quick.", _chat_command),
    "complete": ("Complete prompts with a running server, interactively or with --quick.", _complete_command),
    "bench": ("Benchmark: throughput and latency offline, serve against a running server.", _bench_command),
}


def dispatch(argv: Sequence[str], prog: str, commands: Mapping[str, tuple[str, Command]]) -> int:
    """Run the command named by ``argv[0]``; ``-h`` lists the commands, an unknown one is a
    one-line error and exit code 2."""
    names = ", ".join(commands)
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"usage: {prog} {{{','.join(commands)}}} ...", "", "commands:"]
        width = max(map(len, commands)) + 2
        lines += [f"  {name:<{width}}{text}" for name, (text, _) in commands.items()]
        lines.append(f"\n'{prog} COMMAND --help' lists a command's flags.")
        print("\n".join(lines), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    entry = commands.get(argv[0])
    if entry is None:
        print(f"{prog}: error: unknown command {argv[0]!r} (choose from {names})", file=sys.stderr)
        return 2
    return entry[1](argv[1:], f"{prog} {argv[0]}")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``pagedserve`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-v", "--version"):
        print(package_version())
        return 0
    return dispatch(argv, "pagedserve", COMMANDS)


# The guard matters: the engine core starts with multiprocessing's "spawn", which re-imports the
# main module in the child.
if __name__ == "__main__":
    sys.exit(main())
