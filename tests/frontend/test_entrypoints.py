"""Engine start-up is immune to the caller's ``__main__`` at TP=2 too: guard-less LLM and AsyncLLM
scripts, run as a file, from stdin, under -c and as a notebook cell, start two worker processes
each, answer as HF transformers does, and leave no process or shared memory behind.

The default model's 9 attention heads do not split in two, so these use a tiny random Llama; the
README tests cover the default model at TP=1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

from tests.checkpoints import save_tiny_model, tiny_config
from tests.user_scripts import run_user_code

PROMPT = [1, 5, 9, 3, 7]
MAX_TOKENS = 8

LLM_SCRIPT = """
from frontend import LLM, SamplingParams

llm = LLM(model={model!r}, skip_tokenizer_init=True, tensor_parallel_size=2, max_model_len=128,
          num_gpu_blocks_override=64)
out = llm.generate([{prompt!r}], SamplingParams(temperature=0, max_tokens={max_tokens}, ignore_eos=True))
print("TOKENS", *out[0].outputs[0].token_ids)
engine = llm.engine.client._proc.pid
print("WORKERS", len(open(f"/proc/{{engine}}/task/{{engine}}/children").read().split()))
"""

ASYNC_SCRIPT = """
import asyncio

from frontend import AsyncLLM, SamplingParams


async def main():
    llm = AsyncLLM(model={model!r}, skip_tokenizer_init=True, tensor_parallel_size=2, max_model_len=128,
                   num_gpu_blocks_override=64)
    try:
        params = SamplingParams(temperature=0, max_tokens={max_tokens}, ignore_eos=True)
        async for out in llm.generate({prompt!r}, params, request_id="r"):
            pass
        print("TOKENS", *out.outputs[0].token_ids)
        engine = llm.client._proc.pid
        print("WORKERS", len(open(f"/proc/{{engine}}/task/{{engine}}/children").read().split()))
    finally:
        llm.shutdown()


asyncio.run(main())
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_config()  # 4 query heads over 2 KV heads: both split in two
    return save_tiny_model(tmp_path_factory.mktemp("tiny-entrypoints"), config).path


@pytest.fixture(scope="module")
def hf_tokens(tiny_model: Path) -> list[int]:
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # the engine runs with ignore_eos
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, len(PROMPT) :].tolist()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("script", "mode"),
    [(LLM_SCRIPT, m) for m in ("file", "stdin", "command", "notebook")] + [(ASYNC_SCRIPT, "file")],
    ids=["llm-file", "llm-stdin", "llm-command", "llm-notebook", "async-file"],
)
def test_guardless_tp2_script(
    script: str, mode: str, tiny_model: Path, hf_tokens: list[int], tmp_path: Path
) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    code = script.format(model=str(tiny_model), prompt=PROMPT, max_tokens=MAX_TOKENS)
    done, left = run_user_code(code, mode, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("TOKENS")]
    assert [int(t) for t in line.split()[1:]] == hf_tokens
    assert "WORKERS 2" in done.stdout
    assert left == []
    assert set(os.listdir("/dev/shm")) - shm_before == set()
