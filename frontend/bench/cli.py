"""``pagedserve bench throughput|latency|serve``: each subcommand is a module with
``add_cli_args(parser)``, ``check_args(parser, args)`` (argparse errors, exit code 2) and
``run(args) -> exit code``; a benchmark that cannot run (a model that does not load, a server
that is not there) is a one-line error and exit code 1."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from frontend.cli import HelpFormatter, dispatch

# name -> (one-line help, module under frontend.bench)
BENCHMARKS = {
    "throughput": ("Offline throughput of a dataset through the LLM API.", "throughput"),
    "latency": ("Offline latency of one batch through the LLM API.", "latency"),
    "serve": ("Online serving: a load generator for a running OpenAI-compatible server.", "serve"),
}


class _Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Flag defaults shown, and the module docstring kept as written."""


def benchmark_module(name: str) -> ModuleType:
    return importlib.import_module(f"frontend.bench.{BENCHMARKS[name][1]}")


def build_parser(module: ModuleType, prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=module.__doc__, formatter_class=_Formatter)
    module.add_cli_args(parser)
    return parser


def run_benchmark(name: str, argv: Sequence[str], prog: str) -> int:
    module = benchmark_module(name)
    parser = build_parser(module, prog)
    args = parser.parse_args(list(argv))
    module.check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    try:
        return module.run(args)
    except (ValueError, RuntimeError, TimeoutError) as exc:  # a bad model or value, a failed start
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str], prog: str = "pagedserve bench") -> int:
    commands = {
        name: (text, lambda rest, sub_prog, name=name: run_benchmark(name, rest, sub_prog))
        for name, (text, _) in BENCHMARKS.items()
    }
    return dispatch(argv, prog, commands)
