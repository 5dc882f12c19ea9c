"""The default model behind the server answers as it does offline: greedy SmolLM2-135M-Instruct
says "The capital of France is Paris." through the OpenAI SDK, streaming and not."""

from __future__ import annotations

import pytest

from tests.server.conftest import DEFAULT_MODEL, ServerProcess

pytestmark = pytest.mark.timeout(300)

MODEL = DEFAULT_MODEL
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."


@pytest.fixture(scope="module")
def sdk(default_server: ServerProcess):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=f"{default_server.base_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_greedy_chat_answers_paris(sdk) -> None:
    (model,) = sdk.models.list()
    assert model.id == MODEL  # without --served-model-name, the --model string
    out = sdk.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    assert out.choices[0].message.content == ANSWER
    assert out.choices[0].finish_reason == "stop"


def test_greedy_chat_streams_paris(sdk) -> None:
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 8  # seven text tokens and <|im_end|>


def test_stop_strings_on_real_text(sdk) -> None:
    out = sdk.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=32, stop=["Paris"]
    )
    choice = out.choices[0]
    assert (choice.message.content, choice.finish_reason) == ("The capital of France is ", "stop")
    assert choice.model_extra["stop_reason"] == "Paris"
    kept = sdk.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,
        stop=["Paris"],
        extra_body={"include_stop_str_in_output": True},
    )
    assert kept.choices[0].message.content == "The capital of France is Paris"
    completion = sdk.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=12, stop=["\n"]
    )
    choice = completion.choices[0]
    assert (choice.text, choice.finish_reason, choice.model_extra["stop_reason"]) == (" Paris.", "stop", "\n")
