"""Tensor parallelism over one worker process per rank (core.mp_executor + workers.worker_proc).

TP=N across CPU worker processes (gloo) gives the same greedy tokens as TP=1 in-process on tiny
random models (GQA, replicated KV heads, QKV bias) and on SmolLM2; a split the model cannot take
fails at startup with a clear error; a worker that dies or fails makes the next step raise
WorkerDiedError quickly, and nothing (process, /dev/shm segment, rendezvous file) outlives
shutdown.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from core.errors import EngineDeadError, WorkerDiedError
from core.mp_executor import MultiprocExecutor
from ipc.messages import EngineCoreRequest, SchedulerOutput
from ipc.sampling_params import SamplingParams
from workers.worker import Worker

if TYPE_CHECKING:
    from core.engine_core import EngineCore

# Worker processes started with a worker class from this module import it: transformers, the
# engine and the frontend are imported where used, so that such workers start in seconds.

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
    tie_word_embeddings=False,
)
CONFIGS = {
    "llama-gqa": ("llama", {}),  # 4 heads / 2 KV heads: KV heads split
    "llama-kv-replicated": ("llama", dict(num_key_value_heads=1)),  # 1 KV head: replicated
    "qwen2-qkv-bias": ("qwen2", {}),
    "llama-8h-4kv": ("llama", dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4)),
    "llama-bad-mlp-split": ("llama", dict(intermediate_size=129)),
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
ENGINE = dict(skip_tokenizer_init=True, num_gpu_blocks_override=128, max_model_len=256, engine_process=False)


def make_model(root: Path, name: str) -> Path:
    from tests.checkpoints import SHARP, save_tiny_model, tiny_config

    arch, overrides = CONFIGS[name]
    return save_tiny_model(root / name, tiny_config(arch, **{**BASE, **overrides}), redraw=SHARP).path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-models")
    return {name: make_model(root, name) for name in CONFIGS}


def prompts(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    return [
        {"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 40))]} for _ in range(n)
    ]


def generate(model: str, params: SamplingParams = GREEDY, n: int = 5, **kwargs: object) -> list[list[int]]:
    """Greedy tokens through the offline LLM. With worker processes under an in-process engine
    core, also checks the orderly shutdown: every worker left by itself once the ring closed (exit
    code 0: no SIGTERM, no SIGKILL), shutdown is idempotent, and the executor refuses work after."""
    from frontend import LLM

    executor = None
    with LLM(model=model, **{**ENGINE, **kwargs}) as llm:
        outputs = llm.generate(prompts(n), params, use_tqdm=False)
        core = getattr(llm.engine, "core", None)  # only an in-process engine core is reachable
        if core is not None and isinstance(core.executor, MultiprocExecutor):
            executor = core.executor
            pids = executor.worker_pids
    if executor is not None:
        assert executor.exitcodes == [0] * executor.world_size
        assert_gone(pids)
        executor.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            executor.execute_model(SchedulerOutput())
    return [o.outputs[0].token_ids for o in outputs]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_gone(pids: list[int]) -> None:
    assert pids and not [pid for pid in pids if alive(pid)], "worker processes outlived shutdown"


def shm_leftovers(names: list[str]) -> list[str]:
    found = []
    for name in names:
        found += glob.glob(f"/dev/shm/{glob.escape(name)}") + glob.glob(f"/dev/shm/{glob.escape(name)}_o*")
    return found


# ------------------------------------------------------------------------------ same tokens


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("name", "engine_process"),
    [
        ("llama-gqa", False),
        ("llama-kv-replicated", False),
        # The deployed topology: the engine-core process starts the worker processes.
        ("qwen2-qkv-bias", True),
    ],
)
def test_tp2_matches_tp1(models: dict[str, Path], name: str, engine_process: bool) -> None:
    expected = generate(str(models[name]), tensor_parallel_size=1)
    assert generate(str(models[name]), tensor_parallel_size=2, engine_process=engine_process) == expected


@pytest.mark.timeout(120)
def test_mp_backend_with_one_worker_matches_uni(models: dict[str, Path]) -> None:
    path = str(models["llama-gqa"])
    expected = generate(path, distributed_executor_backend="uni")
    assert generate(path, distributed_executor_backend="mp") == expected


@pytest.mark.timeout(300)
def test_tp4_matches_tp1(models: dict[str, Path]) -> None:
    path = str(models["llama-8h-4kv"])
    assert generate(path, tensor_parallel_size=4) == generate(path)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_tp3_matches_tp1() -> None:
    kwargs = dict(n=3, max_model_len=512)
    expected = generate("smollm2-135m-instruct", **kwargs)
    assert generate("smollm2-135m-instruct", tensor_parallel_size=3, **kwargs) == expected


# ------------------------------------------------------------------------------ the seam to workers/


def test_executor_reaches_workers_only_by_the_entry_point_name() -> None:
    """core.mp_executor imports nothing of workers/ (the channel is ipc.worker_channel); the worker
    process's entry point it names exists and takes the start-up payload."""
    script = (
        "import importlib, inspect, sys; import core.mp_executor as m; "
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'workers')); "
        "f = getattr(importlib.import_module(m.WORKER_ENTRY_MODULE), m.WORKER_ENTRY_FUNCTION); "
        "print(list(inspect.signature(f).parameters), inspect.signature(f).parameters['args'].annotation)"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    imported_by_executor, entry = result.stdout.splitlines()
    assert imported_by_executor == "[]"
    assert entry == "['args'] WorkerProcArgs"


