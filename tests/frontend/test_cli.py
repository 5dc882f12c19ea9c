"""The ``pagedserve`` command line without an engine: --version, the commands, --config files,
the bench commands' flags and datasets, the old benchmark scripts' translation, and the chat
client's errors."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from benchmarks import latency as latency_script
from benchmarks import serving as serving_script
from benchmarks import throughput as throughput_script
from core.engine_args import EngineArgs
from frontend import cli, version
from frontend.bench import cli as bench_cli
from frontend.bench.datasets import make_workload, random_range, sample_workload
from frontend.cli import main, parse_args
from tests.server.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
PYPROJECT_VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def one_line_error(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err


# ------------------------------------------------------------------------------------ version, commands


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([flag]) == 0
    printed = capsys.readouterr().out.strip()
    try:
        expected = importlib.metadata.version("pagedserve")
    except importlib.metadata.PackageNotFoundError:
        expected = PYPROJECT_VERSION
    assert printed == expected


def test_version_from_pyproject_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert version.package_version() == PYPROJECT_VERSION


def test_console_entry_point_exit_codes() -> None:
    env_path = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "frontend.cli", "--version"], capture_output=True, text=True, env=env_path
    )
    assert done.returncode == 0 and done.stdout.strip() == version.package_version()
    done = subprocess.run(
        [sys.executable, "-m", "frontend.cli", "launch"], capture_output=True, text=True, env=env_path
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "'launch'" in done.stderr


def test_unknown_commands_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in one_line_error(capsys, "pagedserve")
    assert main(["bench", "nope"]) == 2
    assert "unknown command 'nope'" in one_line_error(capsys, "pagedserve bench")
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("serve", "chat", "complete", "bench"))


# ------------------------------------------------------------------------------------ --config


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_file_values_below_the_command_line(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        "model: from-file\n"
        "max-model-len: 4k\n"  # a flag's own type: 4k is 4000
        "max_num_seqs: 7\n"  # the underscore spelling
        "enforce-eager: true\n"
        "enable-prefix-caching: false\n"
        "served-model-name: [a, b]\n"
        "api-key: [k1]\n"
        "gpu-memory-utilization: 0.5\n"
        "dtype: float16\n"
        "port: 9001\n",
    )
    engine, server = parse_args(["--config", config], environ={})
    assert (engine.model, engine.max_model_len, engine.max_num_seqs) == ("from-file", 4000, 7)
    assert engine.enforce_eager and not engine.enable_prefix_caching
    assert (engine.gpu_memory_utilization, engine.dtype) == (0.5, "float16")
    assert server.served_model_names == ("a", "b") and server.api_keys == ("k1",) and server.port == 9001

    engine, server = parse_args(
        ["cli-model", "--config", config, "--max-model-len", "100", "--served-model-name", "z",
         "--enable-prefix-caching", "--port", "9002"],
        environ={},
    )  # fmt: skip
    assert (engine.model, engine.max_model_len, engine.max_num_seqs) == ("cli-model", 100, 7)
    assert engine.enable_prefix_caching and server.served_model_names == ("z",) and server.port == 9002
    engine, _ = parse_args(["--config", config, "--model", "flag-model"], environ={})
    assert engine.model == "flag-model"
    assert (
        parse_args(["--config", write(tmp_path, "", "empty.yaml")], environ={})[0]
        == parse_args([], environ={})[0]
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max-modle-len: 4096\n", "'max-modle-len' is not a flag"),
        ("config: other.yaml\n", "'config' is not a flag"),
        ("help: true\n", "cannot be set from a config file"),
        ("max-model-len: [1\n", "is not valid YAML"),
        ("- max-model-len\n", "must map flag names to values"),
        ("enforce-eager: yes please\n", "takes true or false"),
        ("max-model-len: [1, 2]\n", "takes one value, not a list"),
        ("max-model-len:\n", "has no value"),
        ("max-model-len: lots\n", "argument --max-model-len"),
        ("dtype: int3\n", "invalid choice"),
        ("max-model-len: 1\nmax_model_len: 2\n", "set the same flag"),
    ],
)
def test_bad_config_file_is_a_one_line_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    text: str,
    message: str,
) -> None:
    started = []
    monkeypatch.setattr(cli, "serve", lambda *args: started.append(args))
    config = write(tmp_path, text)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--config", config])
    assert exited.value.code == 2 and started == []  # nothing started
    err = one_line_error(capsys, "pagedserve serve")
    assert message in err and config in err


@pytest.mark.parametrize("kind", ["missing", "directory", "binary"])
def test_unreadable_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    path = tmp_path / "config.yaml"
    if kind == "directory":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(SystemExit) as exited:
        parse_args(["--config", str(path)], environ={})
    assert exited.value.code == 2
    assert str(path) in one_line_error(capsys, "pagedserve serve")


# ------------------------------------------------------------------------------------ bench flags


def bench_args(name: str, argv: list[str]):
    module = bench_cli.benchmark_module(name)
    parser = bench_cli.build_parser(module, f"pagedserve bench {name}")
    args = parser.parse_args(argv)
    module.check_args(parser, args)
    return args


def test_bench_engine_flags_reach_the_engine_args() -> None:
    args = bench_args("throughput", ["--model", "m", "--max-model-len", "2k", "-tp", "2", "--enforce-eager",
                                     "--load-format", "dummy", "--dtype", "float16", "--seed", "5"])  # fmt: skip
    engine = cli.engine_args_from(args)
    assert engine == EngineArgs(
        model="m", max_model_len=2000, tensor_parallel_size=2, enforce_eager=True, load_format="dummy",
        dtype="float16", seed=5,
    )  # fmt: skip
    # Every engine flag of serve is a flag of the offline benchmarks too, with the same dest.
    serve_dests = {a.dest for a in cli.build_parser()._actions} & {
        f.name for f in dataclasses.fields(EngineArgs)
    }
    for name in ("throughput", "latency"):
        parser = bench_cli.build_parser(bench_cli.benchmark_module(name), name)
        assert serve_dests <= {a.dest for a in parser._actions}


def shared_reference():
    """../shared/bench/workload.py, the workload's own definition, where this checkout has it."""
    for base in (REPO.parent, REPO.parents[1], REPO):
        path = base / "shared" / "bench" / "workload.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location("shared_workload", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.make
    pytest.skip("../shared/bench/workload.py is not next to this checkout")


