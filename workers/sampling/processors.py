"""The logits processors: each works on its own rows of the sampler's fp32 working copy (the batch
rows that need any processing), and touches nothing else.

Order, as vLLM's: logit bias and min_tokens masks -> penalties -> (the greedy argmax is taken
here) -> min-p -> top-k and top-p. Temperature is not applied to the logits: the sampling race
divides by it, and min-p / top-p use it where they need the tempered distribution. Greedy rows are
never given to min-p, top-k or top-p (none of them changes the argmax).

Bias and penalties rewrite logits only at the (row, token) entries they concern. Min-p, top-k and
top-p each keep a row's tokens at or above a threshold (tied tokens stay) and write -inf below it,
each over the tokens the earlier ones kept.

Top-k never sorts the vocabulary: ``torch.topk`` of the largest k among its rows gives each row's
k-th value (tokens tied with it stay, as vLLM's threshold keeps them). Top-p with top-k set works
on those k sorted candidates; the kept set's normaliser adds the tokens tied with the threshold
beyond them. Top-p without top-k sorts its own rows only (its nucleus can hold any number of
tokens). Both keep every token tied with the last one of the nucleus.

The builder orders the processed rows so that each truncation processor's rows are one range
(a view: nothing gathered or scattered). Every shape here is known on the host; nothing reads a
device value back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch


class LogitsProcessor(Protocol):
    def apply(self, logits: torch.Tensor) -> None:
        """Rewrite ``logits`` (fp32 [P, V], contiguous: the processed rows) in place."""


@dataclass(slots=True)
class LogitBias:
    """Additive biases as flat (row, token, value) lists: a request's logit_bias, and -inf on its
    EOS and stop tokens while it has fewer than min_tokens output tokens. Entries on one (row,
    token) add up."""

    rows: torch.Tensor  # int64 [N]
    tokens: torch.Tensor  # int64 [N]
    values: torch.Tensor  # fp32 [N]

    def apply(self, logits: torch.Tensor) -> None:
        logits.index_put_((self.rows, self.tokens), self.values, accumulate=True)


@dataclass(slots=True)
class Penalties:
    """vLLM's penalties: the repetition penalty divides positive (multiplies non-positive) logits
    of every token seen in the prompt or the output; frequency and presence penalties subtract
    ``frequency * count + presence * (count > 0)`` over output tokens only.

    Each row carries its distinct history tokens (the prompt's only where its repetition penalty
    is not 1) with their output counts; only those entries of the logits are read and written. A
    row's unused entries repeat its first entry (an empty row's are token 0, unseen, count 0), so
    every write to one (row, token) writes the same value."""

    rows: torch.Tensor  # int64 [R]
    presence: torch.Tensor  # fp32 [R]
    frequency: torch.Tensor  # fp32 [R]
    repetition: torch.Tensor  # fp32 [R]
    tokens: torch.Tensor  # int64 [R, U]
    counts: torch.Tensor  # fp32 [R, U]: occurrences among the output tokens
    seen: torch.Tensor  # bool [R, U]: a history token (False for an empty row's filler)
    any_repetition: bool  # some row's repetition penalty is not 1
    # Each row's output token still in flight (known on the device only), -1 where none.
    in_flight: torch.Tensor | None = None  # int64 [R]

    def apply(self, logits: torch.Tensor) -> None:
        tokens, counts, seen = self.tokens, self.counts, self.seen
        if self.in_flight is not None:
            tokens, counts, seen = self._with_in_flight(self.in_flight)
        flat = logits.view(-1)
        index = self.rows[:, None] * logits.shape[1] + tokens
        x = flat[index]
        if self.any_repetition:
            rep = self.repetition[:, None]
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - self.frequency[:, None] * counts - self.presence[:, None] * (counts > 0).to(x.dtype)
        flat[index] = x

    def _with_in_flight(self, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries with each row's in-flight token counted: an entry of that token gains one
        output; one more entry per row holds it (or repeats the first entry where none is in
        flight), with the same count as its matching entry if there is one."""
        pending = token >= 0
        match = self.tokens == token[:, None]
        counts = self.counts + match.to(self.counts.dtype)
        seen = self.seen | match
        matched_count = torch.where(match, counts, 0.0).amax(dim=-1)
        count = torch.where(match.any(dim=-1), matched_count, 1.0)
        extra_token = torch.where(pending, token, self.tokens[:, 0])
        extra_count = torch.where(pending, count, counts[:, 0])
        extra_seen = pending | seen[:, 0]
        return (
            torch.cat([self.tokens, extra_token[:, None]], dim=1),
            torch.cat([counts, extra_count[:, None]], dim=1),
            torch.cat([seen, extra_seen[:, None]], dim=1),
        )


@dataclass(slots=True)
class MinP:
    """Masks tokens whose tempered probability is below ``min_p`` times the row's largest:
    ``p_i < min_p * p_max`` is ``x_i < x_max + T * log(min_p)``, so no softmax is needed."""

    start: int  # rows [start, stop) of the processed rows
    stop: int
    min_p: torch.Tensor  # fp32 [R], > 0
    temperature: torch.Tensor  # fp32 [R], not greedy

    def apply(self, logits: torch.Tensor) -> None:
        x = logits[self.start : self.stop]
        _mask_below(x, x.amax(dim=-1, keepdim=True) + (self.temperature * self.min_p.log())[:, None])


