"""The offline LLM API on the default model (SmolLM2-135M-Instruct, Q4_1 GGUF), against HF
transformers loading the same file in fp32."""

from __future__ import annotations

import pytest
import torch

from frontend import LLM, SamplingParams
from workers.loaders.source import resolve_model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "In 1969, the first humans to walk on the Moon were",
    "A",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    engine = LLM(model="smollm2-135m-instruct", max_model_len=2048, max_num_seqs=16)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    source = resolve_model("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(
        str(source.path.parent), gguf_file=source.path.name, dtype=torch.float32
    )
    return model.eval()


def hf_greedy(model, prompt_ids: list[int], max_tokens: int, eos: int | None) -> list[int]:
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=max_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    return out[0, len(prompt_ids) :].tolist()


def test_chat_answers_paris_like_hf(llm: LLM, hf_model) -> None:
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=32))[0]
    completion = out.outputs[0]
    assert completion.text == "The capital of France is Paris."
    assert completion.finish_reason == "stop"
    tokenizer = llm.get_tokenizer()
    prompt_ids = tokenizer.apply_chat_template(QUESTION)
    assert out.prompt_token_ids == prompt_ids
    expected = hf_greedy(hf_model, prompt_ids, 32, tokenizer.eos_token_id)
    # HF keeps the EOS token in its output; so do we (vLLM does too).
    assert completion.token_ids == expected


def test_batch_of_mixed_lengths_matches_hf(llm: LLM, hf_model) -> None:
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS  # prompt order
    for out in outs:
        expected = hf_greedy(hf_model, out.prompt_token_ids, 24, None)
        assert out.outputs[0].token_ids == expected, out.prompt
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].text == llm.get_tokenizer().decode(expected, skip_special_tokens=True)


def test_token_id_prompts_and_prompt_dicts(llm: LLM) -> None:
    ids = llm.get_tokenizer().encode("The capital of France is")
    params = SamplingParams(temperature=0, max_tokens=8)
    by_ids = llm.generate([ids], params, use_tqdm=False)[0]
    by_text = llm.generate("The capital of France is", params, use_tqdm=False)[0]
    by_dict = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0]
    assert by_ids.prompt is None and by_text.prompt == "The capital of France is"
    assert by_ids.outputs[0].token_ids == by_text.outputs[0].token_ids == by_dict.outputs[0].token_ids


def test_stop_strings_cut_the_text(llm: LLM) -> None:
    base = llm.generate(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=16), use_tqdm=False
    )
    text = base[0].outputs[0].text
    assert "." in text
    stop = SamplingParams(temperature=0, max_tokens=16, stop=["."])
    out = llm.generate("The capital of France is", stop, use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(".")]
    assert out.finish_reason == "stop" and out.stop_reason == "."
    keep = stop.clone(include_stop_str_in_output=True)
    assert (
        llm.generate("The capital of France is", keep, use_tqdm=False)[0].outputs[0].text
        == text[: text.index(".") + 1]
    )


def test_n_and_seeds_are_reproducible_whatever_the_batch(llm: LLM) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, n=3)
    alone = llm.generate("Once upon a time", seeded, use_tqdm=False)[0]
    assert [c.index for c in alone.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in alone.outputs}) > 1  # children get seed + index
    crowd = [SamplingParams(temperature=1.0, max_tokens=12)] * 4
    mixed = llm.generate(
        ["Hello", "Once upon a time", "Paris is", "x"], [crowd[0], seeded, *crowd[2:]], use_tqdm=False
    )
    assert [c.token_ids for c in mixed[1].outputs] == [c.token_ids for c in alone.outputs]


def test_logprobs_and_min_tokens(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=3, min_tokens=6)
    out = llm.chat(QUESTION, params)[0].outputs[0]
    assert len(out.token_ids) == 6 and len(out.logprobs) == 6
    for token_id, position in zip(out.token_ids, out.logprobs):
        assert token_id in position
        assert position[token_id].rank == 1  # greedy picks the top token
        assert 3 <= len(position) <= 4
    assert out.cumulative_logprob == pytest.approx(
        sum(p[t].logprob for t, p in zip(out.token_ids, out.logprobs))
    )


def test_refusals_name_the_problem(llm: LLM) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[5] * 2048], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValueError, match="n "):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[10**9]], use_tqdm=False)
    # A refused batch leaves nothing behind, and the engine still serves.
    assert llm.engine_stats() == {"num_unfinished": 0, "kv_cache_usage": 0.0}
    assert llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
