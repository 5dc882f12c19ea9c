"""Every route and request field against the real server process (tiny random model with
SmolLM2's tokenizer), through the official OpenAI SDK and raw httpx + SSE parsing.

Outputs of a random model are gibberish, so the checks are structural, or use greedy decoding
and ``logit_bias`` to force known tokens where exact text matters.
"""

from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import (
    TINY_ALIAS,
    TINY_MAX_MODEL_LEN,
    TINY_NAME,
    ServerProcess,
    stream_events,
)

pytestmark = pytest.mark.timeout(120)

HELLO = 19556  # "Hello" in SmolLM2's vocabulary
EOS = 2  # <|im_end|>
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Again."},
]


def tokenize(client: httpx.Client, **body) -> list[int]:
    response = client.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


# ------------------------------------------------------------------------------------ small routes


def test_models_health_version_metrics(client: httpx.Client, tiny_server: ServerProcess) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [TINY_NAME, TINY_ALIAS]
    assert all(m["object"] == "model" and m["max_model_len"] == TINY_MAX_MODEL_LEN for m in models["data"])
    # Ops routes stay open without the API key, as in vLLM.
    with httpx.Client(base_url=tiny_server.base_url, timeout=30) as bare:
        assert bare.get("/health").status_code == 200
        assert bare.get("/version").json()["version"]
        metrics = bare.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "num_preemptions_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "request_success_total",
        "time_to_first_token_seconds_bucket",
        "time_per_output_token_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "request_queue_time_seconds_bucket",
    ):
        assert f"pagedserve:{name}{{" in metrics.text, name
    assert f'model_name="{TINY_NAME}"' in metrics.text


def test_models_through_the_sdk(openai_client) -> None:
    assert [m.id for m in openai_client.models.list()] == [TINY_NAME, TINY_ALIAS]


def test_tokenize_and_detokenize(client: httpx.Client) -> None:
    body = client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert body == {
        "count": 2,
        "max_model_len": TINY_MAX_MODEL_LEN,
        "tokens": [HELLO, 905],
        "token_strs": ["Hello", "Ġworld"],
    }
    assert client.post("/detokenize", json={"tokens": [HELLO, 905]}).json() == {"prompt": "Hello world"}
    chat = client.post("/tokenize", json={"model": TINY_NAME, "messages": MESSAGES}).json()
    rendered = client.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert rendered.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")  # add_generation_prompt defaults to true
    no_prompt = tokenize(client, messages=MESSAGES, add_generation_prompt=False)
    assert chat["tokens"][: len(no_prompt)] == no_prompt and len(no_prompt) < chat["count"]


# ------------------------------------------------------------------------------------ completions


def test_completion_through_the_sdk(openai_client, client: httpx.Client) -> None:
    out = openai_client.completions.create(
        model=TINY_ALIAS, prompt="Hello world", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.object == "text_completion" and out.model == TINY_NAME and out.id.startswith("cmpl-")
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 2 and out.usage.completion_tokens == 5 and out.usage.total_tokens == 7
    # The same greedy request without a model name, over raw HTTP, gives the same text.
    raw = client.post(
        "/v1/completions",
        json={"prompt": "Hello world", "max_tokens": 5, "temperature": 0, "ignore_eos": True},
    ).json()
    assert raw["choices"][0]["text"] == out.choices[0].text
    assert raw["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # less than one block


def test_completion_prompt_forms_batch_and_n(client: httpx.Client) -> None:
    def complete(prompt, **extra) -> dict:
        body = {"prompt": prompt, "max_tokens": 3, "ignore_eos": True, **extra}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    by_ids = complete([HELLO, 905], temperature=0)
    by_text = complete("Hello world", temperature=0)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]
    batch = complete(["Hello", "Hello world"], n=2, best_of=2)
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2, 3]
    assert batch["usage"]["prompt_tokens"] == 1 + 2 and batch["usage"]["completion_tokens"] == 12
    id_batch = complete([[HELLO], [HELLO, 905, 905]])
    assert len(id_batch["choices"]) == 2 and id_batch["usage"]["prompt_tokens"] == 4
    echoed = complete("Hello world", echo=True)
    assert echoed["choices"][0]["text"].startswith("Hello world")
    echoed_ids = complete([HELLO, 905], echo=True)
    assert echoed_ids["choices"][0]["text"].startswith("Hello world")
    # max_tokens defaults to 16, as in OpenAI's completions API; an explicit null means "as many
    # as max_model_len leaves", as in vLLM.
    response = client.post("/v1/completions", json={"prompt": "Hello", "ignore_eos": True})
    assert response.json()["usage"]["completion_tokens"] == 16
    assert complete("Hello", max_tokens=None)["usage"]["completion_tokens"] == TINY_MAX_MODEL_LEN - 1
    # user is informational; add_special_tokens is accepted (this tokenizer adds none).
    assert complete("Hello", user="someone", add_special_tokens=False)["usage"]["prompt_tokens"] == 1


