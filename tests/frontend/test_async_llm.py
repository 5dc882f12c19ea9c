"""AsyncLLM over the engine-core process: streaming, cancellation, merged deltas, engine death."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest

from core.errors import EngineDeadError
from frontend.async_llm import AsyncLLM
from ipc.sampling_params import RequestOutputKind, SamplingParams
from tests.checkpoints import save_tiny_model, tiny_config

VOCAB = 128


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
    )
    return save_tiny_model(tmp_path_factory.mktemp("tiny-async"), config).path


def make_llm(path: Path, **kwargs) -> AsyncLLM:
    settings = dict(skip_tokenizer_init=True, max_model_len=256, num_gpu_blocks_override=512, block_size=8)
    return AsyncLLM(str(path), **{**settings, **kwargs})


# Long enough that nothing finishes before the kill.
LONG = dict(max_model_len=4096, num_gpu_blocks_override=4096)


def delta(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.DELTA, **kw
    )


@pytest.mark.timeout(180)
def test_concurrent_streams_with_cancellations_leave_the_cache_empty(tiny_model_dir: Path) -> None:
    llm = make_llm(tiny_model_dir, max_num_seqs=64)
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(4, 40))] for _ in range(200)]
    lengths = [rng.randint(8, 48) for _ in range(200)]
    cancel = set(rng.sample(range(200), 50))

    async def consume(i: int) -> list[int] | None:
        tokens: list[int] = []
        async for out in llm.generate({"prompt_token_ids": prompts[i]}, delta(lengths[i]), f"req-{i}"):
            tokens += out.outputs[0].token_ids
            if i in cancel and len(tokens) >= 3:
                return None  # leaving the loop closes the generator: the request is aborted
        return tokens

    async def main() -> tuple[list, dict]:
        tasks = [asyncio.create_task(consume(i)) for i in range(200)]
        results = await asyncio.gather(*tasks)
        await asyncio.sleep(0.3)  # let the aborts land
        return results, await llm.engine_stats()

    try:
        results, stats = asyncio.run(main())
    finally:
        llm.shutdown()
    for i, tokens in enumerate(results):
        if i in cancel:
            assert tokens is None
        else:
            assert tokens is not None and len(tokens) == lengths[i]
    assert stats == {"num_unfinished": 0, "kv_cache_usage": 0.0}


@pytest.mark.timeout(120)
def test_task_cancellation_aborts_and_slow_consumers_get_merged_deltas(tiny_model_dir: Path) -> None:
    llm = make_llm(tiny_model_dir)

    async def main() -> None:
        # A consumer that never reads while 60 tokens are produced gets them merged, not queued.
        gen = llm.generate([1, 2, 3], delta(60), "slow")
        first = await gen.__anext__()
        await asyncio.sleep(1.5)
        rest = [out async for out in gen]
        tokens = first.outputs[0].token_ids + [t for out in rest for t in out.outputs[0].token_ids]
        assert len(tokens) == 60
        assert len(rest) < 59  # merged
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "length"

        # Cancelling the consuming task aborts the request in the engine.
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in llm.generate([4, 5, 6], delta(240), "cancelled"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)
        assert await llm.engine_stats() == {"num_unfinished": 0, "kv_cache_usage": 0.0}

        # Same request id reusable once finished; a bad request is refused with a clear error.
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in llm.generate([1] * 300, delta(4), "too-long"):
                pass
        outs = [o async for o in llm.generate([7, 8], SamplingParams(max_tokens=5, ignore_eos=True), "slow")]
        assert len(outs[-1].outputs[0].token_ids) == 5  # cumulative outputs

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()


@pytest.mark.timeout(120)
def test_engine_core_death_fails_every_request_fast(tiny_model_dir: Path) -> None:
    llm = make_llm(tiny_model_dir, **LONG)
    pid = llm.client._proc.pid

    async def consume(i: int) -> None:
        async for _ in llm.generate([1, 2, 3 + i], delta(4000), f"doomed-{i}"):
            await asyncio.sleep(0.005)

    async def main() -> float:
        tasks = [asyncio.create_task(consume(i)) for i in range(8)]
        await asyncio.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.monotonic() - killed
        assert all(isinstance(r, EngineDeadError) for r in results), results
        with pytest.raises(EngineDeadError):  # new requests are refused at once
            async for _ in llm.generate([1], delta(2), "after"):
                pass
        with pytest.raises(EngineDeadError):
            await llm.check_health()
        return elapsed

    try:
        elapsed = asyncio.run(main())
    finally:
        llm.shutdown()
    assert elapsed < 5.0
    assert not llm.client._proc.is_alive()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(180)
def test_worker_death_fails_every_request_and_leaves_nothing(tiny_model_dir: Path) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    llm = make_llm(tiny_model_dir, tensor_parallel_size=2, **LONG)
    engine_pid = llm.client._proc.pid
    workers = _children(engine_pid)
    assert len(workers) == 2

    async def consume(i: int) -> None:
        async for _ in llm.generate([1, 2, 3 + i], delta(4000), f"doomed-{i}"):
            await asyncio.sleep(0.005)

    async def main() -> float:
        tasks = [asyncio.create_task(consume(i)) for i in range(6)]
        await asyncio.sleep(1.0)
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.monotonic() - killed
        assert all(isinstance(r, EngineDeadError) for r in results), results
        with pytest.raises(EngineDeadError):
            async for _ in llm.generate([1], delta(2), "after"):
                pass
        return elapsed

    try:
        elapsed = asyncio.run(main())
    finally:
        llm.shutdown()
    assert elapsed < 5.0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in [engine_pid, *workers]):
        time.sleep(0.1)
    assert not any(_alive(p) for p in [engine_pid, *workers])
    assert set(os.listdir("/dev/shm")) - shm_before == set()


@pytest.mark.timeout(120)
def test_cache_salt_from_the_prompt_dict_or_the_keyword(tiny_model_dir: Path) -> None:
    llm = make_llm(tiny_model_dir)
    prompt = list(range(1, 40))  # four full 8-token blocks

    async def cached(request_id: str, prompt_dict: dict, **kwargs) -> int:
        num_cached = -1
        async for out in llm.generate(prompt_dict, delta(2), request_id, **kwargs):
            num_cached = out.num_cached_tokens
        return num_cached

    async def main() -> None:
        assert await cached("a", {"prompt_token_ids": prompt, "cache_salt": "t1"}) == 0
        assert await cached("b", {"prompt_token_ids": prompt}) == 0
        assert await cached("c", {"prompt_token_ids": prompt}, cache_salt="t2") == 0
        assert await cached("d", {"prompt_token_ids": prompt}, cache_salt="t1") == 32
        assert await cached("e", {"prompt_token_ids": prompt, "cache_salt": "t2"}) == 32
        with pytest.raises(ValueError, match="cache_salt"):
            await cached("f", {"prompt_token_ids": prompt, "cache_salt": ""})
        with pytest.raises(ValueError, match="multi_modal_data"):
            await cached("g", {"prompt_token_ids": prompt, "multi_modal_data": {}})

    try:
        asyncio.run(main())
    finally:
        llm.shutdown()
