"""``pagedserve chat`` and ``pagedserve complete``: interactive clients of a running
OpenAI-compatible server, as ``vllm chat`` and ``vllm complete``.

``--quick PROMPT`` sends one prompt, prints the answer and exits; otherwise every stdin line is a
prompt until EOF, and ``chat`` keeps the conversation (a system prompt, then every question and
answer) as the context of the next question. Answers are printed as they stream in.

The HTTP client is the standard library's (urllib): a REPL sends one request at a time, so it
needs neither an asynchronous client nor a dependency; it honours the usual proxy variables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from frontend.cli import HelpFormatter

DEFAULT_URL = "http://localhost:8000/v1"
API_KEY_ENV = "OPENAI_API_KEY"  # what the openai SDK, and so vLLM's clients, read
READ_TIMEOUT_S = 600.0  # seconds without a byte before a request is given up
ERROR_TEXT_CHARS = 300


class ClientError(RuntimeError):
    """The server could not be reached or broke off; the message is one line."""


class RequestRefused(ClientError):
    """The server answered the request with an error (the conversation can go on)."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str  # the API root, e.g. http://localhost:8000/v1
    api_key: str | None

    def open(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """The response of GET (no body) or POST (a JSON body) to ``url + path``."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url.rstrip("/") + path, data=data)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(request, timeout=READ_TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            raise RequestRefused(f"HTTP {exc.code}: {_error_message(exc.read())}") from exc
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"cannot reach {self.url}: {reason}") from exc

    def first_model(self) -> str:
        with self.open("/models") as response:
            cards = json.load(response).get("data") or []
        if not cards:
            raise ClientError(f"{self.url}/models lists no model; pass --model-name")
        return str(cards[0]["id"])

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The JSON events of a streamed (server-sent events) response, up to ``[DONE]``."""
        with self.open(path, {**body, "stream": True}) as response:
            try:
                for raw in response:  # one line at a time, as the chunks arrive
                    if not raw.startswith(b"data:"):
                        continue  # blank separators and comments
                    data = raw[len(b"data:") :].strip()
                    if data == b"[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:  # an error after the 200 went out
                        raise RequestRefused(_error_message(data))
                    yield event
            except (OSError, ValueError) as exc:  # a broken connection, a line that is not JSON
                raise ClientError(f"the stream from {self.url} broke off: {exc}") from exc
        raise ClientError(f"the stream from {self.url} ended without [DONE]")


def _error_message(body: bytes) -> str:
    """The message of an OpenAI-shaped error body, else the start of the body."""
    try:
        error = json.loads(body)["error"]
        return str(error.get("message", error) if isinstance(error, dict) else error)
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:ERROR_TEXT_CHARS].strip() or "(no body)"


def print_stream(pieces: Iterator[str]) -> str:
    """Print each piece as it arrives and end the line (also when the stream breaks off after
    some text); returns the whole text."""
    text: list[str] = []
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
            text.append(piece)
    finally:
        if text or sys.exc_info()[0] is None:
            sys.stdout.write("\n")
            sys.stdout.flush()
    return "".join(text)


def _chat_pieces(events: Iterator[dict[str, Any]]) -> Iterator[str]:
    for event in events:
        for choice in event.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                yield content


def _completion_pieces(events: Iterator[dict[str, Any]]) -> Iterator[str]:
    for event in events:
        for choice in event.get("choices") or ():
            if choice.get("text"):
                yield choice["text"]


# ------------------------------------------------------------------------------------ the commands


def build_parser(prog: str, chat: bool) -> argparse.ArgumentParser:
    what = "Chat with" if chat else "Complete prompts with"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{what} a running OpenAI-compatible server (as `vllm {'chat' if chat else 'complete'}`).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--url", default=DEFAULT_URL, help="The server's API root.")
    parser.add_argument(
        "--model-name", default=None, help="The model to ask. Default: the first model of GET /v1/models."
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"Sent as 'Authorization: Bearer KEY'. Default: ${API_KEY_ENV} if set.",
    )
    if chat:
        parser.add_argument(
            "--system-prompt", default=None, help="A system message opening the conversation."
        )
    parser.add_argument(
        "-q",
        "--quick",
        default=None,
        metavar="PROMPT",
        help="Send this one prompt, print the answer and exit.",
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="Sampling temperature. Default: the server's."
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="Most tokens per answer. Default: the server's."
    )
    return parser


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"temperature": args.temperature, "max_tokens": args.max_tokens}
    return {name: value for name, value in fields.items() if value is not None}


def _prompts() -> Iterator[str]:
    """Lines of stdin until EOF, with a "> " prompt where stdin is a terminal."""
    prompt = "> " if sys.stdin.isatty() else ""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


def _run(
    argv: Sequence[str], prog: str, chat: bool, session: Callable[[Endpoint, str, argparse.Namespace], None]
) -> int:
    args = build_parser(prog, chat).parse_args(list(argv))
    endpoint = Endpoint(args.url, args.api_key or os.environ.get(API_KEY_ENV) or None)
    try:
        session(endpoint, args.model_name or endpoint.first_model(), args)
    except ClientError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


def _chat_session(endpoint: Endpoint, model: str, args: argparse.Namespace) -> None:
    messages: list[dict[str, str]] = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    sampling = _sampling(args)

    def ask(question: str) -> str:
        body = {"model": model, "messages": [*messages, {"role": "user", "content": question}], **sampling}
        return print_stream(_chat_pieces(endpoint.stream("/chat/completions", body)))

    if args.quick is not None:
        ask(args.quick)
        return
    for question in _prompts():
        try:
            answer = ask(question)
        except RequestRefused as exc:  # e.g. the conversation outgrew the context: say so, go on
            print(f"error: {exc}", file=sys.stderr)
            continue
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _complete_session(endpoint: Endpoint, model: str, args: argparse.Namespace) -> None:
    sampling = _sampling(args)

    def complete(prompt: str) -> None:
        body = {"model": model, "prompt": prompt, **sampling}
        print_stream(_completion_pieces(endpoint.stream("/completions", body)))

    if args.quick is not None:
        complete(args.quick)
        return
    for prompt in _prompts():
        try:
            complete(prompt)
        except RequestRefused as exc:
            print(f"error: {exc}", file=sys.stderr)


def chat_main(argv: Sequence[str], prog: str = "pagedserve chat") -> int:
    return _run(argv, prog, True, _chat_session)


def complete_main(argv: Sequence[str], prog: str = "pagedserve complete") -> int:
    return _run(argv, prog, False, _complete_session)