# Top-k looks at the ``k`` chunks of this many tokens with the largest maxima first.
_CHUNK = 64


def _largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """[R, k] each row's k largest values, sorted descending (``x.topk(k).values``).

    Two stages when the row splits into at least ``4 k`` chunks: every value above the k-th
    largest chunk maximum lies in one of the k chunks with the largest maxima (a chunk outside
    them has a maximum no larger), and so do enough values equal to it; so the k largest of those
    k chunks are the row's. One reduction over the row replaces a selection over it."""
    rows, vocab = x.shape
    chunks = vocab // _CHUNK
    if vocab % _CHUNK or chunks < 4 * k:
        return x.topk(k, dim=-1).values
    blocks = x.view(rows, chunks, _CHUNK)
    best = blocks.amax(dim=-1).topk(k, dim=-1).indices
    return (
        blocks.gather(1, best[:, :, None].expand(rows, k, _CHUNK))
        .view(rows, k * _CHUNK)
        .topk(k, dim=-1)
        .values
    )


def _mask_below(x: torch.Tensor, low: torch.Tensor) -> None:
    """x[i, j] = -inf where x[i, j] < low[i, 0], in place. ``torch.where`` and a copy back: on CPU
    several times faster than ``masked_fill_``, and faster than ``where`` into its own input."""
    x.copy_(torch.where(x >= low, x, x.new_full((), -math.inf)))


def _count(mask: torch.Tensor) -> torch.Tensor:
    """[R, 1] the set entries of each row (an int32 sum: on CPU several times an int64 one's speed)."""
    return mask.sum(dim=-1, keepdim=True, dtype=torch.int32)


def _nucleus_cut(
    candidates: torch.Tensor,  # [R, K] sorted descending
    probs: torch.Tensor,  # [R, K] their probabilities in the kept set (0 where not valid)
    top_p: torch.Tensor,  # [R]
    valid: torch.Tensor | None,  # [R, K] bool: candidates in the kept set (a prefix); None: all
) -> torch.Tensor:
    """[R] the smallest logit of each row's nucleus: the candidates whose probability mass
    before them is below top_p (top_p = 1 keeps every valid one; the first is always kept)."""
    before = torch.cumsum(probs, dim=-1)
    before = torch.cat([torch.zeros_like(before[:, :1]), before[:, :-1]], dim=-1)
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    if valid is not None:
        keep &= valid
    last = keep.sum(dim=-1, keepdim=True).clamp_(min=1) - 1
    return candidates.gather(1, last)[:, 0]


@dataclass(slots=True)
class TopKTopP:
    """Top-k, then top-p (if any row has it) over the top-k renormalised, without a sort of the
    vocabulary: ``torch.topk`` gives the ``max_top_k`` largest logits of each row, sorted."""

    start: int  # rows [start, stop) of the processed rows
    stop: int
    top_k: torch.Tensor  # int64 [R], 1 <= top_k <= max_top_k
    max_top_k: int
    temperature: torch.Tensor  # fp32 [R], not greedy
    top_p: torch.Tensor | None = None  # fp32 [R], 1 = off

    def apply(self, logits: torch.Tensor) -> None:
        x = logits[self.start : self.stop]
        candidates = _largest(x, self.max_top_k)
        low = candidates.gather(1, self.top_k[:, None] - 1)
        if self.top_p is not None:
            valid = torch.arange(self.max_top_k, device=x.device)[None, :] < self.top_k[:, None]
            scale = self.temperature.reciprocal()[:, None]
            probs = ((candidates - candidates[:, :1]) * scale).exp() * valid
            # Tokens tied with the k-th logit beyond the row's k candidates are kept by top-k too:
            # all tokens at or above it, less the candidates.
            ties = _count(x >= low) - _count(valid)
            total = probs.sum(dim=-1, keepdim=True) + ties * ((low - candidates[:, :1]) * scale).exp()
            low = _nucleus_cut(candidates, probs / total, self.top_p, valid)[:, None]
        _mask_below(x, low)


@dataclass(slots=True)
class TopP:
    """Top-p on rows without top-k: the nucleus may be most of the vocabulary, so these rows (and
    only these) are sorted."""

    start: int  # rows [start, stop) of the processed rows
    stop: int
    top_p: torch.Tensor  # fp32 [R], < 1
    temperature: torch.Tensor  # fp32 [R], not greedy

    def apply(self, logits: torch.Tensor) -> None:
        x = logits[self.start : self.stop]
        ordered = x.sort(dim=-1, descending=True).values
        scale = self.temperature.reciprocal()[:, None]
        probs = ((ordered - ordered[:, :1]) * scale).exp_()
        probs /= probs.sum(dim=-1, keepdim=True)
        low = _nucleus_cut(ordered, probs, self.top_p, None)[:, None]
        _mask_below(x, low)
