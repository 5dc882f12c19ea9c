"""Incremental detokenization and stop strings, one ``IncrementalDetokenizer`` per request.

The engine core streams token ids; this turns them into text as they arrive, checks stop strings
on the new text only, and hands out deltas that never show part of a stop string.

Decoding goes through ``tokenizers.decoders.DecodeStream`` (the Rust tokenizer keeps a small
window of ids and returns text only once it is valid UTF-8), or, where that is missing or fails,
through our own prefix/read-offset decoding over ``Tokenizer.decode``. Either way each token costs
a decode of a few ids, never a re-decode of the whole output.

The stream is primed with a short, cleanly decodable suffix of the prompt so that decoders which
treat the first token specially (SentencePiece's leading-space strip) render the output as a
continuation of the prompt, as vLLM does. For byte-level BPE (Llama 3, SmolLM2, Qwen2) that
context changes nothing: the final text equals ``tokenizer.decode(output_ids)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from frontend.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence
# Longest prompt suffix tried as decoding context; one clean token is enough for every decoder we
# know, more only helps when the prompt ends inside a multi-byte character.
_MAX_CONTEXT_TOKENS = 8
# Ids kept as context when re-seeding a decoder mid-stream.
_RESEED_WINDOW = 8


def token_to_text(tokenizer: Tokenizer, token_id: int) -> str:
    """The text of a single token (special tokens included), for logprobs output."""
    return tokenizer.token_text(token_id)


class _Decoder(Protocol):
    def step(self, token_id: int) -> str | None:
        """Feed one id; return the text it completes, or None while a character is incomplete."""
        ...


class _StreamDecoder:
    """The Rust ``DecodeStream``."""

    __slots__ = ("_backend", "_stream")

    def __init__(self, backend: object, stream_cls: type, context: list[int], skip_special_tokens: bool):
        self._backend = backend
        try:
            self._stream = stream_cls(ids=context, skip_special_tokens=skip_special_tokens)
        except TypeError:  # tokenizers < 0.22 cannot prefill; prime by stepping through
            self._stream = stream_cls(skip_special_tokens=skip_special_tokens)
            for token_id in context:
                self._stream.step(backend, token_id)

    def step(self, token_id: int) -> str | None:
        return self._stream.step(self._backend, token_id)


class _OffsetDecoder:
    """Prefix/read-offset decoding: decode a window twice, emit what the new id added.

    ``ids[prefix:read]`` is the window's already-emitted part. Decoding it with and without the new
    ids and taking the difference keeps decoders that look at neighbouring tokens (spaces, byte
    fallback) right, while the window stays a few tokens long.
    """

    __slots__ = ("_ids", "_prefix", "_read", "_skip", "_tokenizer")

    def __init__(self, tokenizer: Tokenizer, context: list[int], skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(context)
        self._prefix = 0
        self._read = len(self._ids)

    def step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read], self._skip)
        after = decode(self._ids[self._prefix :], self._skip)
        if len(after) <= len(before) or after.endswith(_REPLACEMENT_CHAR):
            return None
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]


class IncrementalDetokenizer:
    """Text, stop strings and streaming deltas for one request's output tokens.

    Call ``update`` with each batch of new ids; it returns the stop string when one fires (the text
    is then final and later ids are ignored). ``get_delta`` returns text not yet handed out,
    holding back ``max(len(stop)) - 1`` characters until the request finishes so that a stop
    string being generated is never streamed. Once finished, ``output_text`` equals
    ``tokenizer.decode(output_ids, skip_special_tokens)`` cut at the stop string, if any.

    ``spaces_between_special_tokens`` only affects HF's slow tokenizers; with a fast tokenizer it
    is accepted and has no effect, as in HF and vLLM.
    """

    __slots__ = (
        "_chunks",
        "_context",
        "_decoder",
        "_finished",
        "_holdback",
        "_ids",
        "_include_stop",
        "_last_text_index",
        "_length",
        "_skip_special_tokens",
        "_stop",
        "_stop_reason",
        "_tail",
        "_tokenizer",
        "_unsent",
        "spaces_between_special_tokens",
    )

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ):
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty.")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self._stop = tuple(stop)
        self._include_stop = include_stop_str_in_output
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        # Text as a list of chunks: appending to one growing str would copy it per token.
        self._chunks: list[str] = []
        self._unsent: list[str] = []  # suffix of the text not yet returned by get_delta
        self._length = 0
        self._tail = ""  # last _holdback characters of the text, where a stop string may begin
        self._stop_reason: str | None = None
        self._finished = False
        self._last_text_index = 0  # number of output ids whose text has been produced
        self._context = _decoding_context(tokenizer, prompt_token_ids, skip_special_tokens)
        self._decoder = self._new_decoder()

    # -- public API -------------------------------------------------------------------------

    @property
    def output_text(self) -> str:
        if len(self._chunks) > 1:
            self._chunks[:] = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def output_token_ids(self) -> list[int]:
        """Ids consumed so far (up to the one that completed a stop string). Do not mutate."""
        return self._ids

    @property
    def num_output_tokens(self) -> int:
        return len(self._ids)

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stop_reason

    @property
    def finished(self) -> bool:
        return self._finished

    def update(self, new_token_ids: Sequence[int], finished: bool = False) -> str | None:
        """Append ids and decode them; return the stop string if one fired, else None.

        Ids after the one that completes a stop string are not consumed (``num_output_tokens``
        says how many were), so the caller can trim the token ids to match the text. Pass
        ``finished=True`` with the last batch so that text still waiting for the rest of a
        multi-byte character is flushed (as ``decode`` renders it) and stop-checked.
        """
        if self._finished:
            return None
        for token_id in new_token_ids:
            self._ids.append(token_id)
            text = self._step(token_id)
            if text:
                self._last_text_index = len(self._ids)
                if self._append(text) is not None:
                    return self._stop_reason
        if finished:
            return self.finish()
        return None

    def finish(self) -> str | None:
        """Mark the output complete: flush held-back text. Idempotent. Returns a stop string hit
        by the flushed text, else None."""
        if self._finished:
            return None
        self._finished = True
        if self._last_text_index == len(self._ids):
            return None
        # Some trailing ids produced no text: special tokens being skipped, or an incomplete UTF-8
        # sequence that decode renders as U+FFFD. One full decode, once per request, settles it.
        reference = self._reference_text()
        current = self.output_text
        if reference.startswith(current):
            if len(reference) > len(current):
                return self._append(reference[len(current) :])
        else:
            logger.warning(
                "incremental text diverged from a full decode (%d ids); keeping the streamed text",
                len(self._ids),
            )
        return None

    def get_delta(self, finished: bool = False) -> str:
        """Text not returned before; holds back a possible stop-string prefix unless finished."""
        if finished:
            self.finish()
        if not self._unsent:
            return ""
        pending = "".join(self._unsent)
        if self._finished or self._holdback == 0:
            self._unsent.clear()
            return pending
        ready = len(pending) - self._holdback
        if ready <= 0:
            self._unsent[:] = [pending]
            return ""
        self._unsent[:] = [pending[ready:]]
        return pending[:ready]

    # -- internals --------------------------------------------------------------------------

    def _new_decoder(self) -> _Decoder:
        if self._tokenizer.backend is not None:
            try:
                from tokenizers.decoders import DecodeStream
            except ImportError:
                pass
            else:
                return _StreamDecoder(
                    self._tokenizer.backend, DecodeStream, self._context, self._skip_special_tokens
                )
        return _OffsetDecoder(self._tokenizer, self._context, self._skip_special_tokens)

    def _step(self, token_id: int) -> str | None:
        try:
            return self._decoder.step(token_id)
        except Exception as exc:
            # DecodeStream raises when a window's text does not extend the previous one
            # ("Invalid prefix encountered"). Re-seed the offset decoder from the last point where
            # text came out and carry on; it tolerates that case.
            if isinstance(self._decoder, _OffsetDecoder):
                raise
            logger.warning("DecodeStream failed (%s); falling back to offset decoding", exc)
            return self._reseed()

    def _reseed(self) -> str | None:
        emitted = self._context + self._ids[: self._last_text_index]
        self._decoder = _OffsetDecoder(self._tokenizer, emitted[-_RESEED_WINDOW:], self._skip_special_tokens)
        pieces = [self._decoder.step(t) for t in self._ids[self._last_text_index :]]
        return "".join(p for p in pieces if p) or None

    def _reference_text(self) -> str:
        skip = self._skip_special_tokens
        if not self._context:
            return self._tokenizer.decode(self._ids, skip)
        context_text = self._tokenizer.decode(self._context, skip)
        return self._tokenizer.decode(self._context + self._ids, skip)[len(context_text) :]

    def _append(self, text: str) -> str | None:
        """Add decoded text; on a stop string, truncate, finish, and return it."""
        old_length = self._length
        self._chunks.append(text)
        self._unsent.append(text)
        self._length += len(text)
        if not self._stop:
            return None
        # Only a match that ends in the new text is new; it can start at most _holdback
        # characters back, and those are exactly what _tail keeps.
        window = self._tail + text
        window_start = old_length - len(self._tail)
        hit = _find_stop(window, len(self._tail), self._stop)
        if hit is None:
            self._tail = window[-self._holdback :] if self._holdback else ""
            return None
        position, stop_str = hit
        keep = window_start + position + (len(stop_str) if self._include_stop else 0)
        self._truncate(self._length - keep)
        self._stop_reason = stop_str
        self._finished = True
        return stop_str

    def _truncate(self, n: int) -> None:
        """Drop the last n characters. The hold-back guarantees none of them was handed out."""
        self._length -= n
        for chunks in (self._chunks, self._unsent):
            remaining = n
            while remaining > 0 and chunks:
                last = chunks[-1]
                if len(last) <= remaining:
                    chunks.pop()
                    remaining -= len(last)
                else:
                    chunks[-1] = last[:-remaining]
                    remaining = 0


def _find_stop(window: str, new_start: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """The stop-string match in ``window`` ending earliest after ``new_start`` (the first one the
    text completes); among matches ending together, the one starting earliest."""
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for stop_str in stops:
        start = window.find(stop_str, max(0, new_start - len(stop_str) + 1))
        if start < 0:
            continue
        end = start + len(stop_str)
        if best is None or (end, start) < best[:2]:
            best = (end, start, stop_str)
    return None if best is None else (best[1], best[2])


def _decoding_context(tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip: bool) -> list[int]:
    """The shortest prompt suffix that decodes cleanly (no U+FFFD), or [] if there is none.

    A prompt ending inside a multi-byte character has no clean suffix; the output is then decoded
    on its own, which keeps its text equal to ``decode(output_ids)``.
    """
    limit = min(len(prompt_token_ids), _MAX_CONTEXT_TOKENS)
    for n in range(1, limit + 1):
        suffix = [int(t) for t in prompt_token_ids[-n:]]
        if _REPLACEMENT_CHAR not in tokenizer.decode(suffix, skip):
            return suffix
    return []