# ------------------------------------------------------------------------------ startup errors


@pytest.mark.timeout(120)
def test_smollm2_tp2_is_refused_naming_the_heads() -> None:
    from frontend import LLM

    started = time.monotonic()
    with pytest.raises(ValueError, match=r"attention heads \(9\).*tensor_parallel_size \(2\)"):
        LLM(model="smollm2-135m-instruct", tensor_parallel_size=2, **ENGINE)
    assert time.monotonic() - started < 60


@pytest.mark.timeout(120)
def test_worker_startup_error_reaches_the_user(models: dict[str, Path]) -> None:
    """An error raised inside the worker processes while they build the model (here the MLP
    cannot be split in two) comes back as the same clear error, and no worker is left behind."""
    from frontend import LLM

    before = {p.pid for p in _children()}
    with pytest.raises(ValueError, match=r"worker rank \d failed to start: output size \(129\)"):
        LLM(model=str(models["llama-bad-mlp-split"]), tensor_parallel_size=2, **ENGINE)
    assert {p.pid for p in _children()} <= before


def _children() -> list:
    import multiprocessing

    return multiprocessing.active_children()


# ------------------------------------------------------------------------------ worker death


def _engine(path: Path, tp: int, **kwargs: object) -> EngineCore:
    from core.engine_args import EngineArgs
    from core.engine_core import EngineCore

    config = EngineArgs(
        model=str(path),
        skip_tokenizer_init=True,
        num_gpu_blocks_override=128,
        max_model_len=256,
        tensor_parallel_size=tp,
    ).create_engine_config()
    return EngineCore(config, executor=MultiprocExecutor(config, **kwargs))


def _add_requests(engine: EngineCore, n: int, max_tokens: int = 200) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts(n, seed=1)):
        engine.add_request(
            EngineCoreRequest(
                request_id=str(i), prompt_token_ids=prompt["prompt_token_ids"], sampling_params=params
            )
        )


def _resources(executor: MultiprocExecutor) -> tuple[list[str], list[str]]:
    """(shm segment names, directories) the executor and its workers created."""
    handles = [executor._ring.handle] + [w.reply_handle for w in executor._workers]
    return [h.name for h in handles], [h.wake_dir for h in handles] + [executor._ipc_dir.path]


