"""Offline inference with the default model: a chat turn and a batch of raw prompts.

python examples/offline_inference.py [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import logging

from frontend import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    llm = LLM(model=args.model)
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)

    question = "What is the capital of France?"
    answer = llm.chat([{"role": "user", "content": question}], greedy)[0].outputs[0]
    print(f"\nQ: {question}\nA: {answer.text!r} (finish_reason={answer.finish_reason})\n")

    prompts = ["The capital of France is", "The three primary colours are", "def fibonacci(n):"]
    for output in llm.generate(prompts, greedy):
        completion = output.outputs[0]
        print(
            f"{output.prompt!r} -> {completion.text!r} ({len(completion.token_ids)} tokens, {completion.finish_reason})"
        )
    llm.shutdown()


if __name__ == "__main__":
    main()