def test_completion_sampling_fields(client: httpx.Client) -> None:
    def text(**fields) -> dict:
        body = {"prompt": "Hello world", "max_tokens": 6, "ignore_eos": True, **fields}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    greedy = text(temperature=0)["text"]
    assert text(temperature=1.0, top_k=1)["text"] == greedy  # top-1 sampling is greedy
    seeded = text(temperature=1.0, seed=1234)["text"]
    assert text(temperature=1.0, seed=1234)["text"] == seeded
    assert text(temperature=1.0, seed=4321)["text"] != seeded
    # Accepted and applied (their effect on a random model is not checkable token by token).
    for fields in (
        {"top_p": 0.5},
        {"min_p": 0.2},
        {"repetition_penalty": 1.3},
        {"presence_penalty": 1.5, "frequency_penalty": -0.5},
        {"top_k": -1},
    ):
        assert text(temperature=1.0, **fields)["finish_reason"] == "length"

    # logit_bias forces a token; stop strings and stop_token_ids then act on known text.
    forced = {"temperature": 0, "logit_bias": {str(HELLO): 100}}
    assert text(**forced, max_tokens=4)["text"] == "Hello" * 4
    stopped = text(**forced, stop=["lloHe"])
    assert (stopped["text"], stopped["finish_reason"], stopped["stop_reason"]) == ("He", "stop", "lloHe")
    kept = text(**forced, stop="lloHe", include_stop_str_in_output=True)
    assert kept["text"] == "HelloHe"
    by_token = text(**forced, stop_token_ids=[HELLO], ignore_eos=False)
    assert (by_token["finish_reason"], by_token["stop_reason"]) == ("stop", HELLO)

    # EOS forced: stops at once, unless ignore_eos or min_tokens say otherwise.
    eos = {"temperature": 0, "logit_bias": {str(EOS): 100}, "ignore_eos": False}
    assert text(**eos)["finish_reason"] == "stop"
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 9, "min_tokens": 3, **eos})
    assert response.json()["usage"]["completion_tokens"] == 4  # 3 masked, then EOS
    specials = text(**{**eos, "ignore_eos": True}, max_tokens=2, skip_special_tokens=False)
    assert specials["text"] == "<|im_end|><|im_end|>"
    assert text(**{**eos, "ignore_eos": True}, max_tokens=2)["text"] == ""


def test_completion_logprobs(client: httpx.Client) -> None:
    body = {"prompt": "Hello world", "max_tokens": 5, "ignore_eos": True, "temperature": 0, "logprobs": 3}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 5
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert 3 <= len(top) <= 4 and token in top
        assert logprob == pytest.approx(max(top.values()))  # greedy: the sampled token is the top one
    assert client.post("/v1/completions", json={**body, "logprobs": 0}).json()["choices"][0]["logprobs"]


def test_completion_usage_reports_cached_prompt_tokens(client: httpx.Client) -> None:
    prompt = " ".join(f"word{i}" for i in range(60))  # well over two 16-token blocks
    body = {"prompt": prompt, "max_tokens": 2, "ignore_eos": True}
    client.post("/v1/completions", json=body)
    usage = client.post("/v1/completions", json=body).json()["usage"]
    assert usage["prompt_tokens"] > 32
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 32


def test_cache_salt_isolates_the_prefix_cache(client: httpx.Client) -> None:
    prompt = " ".join(f"salted{i}" for i in range(60))
    body = {"prompt": prompt, "max_tokens": 2, "ignore_eos": True}

    def cached(**extra: str) -> int:
        return client.post("/v1/completions", json={**body, **extra}).json()["usage"][
            "prompt_tokens_details"
        ]["cached_tokens"]

    assert cached(cache_salt="tenant-a") == 0
    assert cached(cache_salt="tenant-b") == 0
    assert cached() == 0
    assert cached(cache_salt="tenant-a") >= 32
    messages = [{"role": "user", "content": prompt}]
    chat = {"messages": messages, "max_tokens": 2, "cache_salt": "tenant-c"}
    client.post("/v1/chat/completions", json=chat)
    usage = client.post("/v1/chat/completions", json=chat).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 32


