"""``pagedserve chat``, ``pagedserve complete`` and ``pagedserve bench serve`` against the real
server on the default model (SmolLM2-135M-Instruct). The clients' streamed answers are judged
against the server's non-streamed answers fetched with another client (httpx)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from frontend.cli import main
from tests.server.conftest import ServerProcess

QUESTION = "What is the capital of France?"
METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{server.base_url}/v1{path}", json=body, timeout=120.0)
    assert response.status_code == 200, response.text
    return response.json()


def model_id(server: ServerProcess) -> str:
    return httpx.get(f"{server.base_url}/v1/models", timeout=30.0).json()["data"][0]["id"]


def chat_answer(server: ServerProcess, messages: list[dict[str, str]], **sampling: Any) -> str:
    body = {"model": model_id(server), "messages": messages, **sampling}
    return post(server, "/chat/completions", body)["choices"][0]["message"]["content"]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_quick_answers_paris(default_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"{default_server.base_url}/v1"
    code, out, err = run_cli(["chat", "--url", url, "-q", QUESTION, "--temperature", "0"], capsys)
    assert code == 0, err
    assert "Paris" in out
    expected = chat_answer(default_server, [{"role": "user", "content": QUESTION}], temperature=0)
    assert out == expected + "\n"  # the streamed pieces add up to the whole answer


def test_complete_quick(default_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = "The capital of France is"
    argv = ["complete", "--url", f"{default_server.base_url}/v1", "--quick", prompt]
    code, out, err = run_cli([*argv, "--temperature", "0", "--max-tokens", "12"], capsys)
    assert code == 0, err
    body = {"model": model_id(default_server), "prompt": prompt, "temperature": 0, "max_tokens": 12}
    expected = post(default_server, "/completions", body)["choices"][0]["text"]
    assert expected.strip() and out == expected + "\n"


def test_chat_repl_keeps_the_conversation(
    default_server: ServerProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    system = "You are a geography teacher. Answer in one sentence."
    follow_up = "And of Italy?"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n{follow_up}\n"))
    argv = ["chat", "--url", f"{default_server.base_url}/v1", "--system-prompt", system]
    code, out, err = run_cli([*argv, "--temperature", "0", "--max-tokens", "24"], capsys)
    assert code == 0, err

    messages = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
    first = chat_answer(default_server, messages, temperature=0, max_tokens=24)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": follow_up}]
    second = chat_answer(default_server, messages, temperature=0, max_tokens=24)
    assert out == f"{first}\n{second}\n"  # the second answer saw the first exchange


def test_complete_repl_answers_every_line(
    default_server: ServerProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts = ["The capital of France is", "1, 2, 3,"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{p}\n" for p in prompts)))
    argv = ["complete", "--url", f"{default_server.base_url}/v1", "--temperature", "0", "--max-tokens", "8"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    model = model_id(default_server)
    expected = [
        post(default_server, "/completions", {"model": model, "prompt": p, "temperature": 0, "max_tokens": 8})
        for p in prompts
    ]
    assert out == "".join(e["choices"][0]["text"] + "\n" for e in expected)


def test_repl_goes_on_after_a_refused_request(
    default_server: ServerProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n"))
    argv = ["chat", "--url", f"{default_server.base_url}/v1", "--max-tokens", "100000"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0 and out == ""
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: HTTP 400") for line in lines), err
    assert "max_model_len" in lines[0] or "2048" in lines[0]  # the 400 says the limit


def test_refused_request_is_a_one_line_error(
    default_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["chat", "--url", f"{default_server.base_url}/v1", "--model-name", "no-such-model", "-q", "hi"]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("pagedserve chat: error: HTTP 404") and "no-such-model" in err


def test_bench_serve_writes_percentiles(
    default_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    num_prompts, input_len, output_len = 5, 24, 6
    result_file = tmp_path / "serve.json"
    argv = [
        "bench", "serve", "--base-url", default_server.base_url,
        "--num-prompts", str(num_prompts), "--input-len", str(input_len), "--output-len", str(output_len),
        "--ignore-eos", "--request-rate", "50", "--max-concurrency", "3", "--metric-percentiles", "50,99.9",
        "--server-pid", str(default_server.proc.pid), "--result-file", str(result_file), "--disable-tqdm",
    ]  # fmt: skip
    code, out, err = run_cli(argv, capsys)
    assert code == 0, out + err
    for line in ("Successful requests:", "Mean TTFT (ms):", "Median TPOT (ms):", "P99.9 ITL (ms):",
                 "Request throughput (req/s):", "Output token throughput (tok/s):"):  # fmt: skip
        assert line in out, line

    record = json.loads(result_file.read_text())
    results = record["results"]
    assert (record["benchmark"], record["engine"], record["model"]) == (
        "serving",
        "pagedserve",
        model_id(default_server),
    )
    assert (results["completed"], results["failed"], record["errors"]) == (num_prompts, 0, [])
    assert len(record["requests"]) == num_prompts and results["output_len_mismatches"] == 0
    assert results["total_input_tokens"] == num_prompts * input_len
    assert results["total_output_tokens"] == num_prompts * output_len  # ignore_eos: exactly as asked
    assert all(r["output_tokens"] == output_len and 0 < r["ttft_s"] < r["e2e_s"] for r in record["requests"])
    for name in METRICS:
        stats = results[name]
        assert set(stats) == {"mean", "p50", "p90", "p95", "p99", "p99.9"}, name
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p95"] <= stats["p99"] <= stats["p99.9"], (
            name,
            stats,
        )
        assert stats["mean"] > 0
    # TTFT and ITL both lie inside the request: a request's e2e bounds them.
    assert (
        results["ttft_ms"]["p99"] <= results["e2e_ms"]["p99"]
        and results["itl_ms"]["p50"] <= results["e2e_ms"]["p50"]
    )
    assert results["request_throughput"] > 0 and results["output_throughput"] > 0
    assert (
        0
        < record["breakdown"]["server_histogram_means"]["time_to_first_token_mean_ms"]
        < results["ttft_ms"]["mean"]
    )
    assert record["settings"]["request_rate"] == 50.0 and record["settings"]["max_concurrency"] == 3
