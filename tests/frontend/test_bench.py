"""``pagedserve bench throughput`` and ``bench latency`` on a tiny random-weight Llama on CPU:
they run, and their JSON records count what was asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from frontend.cli import main
from tests.checkpoints import tiny_config

ENGINE_FLAGS = ["--load-format", "dummy", "--skip-tokenizer-init", "--device", "cpu",
                "--max-model-len", "128", "--num-gpu-blocks-override", "64"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config.json only: --load-format dummy makes the random weights."""
    path = tmp_path_factory.mktemp("tiny-bench")
    tiny_config().save_pretrained(path)
    return path


def test_bench_throughput(tiny_config_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    num_prompts, input_len, output_len = 6, 20, 5
    out = tmp_path / "throughput.json"
    argv = ["bench", "throughput", "--model", str(tiny_config_dir), "--served-model-name", "tiny", *ENGINE_FLAGS,
            "--num-prompts", str(num_prompts), "--input-len", str(input_len), "--output-len", str(output_len),
            "--num-iters", "2", "--result-file", str(out), "--disable-tqdm"]  # fmt: skip
    assert main(argv) == 0
    assert "output tokens/s" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert (record["benchmark"], record["model"], record["num_requests"]) == (
        "throughput",
        "tiny",
        num_prompts,
    )
    assert (record["prompt_tokens"], record["output_tokens"]) == (
        num_prompts * input_len,
        num_prompts * output_len,
    )
    assert len(record["runs_s"]) == 2 and record["elapsed_s"] > 0 and record["time_to_ready_s"] > 0
    assert record["output_tokens_per_s"] == pytest.approx(num_prompts * output_len / record["elapsed_s"])
    assert record["total_tokens_per_s"] > record["output_tokens_per_s"] > 0
    assert record["kv_capacity_tokens"] == 64 * 16 and record["settings"]["num_iters"] == 2
    assert record["git_commit"] and record["device"].startswith("CPU")


def test_bench_latency(tiny_config_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batch, iters, output_len = 3, 4, 6
    out = tmp_path / "latency.json"
    argv = ["bench", "latency", "--model", str(tiny_config_dir), *ENGINE_FLAGS, "--batch-size", str(batch),
            "--input-len", "16", "--output-len", str(output_len), "--num-iters", str(iters),
            "--num-iters-warmup", "1", "--output-json", str(out), "--disable-tqdm"]  # fmt: skip
    assert main(argv) == 0
    assert "Avg latency:" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["benchmark"] == "latency" and record["model"] == str(tiny_config_dir)
    assert len(record["latencies"]) == iters and record["avg_latency"] == pytest.approx(
        sum(record["latencies"]) / iters
    )
    assert len(record["ttft_ms_all"]) == len(record["ms_per_output_token_all"]) == batch * iters
    values = [record["percentiles"][p] for p in ("10", "25", "50", "75", "90", "99")]
    assert values[0] > 0 and values == sorted(values) and values[-1] <= max(record["latencies"])
    # A request's first token comes before the batch ends.
    assert 0 < record["ttft_ms_median"] < 1000 * record["e2e_s_median"]
    assert record["ms_per_output_token_median"] > 0
