"""The engine against HF transformers (fp32, CPU) on tiny random models of every supported shape:
greedy tokens identical for single requests and batches of mixed lengths, and unchanged by chunked
prefill, preemption and prefix caching."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from frontend import LLM, SamplingParams
from tests.checkpoints import SHARP, save_tiny_model, tiny_config

VOCAB = 256
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)

CONFIGS = {
    "llama-gqa-untied": ("llama", dict(tie_word_embeddings=False)),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope-scaling": (
        "llama",
        dict(
            num_key_value_heads=1,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        ),
    ),
    "qwen2-qkv-bias": ("qwen2", dict(tie_word_embeddings=False)),
    "mistral": ("mistral", dict(sliding_window=None)),
}


def make_model(tmp_path_factory: pytest.TempPathFactory, name: str) -> tuple[Path, torch.nn.Module]:
    arch, overrides = CONFIGS[name]
    config = tiny_config(arch, **{**BASE, **overrides})
    tiny = save_tiny_model(tmp_path_factory.mktemp(name), config, redraw=SHARP)
    return tiny.path, tiny.model


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    return make_model(tmp_path_factory, request.param)


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def engine_tokens(llm: LLM, batch: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(batch, params, use_tqdm=False)]


def test_greedy_matches_hf_single_and_batch(tiny) -> None:
    path, hf = tiny
    batch = prompts(5)
    expected = [hf_greedy(hf, p, GREEDY.max_tokens) for p in batch]
    llm = LLM(
        model=str(path),
        engine_process=False,
        skip_tokenizer_init=True,
        num_gpu_blocks_override=256,
        block_size=16,
    )
    assert engine_tokens(llm, batch[:1]) == expected[:1]
    assert engine_tokens(llm, batch) == expected


def test_chunked_prefill_preemption_and_prefix_cache_keep_tokens(tmp_path_factory) -> None:
    path, hf = make_model(tmp_path_factory, "llama-gqa-untied")
    shared = prompts(1, seed=7, lo=40, hi=40)[0]
    batch = [shared + p for p in prompts(6, seed=3, lo=5, hi=30)]
    expected = [hf_greedy(hf, p, GREEDY.max_tokens) for p in batch]

    # Chunked prefill: at most 7 tokens of work per step.
    chunked = LLM(
        model=str(path),
        skip_tokenizer_init=True,
        max_num_batched_tokens=7,
        max_num_seqs=4,
        max_model_len=128,
        num_gpu_blocks_override=64,
        block_size=4,
    )
    assert engine_tokens(chunked, batch) == expected

    # 40 blocks of 4 tokens cannot hold six sequences growing to ~100 tokens at once: preemption.
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    tight = LLM(
        model=str(path),
        engine_process=False,
        skip_tokenizer_init=True,
        max_model_len=128,
        num_gpu_blocks_override=40,
        block_size=4,
        enable_prefix_caching=False,
    )
    assert engine_tokens(tight, batch, long) == [hf_greedy(hf, p, 40) for p in batch]
    assert tight.engine.core.scheduler.total_preemptions > 0
    assert tight.engine.core.kv_cache.usage == 0.0

    # Prefix caching: the second request reuses the first one's 40-token prefix (10 full blocks).
    cached = LLM(
        model=str(path),
        skip_tokenizer_init=True,
        max_model_len=128,
        num_gpu_blocks_override=128,
        block_size=4,
    )
    first = cached.generate(batch[:1], GREEDY, use_tqdm=False)[0]
    second = cached.generate(batch[1:2], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 40
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == expected[:2]
    # Resubmitting the whole batch hits the cache for every request and changes nothing.
    again = cached.generate(batch, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected
    assert all(o.num_cached_tokens >= 40 for o in again)
    assert cached.stats.prefix_cache_hits > 0
    assert cached.engine_stats() == {"num_unfinished": 0, "kv_cache_usage": 0.0}
    cached.shutdown()
    chunked.shutdown()


def test_preemption_counts_and_frees(tmp_path_factory) -> None:
    path, _ = make_model(tmp_path_factory, "llama-mha-tied")
    llm = LLM(
        model=str(path),
        engine_process=False,
        skip_tokenizer_init=True,
        max_model_len=96,
        num_gpu_blocks_override=24,
        block_size=4,
    )
    batch = prompts(8, seed=11, lo=20, hi=40)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    outs = llm.generate(batch, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [30] * 8
    assert llm.engine.core.scheduler.total_preemptions > 0
    assert llm.engine.core.kv_cache.num_free_blocks == 24
    llm.engine.core.kv_cache.check_invariants()