def test_completion_streaming(client: httpx.Client) -> None:
    body = {"prompt": "Hello world", "max_tokens": 7, "ignore_eos": True, "temperature": 0}
    whole = client.post("/v1/completions", json=body).json()
    events = stream_events(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    *chunks, usage_chunk = events
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 7
    assert usage_chunk["usage"]["total_tokens"] == 9

    # A batch with n: every choice index streams to its own finish; echo goes first.
    events = stream_events(
        client,
        "/v1/completions",
        {**body, "prompt": ["Hello", "Hello world"], "n": 2, "echo": True},
    )
    texts: dict[int, str] = {}
    finished = set()
    for event in events:
        (choice,) = event["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"]:
            finished.add(choice["index"])
    assert finished == {0, 1, 2, 3}
    assert texts[0].startswith("Hello") and texts[3].startswith("Hello world")

    # logprobs ride along with the text they belong to.
    events = stream_events(client, "/v1/completions", {**body, "logprobs": 2})
    tokens = [t for e in events for t in e["choices"][0]["logprobs"]["tokens"]]
    assert (
        len(tokens) == 7 and "".join(e["choices"][0]["text"] for e in events) == whole["choices"][0]["text"]
    )
    offsets = [o for e in events for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets[0] == 0 and offsets == sorted(offsets)

    # continuous_usage_stats: usage on every chunk, growing.
    events = stream_events(
        client, "/v1/completions", {**body, "stream_options": {"continuous_usage_stats": True}}
    )
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 7


# ------------------------------------------------------------------------------------ chat


def test_chat_through_the_sdk(openai_client, client: httpx.Client) -> None:
    prompt_tokens = len(tokenize(client, messages=MESSAGES))
    out = openai_client.chat.completions.create(
        model=TINY_NAME,
        messages=MESSAGES,
        max_completion_tokens=5,
        temperature=0,
        user="tester",
        extra_body={"ignore_eos": True},
    )
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == prompt_tokens and out.usage.completion_tokens == 5
    legacy = openai_client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    assert legacy.choices[0].message.content == choice.message.content
    many = openai_client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, max_tokens=3, n=3, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in many.choices] == [0, 1, 2] and many.usage.completion_tokens == 9
    # Without a limit, the completion may use whatever max_model_len leaves.
    rest = openai_client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True}
    )
    assert rest.usage.total_tokens == TINY_MAX_MODEL_LEN and rest.choices[0].finish_reason == "length"


def test_chat_logprobs(openai_client) -> None:
    out = openai_client.chat.completions.create(
        model=TINY_NAME,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the sampled token ranks first
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.bytes == list(entry.token.encode())
    bare = openai_client.chat.completions.create(
        model=TINY_NAME, messages=MESSAGES, max_tokens=2, logprobs=True, extra_body={"ignore_eos": True}
    )
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[], []]


def test_chat_streaming_through_the_sdk(openai_client) -> None:
    common = {"model": TINY_NAME, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}
    whole = openai_client.chat.completions.create(**common, extra_body={"ignore_eos": True})
    stream = openai_client.chat.completions.create(
        **common, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_streaming_raw_sse(client: httpx.Client) -> None:
    body = {
        "messages": MESSAGES,
        "max_tokens": 3,
        "n": 2,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 1,
    }
    events = stream_events(client, "/v1/chat/completions", body)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    roles = [e["choices"][0]["index"] for e in events if e["choices"][0]["delta"].get("role") == "assistant"]
    assert sorted(roles) == [0, 1]  # one role chunk per choice, before any content
    assert all(e["choices"][0]["delta"] == {"role": "assistant", "content": ""} for e in events[:2])
    tokens = {0: 0, 1: 0}
    for event in events[2:]:
        (choice,) = event["choices"]
        assert "role" not in choice["delta"]
        tokens[choice["index"]] += len(choice["logprobs"]["content"])
    assert tokens == {0: 3, 1: 3}


def test_chat_template_fields(client: httpx.Client) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    body = {"messages": MESSAGES, "chat_template": template, "max_tokens": 1, "ignore_eos": True}
    out = client.post("/v1/chat/completions", json=body).json()
    expected = tokenize(client, prompt="".join(f"[{m['role']}] {m['content']}\n" for m in MESSAGES))
    assert out["usage"]["prompt_tokens"] == len(expected)
    # continue_final_message: the last (assistant) turn stays open for the model to extend.
    open_turn = [*MESSAGES[:3]]
    ids = tokenize(client, messages=open_turn, add_generation_prompt=False, continue_final_message=True)
    assert client.post("/detokenize", json={"tokens": ids}).json()["prompt"].endswith("Hi.")
    out = client.post(
        "/v1/chat/completions",
        json={
            "messages": open_turn,
            "add_generation_prompt": False,
            "continue_final_message": True,
            "max_tokens": 1,
            "ignore_eos": True,
        },
    )
    assert out.status_code == 200 and out.json()["usage"]["prompt_tokens"] == len(ids)
    # Content parts of type text are joined; response_format text and tool_choice none are no-ops.
    parts = {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi."}]}
    out = client.post(
        "/v1/chat/completions",
        json={
            "messages": [parts],
            "max_tokens": 1,
            "response_format": {"type": "text"},
            "tool_choice": "none",
            "tools": [],
        },
    )
    assert out.status_code == 200, out.text
