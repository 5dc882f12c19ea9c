"""Stream a chat answer from a running pagedserve server with the official OpenAI SDK.

make serve                       # or: python -m frontend --model smollm2-135m-instruct
python examples/openai_chat_client.py [--base-url http://localhost:8000/v1] [--api-key KEY]
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    # The server ignores the key unless it was started with --api-key; the SDK insists on one.
    parser.add_argument("--api-key", default=os.environ.get("PAGEDSERVE_API_KEY", "unused"))
    parser.add_argument("--question", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id  # the server's --served-model-name (or --model)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.question}],
        temperature=0,
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    print(f"[{model}] Q: {args.question}\nA: ", end="", flush=True)
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        if chunk.usage is not None:  # the last chunk, with include_usage
            usage = chunk.usage
            print(f"\n({usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens)")


if __name__ == "__main__":
    main()
