"""benchmarks/serving.py against our real server: a tiny random model, a shrunken shared workload."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.common import make_workload
from frontend.bench.serve import arrival_offsets
from frontend.bench.serve_metrics import summarize
from frontend.bench.server_probe import histogram_means_ms, histogram_totals
from tests.server.conftest import (  # the fixture builds the tiny model once and caches it
    API_KEY,
    REPO,
    TINY_NAME,
    running_server,
    tiny_model_dir,  # noqa: F401
    tiny_server_args,
)

NUM_PROMPTS = 8
INPUT_LENS = (16, 64)
OUTPUT_LENS = (8, 32)
METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def run_benchmark(base_url: str, out: Path, server_pid: int) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "serving.py"),
        "--base-url", base_url,
        "--server-pid", str(server_pid),
        "--api-key", API_KEY,
        "--num-prompts", str(NUM_PROMPTS),
        "--request-rate", "20",
        "--input-len-range", *map(str, INPUT_LENS),
        "--output-len-range", *map(str, OUTPUT_LENS),
        "--disable-tqdm",
        "--out", str(out),
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def check_percentiles(name: str, stats: dict[str, Any]) -> None:
    assert 0 < stats["p50"] <= stats["p90"] <= stats["p95"] <= stats["p99"], (name, stats)
    assert stats["mean"] > 0, (name, stats)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("tokenizer", ["with-tokenizer", "skip-tokenizer-init"])
def test_serving_benchmark_against_our_server(tiny_model_dir: Path, tmp_path: Path, tokenizer: str) -> None:  # noqa: F811
    # Without a tokenizer (random-weight presets) the stream carries token counts, not text.
    extra = ["--skip-tokenizer-init"] if tokenizer == "skip-tokenizer-init" else []
    args = [*tiny_server_args(tiny_model_dir), "--api-key", API_KEY, *extra]
    out = tmp_path / "serving.json"
    with running_server(args, tmp_path / "server.log") as server:
        done = run_benchmark(server.base_url, out, server.proc.pid)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "TTFT" in done.stdout and "TPOT" in done.stdout  # the table

    text = out.read_text()
    assert API_KEY not in text  # the key is never written to a result file
    record = json.loads(text)
    assert record["benchmark"] == "serving"
    assert record["engine"] == "pagedserve" and record["served_model_name"] == TINY_NAME
    assert "version" in record["server_version"] and record["git_commit"]
    results = record["results"]
    assert (results["completed"], results["failed"], record["errors"]) == (NUM_PROMPTS, 0, [])

    _, out_lens = make_workload(n=NUM_PROMPTS, lin=INPUT_LENS, lout=OUTPUT_LENS)
    rows = record["requests"]
    assert [r["requested_output_len"] for r in rows] == out_lens
    assert [r["output_tokens"] for r in rows] == out_lens  # ignore_eos: exactly what was asked
    assert results["total_output_tokens"] == sum(out_lens) and results["output_len_mismatches"] == 0
    assert all(0 < r["ttft_s"] < r["e2e_s"] for r in rows)
    for name in METRICS:
        check_percentiles(name, results[name])
    assert results["ttft_ms"]["p99"] < results["e2e_ms"]["p99"]
    assert results["output_throughput"] > 0 and results["request_throughput"] > 0

    # The server's own view: its TTFT excludes the client's transport, so it is below the client's.
    means = record["breakdown"]["server_histogram_means"]
    assert 0 < means["request_queue_time_mean_ms"] <= means["time_to_first_token_mean_ms"]
    assert means["time_to_first_token_mean_ms"] < results["ttft_ms"]["mean"]
    assert means["e2e_request_latency_mean_ms"] < results["e2e_ms"]["mean"]
    processes = {row["process"] for row in record["breakdown"]["server_cpu"]}
    assert "frontend" in processes and "engine core" in processes
    assert all(row["cpu_per_wall_s"] >= 0 for row in record["breakdown"]["server_cpu"])
    assert record["breakdown"]["client_cpu_per_wall_s"] > 0


def test_arrivals_are_seeded_poisson() -> None:
    offsets = arrival_offsets(4000, rate=20.0, seed=0)
    assert offsets == arrival_offsets(4000, rate=20.0, seed=0)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    assert math.isclose(len(offsets) / offsets[-1], 20.0, rel_tol=0.05)
    assert arrival_offsets(3, rate=math.inf, seed=0) == [0.0, 0.0, 0.0]


def test_histogram_means_from_two_scrapes() -> None:
    def exposition(ttft_sum: float, ttft_count: int) -> str:
        return "\n".join([
            "# HELP pagedserve:time_to_first_token_seconds Time from arrival to the first token.",
            "# TYPE pagedserve:time_to_first_token_seconds histogram",
            f'pagedserve:time_to_first_token_seconds_bucket{{le="0.1",model_name="m"}} {ttft_count}',
            f'pagedserve:time_to_first_token_seconds_sum{{model_name="m"}} {ttft_sum}',
            f'pagedserve:time_to_first_token_seconds_count{{model_name="m"}} {ttft_count}',
            'vllm:e2e_request_latency_seconds_sum{model_name="a"} 3.0',
            'vllm:e2e_request_latency_seconds_count{model_name="a"} 2.0',
            'vllm:e2e_request_latency_seconds_sum{model_name="b"} 1.0',  # labels add up
            'vllm:e2e_request_latency_seconds_count{model_name="b"} 2.0',
        ])  # fmt: skip

    before, after = histogram_totals(exposition(1.0, 10)), histogram_totals(exposition(1.5, 20))
    assert before["time_to_first_token_seconds"] == (1.0, 10.0)
    means = histogram_means_ms(before, after)
    assert math.isclose(means["time_to_first_token_mean_ms"], 50.0)  # 0.5 s over 10 new requests
    assert means["e2e_request_latency_mean_ms"] is None  # nothing observed between the scrapes
    assert histogram_means_ms({}, after)["e2e_request_latency_mean_ms"] == 1000.0


def test_summarize_in_milliseconds() -> None:
    stats = summarize([0.001 * i for i in range(1, 101)])
    assert math.isclose(stats["mean"], 50.5) and math.isclose(stats["p50"], 50.5)
    assert stats["p90"] < stats["p95"] < stats["p99"] <= 100.0
    assert summarize([]) == {"mean": None, "p50": None, "p90": None, "p95": None, "p99": None}
    assert math.isclose(summarize([0.001 * i for i in range(1, 101)], extra=[99.9])["p99.9"], 99.901)