@pytest.mark.timeout(120)
def test_killed_worker_fails_the_next_step_and_leaves_nothing(models: dict[str, Path]) -> None:
    engine = _engine(models["llama-gqa"], tp=2)
    executor = engine.executor
    assert isinstance(executor, MultiprocExecutor)
    pids = executor.worker_pids
    names, dirs = _resources(executor)
    assert all(os.path.exists(f"/dev/shm/{n}") for n in names)
    try:
        _add_requests(engine, 4)
        # With async scheduling a step's tokens come out of the next step() call.
        assert sum(bool(engine.step().outputs) for _ in range(4)) >= 3
        noticed: list[EngineDeadError] = []
        executor.register_failure_callback(noticed.append)
        os.kill(pids[1], signal.SIGKILL)
        started = time.monotonic()
        # The monitor notices on its own, without a step to fail (an idle engine learns it too).
        while not noticed and time.monotonic() - started < 5:
            time.sleep(0.01)
        assert noticed and isinstance(noticed[0], WorkerDiedError)
        with pytest.raises(WorkerDiedError):
            executor.check_health()
        with pytest.raises(WorkerDiedError, match=r"worker rank 1 .*killed by SIGKILL"):
            for _ in range(1000):  # a step already past the broadcast may still complete
                engine.step()
        assert time.monotonic() - started < 5
        # Every later call fails the same way, at once, and the error is an EngineDeadError.
        started = time.monotonic()
        with pytest.raises(EngineDeadError):
            engine.step()
        assert time.monotonic() - started < 1
    finally:
        started = time.monotonic()
        engine.shutdown()
        shutdown_s = time.monotonic() - started
    assert_gone(pids)
    assert shm_leftovers(names) == []
    assert [d for d in dirs if os.path.exists(d)] == []
    assert shutdown_s < 10


class _FailingWorker(Worker):
    """Rank 1 raises in its third execute_model."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.calls = 0

    def execute_model_async(self, scheduler_output):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.rank == 1 and self.calls == 3:
            raise RuntimeError("boom in rank 1")
        return super().execute_model_async(scheduler_output)


@pytest.mark.timeout(120)
def test_worker_exception_is_reported_not_hung(models: dict[str, Path]) -> None:
    """Rank 1 raises while rank 0 waits for it in a collective: the step fails with rank 1's
    traceback instead of hanging, and shutdown still cleans everything up."""
    engine = _engine(models["llama-gqa"], tp=2, worker_cls=_FailingWorker)
    executor = engine.executor
    assert isinstance(executor, MultiprocExecutor)
    pids = executor.worker_pids
    names, dirs = _resources(executor)
    try:
        _add_requests(engine, 2)
        engine.step()
        engine.step()
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match="boom in rank 1"):
            for _ in range(3):  # async scheduling: the failed step's answer is read a step later
                engine.step()
        assert time.monotonic() - started < 5
    finally:
        engine.shutdown()
    assert_gone(pids)
    assert shm_leftovers(names) == []
    assert [d for d in dirs if os.path.exists(d)] == []


_ENGINE_PROCESS = """
import json, sys, time
from core.engine_args import EngineArgs
from core.mp_executor import MultiprocExecutor
config = EngineArgs(
    model=sys.argv[1], skip_tokenizer_init=True, max_model_len=256, tensor_parallel_size=2
).create_engine_config()
executor = MultiprocExecutor(config)
names = [executor._ring.handle.name] + [w.reply_handle.name for w in executor._workers]
print(json.dumps({"pids": executor.worker_pids, "names": names}), flush=True)
time.sleep(600)
"""


@pytest.mark.timeout(120)
def test_workers_exit_when_the_engine_process_dies(models: dict[str, Path]) -> None:
    """SIGKILL the process that owns the executor: its workers notice and exit by themselves, and
    no shared memory survives (the workers unlink their reply rings; the resource tracker the
    process tree shares unlinks the dead process's broadcast ring once the workers are gone)."""
    root = Path(__file__).resolve().parents[2]
    engine = subprocess.Popen(
        [sys.executable, "-c", _ENGINE_PROCESS, str(models["llama-gqa"])],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        info = json.loads(engine.stdout.readline())  # type: ignore[union-attr]
    finally:
        engine.kill()
        engine.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        any(alive(pid) for pid in info["pids"]) or shm_leftovers(info["names"])
    ):
        time.sleep(0.1)
    assert_gone(info["pids"])
    assert shm_leftovers(info["names"]) == []
