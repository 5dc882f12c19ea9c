"""The error matrix: every refusal is OpenAI-shaped, has the right status, and names the field;
bad input never gets a 500."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY, TINY_MAX_MODEL_LEN, TINY_NAME, ServerProcess, error_of

pytestmark = pytest.mark.timeout(120)

USER = [{"role": "user", "content": "hi"}]
CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"

# (route, body, param named in the error, a piece of the message)
BAD_REQUESTS: list[tuple[str, dict[str, Any], str | None, str]] = [
    # wrong types, decoded by msgspec
    (CMPL, {"prompt": "hi", "max_tokens": "ten"}, "max_tokens", "Expected `int | null`"),
    (CMPL, {"prompt": "hi", "temperature": "hot"}, "temperature", "Expected"),
    (CMPL, {"prompt": 5}, "prompt", "Expected"),
    (CMPL, {"prompt": [True]}, "prompt[0]", "Expected"),
    (CMPL, {"prompt": "hi", "stop_token_ids": "x"}, "stop_token_ids", "Expected"),
    (CMPL, {"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias", "Expected `int`"),
    (
        CMPL,
        {"prompt": "hi", "stream_options": {"include_usage": "yes"}},
        "stream_options.include_usage",
        "Expected",
    ),
    (CHAT, {"messages": "hi"}, "messages", "Expected `array`"),
    (CHAT, {"messages": ["hi"]}, "messages[0]", "Expected `object`"),
    (CHAT, {"messages": USER, "logprobs": 3}, "logprobs", "Expected `bool | null`"),
    # missing and unknown fields
    (CMPL, {"max_tokens": 3}, "prompt", "missing required field"),
    (CHAT, {"model": TINY_NAME}, "messages", "missing required field"),
    (CMPL, {"prompt": "hi", "guided_json": {}}, "guided_json", "unknown field"),
    (CHAT, {"messages": USER, "temprature": 0.5}, "temprature", "unknown field"),
    # out-of-range values, with SamplingParams' messages
    (CMPL, {"prompt": "hi", "temperature": -1}, "temperature", "non-negative"),
    (CMPL, {"prompt": "hi", "top_p": 0}, "top_p", "(0, 1]"),
    (CMPL, {"prompt": "hi", "top_k": -5}, "top_k", "top_k"),
    (CMPL, {"prompt": "hi", "min_p": 1.5}, "min_p", "[0, 1]"),
    (CMPL, {"prompt": "hi", "presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    (CMPL, {"prompt": "hi", "frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
    (CMPL, {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty", "greater than zero"),
    (CMPL, {"prompt": "hi", "max_tokens": 0}, "max_tokens", "at least 1"),
    (CMPL, {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, "min_tokens", "max_tokens"),
    (CMPL, {"prompt": "hi", "n": 0}, "n", "at least 1"),
    (CMPL, {"prompt": "hi", "logit_bias": {"5": 500}}, "logit_bias", "[-100, 100]"),
    (CMPL, {"prompt": "hi", "logit_bias": {"99999999": 1}}, "logit_bias", "outside the vocabulary"),
    (CMPL, {"prompt": "hi", "seed": 2**64}, "seed", ""),
    (CMPL, {"prompt": [[1, 2], [99999999]]}, "prompt", "outside the vocabulary"),
    (CMPL, {"prompt": ""}, "prompt", "empty"),
    (CMPL, {"prompt": []}, "prompt", "empty"),
    (CMPL, {"prompt": ["a", [1, 2]]}, "prompt", "mixes"),
    # limits
    (CMPL, {"prompt": "hi", "logprobs": 21}, "logprobs", "between 0 and 20"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    (CHAT, {"messages": []}, "messages", "must not be empty"),
    (
        CMPL,
        {"prompt": "hi", "max_tokens": TINY_MAX_MODEL_LEN},
        "max_tokens",
        f"This model's maximum context length is {TINY_MAX_MODEL_LEN} tokens. However, you requested "
        f"{TINY_MAX_MODEL_LEN + 1} tokens (1 in the prompt, {TINY_MAX_MODEL_LEN} in the completion)",
    ),
    (CMPL, {"prompt": [1] * TINY_MAX_MODEL_LEN}, "prompt", f"maximum context length is {TINY_MAX_MODEL_LEN}"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "hi " * 600}]},
        "messages",
        f"maximum context length is {TINY_MAX_MODEL_LEN} tokens. However, your request has",
    ),
    (CHAT, {"messages": USER, "max_completion_tokens": 10_000}, "max_completion_tokens", "in the messages"),
    # unsupported parameters, refused by name
    (CMPL, {"prompt": "hi", "suffix": "end"}, "suffix", "not supported"),
    (CMPL, {"prompt": "hi", "best_of": 3}, "best_of", "not supported"),
    (CMPL, {"prompt": "hi", "echo": True, "logprobs": 1}, "logprobs", "echo"),
    (CMPL, {"prompt": "hi", "prompt_logprobs": 1}, "prompt_logprobs", "not supported"),
    (CMPL, {"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    (CMPL, {"prompt": "hi", "cache_salt": ""}, "cache_salt", "non-empty"),
    (CHAT, {"messages": USER, "cache_salt": ""}, "cache_salt", "non-empty"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools"),
    (CHAT, {"messages": USER, "tool_choice": "auto"}, "tool_choice", "not supported"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, "response_format", "json_object"),
    (CHAT, {"messages": USER, "functions": [{"name": "f"}]}, "functions", "not supported"),
    (CHAT, {"messages": USER, "reasoning_effort": "high"}, "reasoning_effort", "not supported"),
    (CHAT, {"messages": USER, "store": True}, "store", "not supported"),
    (CHAT, {"messages": USER, "modalities": ["audio"]}, "modalities", "not supported"),
    # bad chat messages and template fields
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "must be one of"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages[0].content", "required"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0].type",
        "",
    ),
    (CHAT, {"messages": USER, "chat_template": "{% if %}"}, "messages", "template"),
    (CHAT, {"messages": USER, "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", "may not set"),
    (CHAT, {"messages": USER, "continue_final_message": True}, "continue_final_message", "cannot both"),
    ("/tokenize", {"prompt": "a", "messages": USER}, "prompt", "exactly one"),
    ("/detokenize", {"tokens": [-1]}, "tokens", "outside the vocabulary"),
]


@pytest.mark.parametrize(
    ("route", "body", "param", "message"), BAD_REQUESTS, ids=[f"{r}:{p}" for r, _, p, _ in BAD_REQUESTS]
)
def test_bad_requests_are_400_naming_the_field(
    client: httpx.Client, route: str, body: dict[str, Any], param: str | None, message: str
) -> None:
    for stream in (False, True) if route in (CMPL, CHAT) and "stream_options" not in body else (False,):
        # Streaming requests are refused the same way, before any event is sent.
        error = error_of(client.post(route, json={**body, "stream": True} if stream else body), 400)
        assert error["type"] == "BadRequestError"
        assert error["param"] == param, error
        assert message in error["message"], error


def test_malformed_bodies(client: httpx.Client) -> None:
    for raw in (b'{"prompt": "hi",', b"not json", b"", b"[1, 2]", b'"just a string"'):
        error = error_of(client.post(CMPL, content=raw, headers={"content-type": "application/json"}), 400)
        assert error["type"] == "BadRequestError"


def test_unknown_model_is_404(client: httpx.Client, openai_client) -> None:
    import openai

    for route, body in ((CMPL, {"prompt": "hi"}), (CHAT, {"messages": USER}), ("/tokenize", {"prompt": "x"})):
        error = error_of(client.post(route, json={**body, "model": "gpt-4"}), 404)
        assert error["param"] == "model" and "gpt-4" in error["message"]
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.completions.create(model=TINY_NAME, prompt="hi", suffix="x")
    assert raised.value.body["param"] == "suffix"


def test_api_key_guards_v1_only(tiny_server: ServerProcess) -> None:
    import openai

    with httpx.Client(base_url=tiny_server.base_url, timeout=30) as http:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": API_KEY},
            {"Authorization": "Basic x"},
        ):
            error_of(http.get("/v1/models", headers=headers), 401)
            error_of(http.post(CHAT, json={"messages": USER}, headers=headers), 401)
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        # Open without a key, as vLLM: probes, scrapers and the tokenizer routes.
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
        assert http.post("/tokenize", json={"prompt": "hi"}).status_code == 200
    sdk = openai.OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        sdk.models.list()


def test_unknown_route_and_method_are_openai_shaped(client: httpx.Client) -> None:
    assert error_of(client.get("/v1/nothing"), 404)["type"] == "NotFoundError"
    assert error_of(client.get(CMPL), 405)["type"] == "MethodNotAllowedError"
