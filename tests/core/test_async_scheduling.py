"""Async scheduling (step N+1 scheduled and launched before step N's tokens are read) must change
nothing the user can see: the same tokens, finish reasons and logprobs as the sequential loop, under
seeds, penalties, stop tokens, min_tokens, preemption and aborts, and no leaked KV blocks."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from frontend import LLM, SamplingParams
from tests.checkpoints import Redraw, save_tiny_model, tiny_config

VOCAB = 96


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=2,
        bos_token_id=1,
    )
    path = tmp_path_factory.mktemp("async-sched")
    return save_tiny_model(path, config, seed=3, redraw=Redraw(matrix_std=0.3)).path


def workload(n: int = 24, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 40))] for _ in range(n)]
    params = []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            params.append(SamplingParams(temperature=0.0, max_tokens=rng.randint(1, 40)))  # EOS may stop it
        elif kind == 1:
            params.append(SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=30, logprobs=2))
        elif kind == 2:
            params.append(
                SamplingParams(
                    temperature=0.7, seed=100 + i, repetition_penalty=1.3, presence_penalty=0.5, max_tokens=25
                )
            )
        elif kind == 3:
            params.append(
                SamplingParams(temperature=0.0, stop_token_ids=[5, 7, 11], min_tokens=4, max_tokens=50)
            )
        elif kind == 4:
            params.append(
                SamplingParams(temperature=1.0, top_k=5, seed=7 * i, max_tokens=60, ignore_eos=True)
            )
        else:
            params.append(SamplingParams(temperature=0.5, seed=i, n=2, logit_bias={3: 5.0}, max_tokens=20))
    return prompts, params


def run(path: Path, async_scheduling: bool, **kwargs) -> list:
    llm = LLM(
        model=str(path),
        engine_process=False,
        skip_tokenizer_init=True,
        async_scheduling=async_scheduling,
        block_size=4,
        max_model_len=128,
        **kwargs,
    )
    prompts, params = workload()
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.core.kv_cache.num_free_blocks == llm.engine.core.kv_cache.num_blocks
    llm.engine.core.kv_cache.check_invariants()
    result = [
        [
            (c.token_ids, c.finish_reason, c.stop_reason, [sorted(p) for p in (c.logprobs or [])])
            for c in o.outputs
        ]
        for o in outs
    ]
    preemptions = llm.engine.core.scheduler.total_preemptions
    llm.shutdown()  # worker processes, if any, stop now rather than at garbage collection
    return result, preemptions


def test_async_equals_sync_with_room(model_dir: Path) -> None:
    sync, _ = run(model_dir, False, num_gpu_blocks_override=1024)
    async_, _ = run(model_dir, True, num_gpu_blocks_override=1024)
    assert async_ == sync
    assert any(c[1] == "stop" for o in sync for c in o)  # EOS / stop tokens were exercised
    assert any(c[1] == "length" for o in sync for c in o)


def test_async_equals_sync_under_preemption(model_dir: Path) -> None:
    sync, sync_preemptions = run(model_dir, False, num_gpu_blocks_override=40, max_num_seqs=16)
    async_, async_preemptions = run(model_dir, True, num_gpu_blocks_override=40, max_num_seqs=16)
    assert async_preemptions > 0 and sync_preemptions > 0
    assert async_ == sync


def test_async_with_chunked_prefill_and_aborts(model_dir: Path) -> None:
    llm = LLM(
        model=str(model_dir),
        engine_process=False,
        skip_tokenizer_init=True,
        block_size=4,
        max_model_len=128,
        num_gpu_blocks_override=512,
        max_num_batched_tokens=9,
    )
    prompts, params = workload(seed=5)
    expected = [
        [c.token_ids for c in o.outputs]
        for o in LLM(
            model=str(model_dir),
            engine_process=False,
            skip_tokenizer_init=True,
            async_scheduling=False,
            block_size=4,
            max_model_len=128,
            num_gpu_blocks_override=512,
        ).generate(prompts, params, use_tqdm=False)
    ]
    assert [
        [c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)
    ] == expected
    # Abort half of the requests mid-flight through the engine directly.
    core = llm.engine.core
    from ipc.messages import EngineCoreRequest

    for i, p in enumerate(prompts):
        core.add_request(
            EngineCoreRequest(
                request_id=f"a{i}",
                prompt_token_ids=p,
                sampling_params=SamplingParams(max_tokens=40, ignore_eos=True),
            )
        )
    for _ in range(6):
        core.step()
    core.abort_requests([f"a{i}" for i in range(0, len(prompts), 2)])
    while core.has_unfinished_requests():
        core.step()
    assert core.kv_cache.num_free_blocks == core.kv_cache.num_blocks
    core.kv_cache.check_invariants()


@pytest.mark.timeout(300)
def test_async_over_worker_processes_equals_sync(model_dir: Path) -> None:
    """The multiprocess executor pipelines steps (a worker launches N+1 before answering N):
    with one worker process it must match the in-process sequential loop exactly, and at TP=2
    its own sequential run, under preemption, seeds, penalties and stop tokens."""
    small = {"num_gpu_blocks_override": 40, "max_num_seqs": 16}
    reference, _ = run(model_dir, False, **small)
    one_worker, preemptions = run(model_dir, True, distributed_executor_backend="mp", **small)
    assert preemptions > 0
    assert one_worker == reference
    tp2_sync, _ = run(model_dir, False, tensor_parallel_size=2, **small)
    tp2_async, _ = run(model_dir, True, tensor_parallel_size=2, **small)
    assert tp2_async == tp2_sync
