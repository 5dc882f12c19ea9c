"""Streaming with AsyncLLM: a chat answer printed as it is generated, and a request aborted by
cancelling the task that consumes it.

python examples/async_llm_streaming.py [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import asyncio

from frontend import AsyncEngineArgs, AsyncLLM, RequestOutputKind, SamplingParams


async def stream_answer(llm: AsyncLLM, question: str) -> str:
    """Print the answer's text as it arrives (DELTA outputs carry only the new text)."""
    tokenizer = await llm.get_tokenizer()
    prompt = {"prompt_token_ids": tokenizer.apply_chat_template([{"role": "user", "content": question}])}
    params = SamplingParams(temperature=0, max_tokens=32, output_kind=RequestOutputKind.DELTA)
    answer = ""
    async for output in llm.generate(prompt, params, request_id="question"):
        piece = output.outputs[0].text
        answer += piece
        print(piece, end="", flush=True)
    print()
    return answer


async def cancel_midway(llm: AsyncLLM) -> int:
    """Cancel a long request after a few tokens: the engine drops it and frees its KV blocks."""
    params = SamplingParams(max_tokens=1000, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    received = 0

    async def consume() -> None:
        nonlocal received
        async for output in llm.generate("Once upon a time", params, request_id="story"):
            received += len(output.outputs[0].token_ids)

    task = asyncio.create_task(consume())
    while received < 5:
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return received


async def main(model: str) -> None:
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model))
    try:
        await stream_answer(llm, "What is the capital of France?")
        received = await cancel_midway(llm)
        print(f"cancelled the story after {received} tokens; engine stats: {await llm.engine_stats()}")
    finally:
        llm.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    asyncio.run(main(parser.parse_args().model))