def test_shared_dataset_is_the_shared_workload() -> None:
    make = shared_reference()
    assert sample_workload(bench_args("throughput", ["--dataset-name", "shared"])) == make()
    args = bench_args("serve", ["--dataset-name", "shared", "--num-prompts", "5", "--seed", "3",
                                "--shared-input-len-range", "10", "20", "--shared-output-len-range", "4", "8"])  # fmt: skip
    assert sample_workload(args) == make(n=5, lin=(10, 20), lout=(4, 8), seed=3)


def test_random_dataset_lengths() -> None:
    prompts, out_lens = sample_workload(
        bench_args("serve", ["--input-len", "30", "--output-len", "7", "--num-prompts", "6"])
    )
    assert [len(p) for p in prompts] == [30] * 6 and out_lens == [7] * 6
    args = bench_args("throughput", ["--random-input-len", "100", "--random-output-len", "40",
                                     "--random-range-ratio", "0.5", "--num-prompts", "400"])  # fmt: skip
    prompts, out_lens = sample_workload(args, vocab=50)
    assert len(prompts) == 400 and {len(p) for p in prompts} <= set(range(50, 151))
    assert min(map(len, prompts)) < 60 and max(map(len, prompts)) > 140  # the whole range is used
    assert set(out_lens) <= set(range(20, 61)) and max(t for p in prompts for t in p) < 50
    assert random_range(562, 0.822) == (100, 1024)  # the shared workload's bounds, as vLLM computes them
    assert len(sample_workload(bench_args("serve", []))[0]) == 1000  # vLLM's default size
    assert sample_workload(args)[1] == make_workload(n=400, lin=(50, 150), lout=(20, 60))[1]


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("serve", ["--random-range-ratio", "1.0"], "--random-range-ratio"),
        ("serve", ["--dataset-name", "shared", "--input-len", "5"], "--input-len applies to the random"),
        ("serve", ["--request-rate", "0"], "--request-rate"),
        ("serve", ["--percentile-metrics", "ttft,foo"], "unknown metric(s) foo"),
        ("serve", ["--metric-percentiles", "99,x"], "--metric-percentiles"),
        ("serve", ["--metadata", "novalue"], "KEY=VALUE"),
        ("throughput", ["--num-prompts", "0"], "--num-prompts"),
        ("latency", ["--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_bench_flags_exit_2(
    name: str, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", name, *argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_benchmark_scripts_translate_to_bench_flags() -> None:
    args = bench_args("throughput", throughput_script.bench_argv(
        ["--model", "smollm2-135m", "--repeats", "3", "--out", "t.json", "--max-num-seqs", "64"])[1:])  # fmt: skip
    assert Path(args.model, "config.json").is_file() and args.served_model_name == ["smollm2-135m"]
    assert (args.num_iters, args.result_file, args.max_num_seqs, args.temperature) == (3, "t.json", 64, 0.6)
    assert (args.dataset_name, args.load_format, args.skip_tokenizer_init) == ("shared", "dummy", True)
    assert (args.max_model_len, args.max_num_batched_tokens) == (2048, 16384)

    args = bench_args(
        "latency", latency_script.bench_argv(["--model", "llama3-8b", "--repeats", "2", "-tp", "2"])[1:]
    )
    assert (args.batch_size, args.input_len, args.output_len, args.num_iters) == (1, 128, 512, 2)
    assert (args.max_model_len, args.tensor_parallel_size) == (128 + 512 + 16, 2)
    assert args.result_file == str(Path("benchmarks/results/latency_llama3-8b.json"))

    args = bench_args("serve", serving_script.bench_argv(
        ["--model", "served", "--model-label", "llama3-8b", "--engine-label", "vllm", "--server-tensor-parallel-size",
         "2", "--input-len-range", "16", "64", "--out", "s.json", "--request-rate", "4", "--base-url", "http://h:1"])[1:])  # fmt: skip
    assert (args.served_model_name, args.model, args.label, args.result_file) == (
        "served",
        "llama3-8b",
        "vllm",
        "s.json",
    )
    assert args.metadata == ["tensor_parallel_size=2"] and args.shared_input_len_range == [16, 64]
    assert (args.dataset_name, args.ignore_eos, args.request_rate, args.base_url) == (
        "shared",
        True,
        4.0,
        "http://h:1",
    )


# ------------------------------------------------------------------------------------ chat, complete


@pytest.mark.parametrize("command", ["chat", "complete"])
def test_client_without_a_server(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert main([command, "--url", url, "--quick", "hello"]) == 1
    assert "cannot reach" in one_line_error(capsys, f"pagedserve {command}")
