"""The logits processors: each rewrites, in place, only its own rows of the sampler's fp32 working
copy (the batch rows that need any processing), gathering them, processing and scattering back.

Order, as vLLM's: logit bias and min_tokens masks -> penalties -> (the greedy argmax is taken
here) -> min-p -> top-k and top-p. Temperature is not applied to the logits: the sampling race
divides by it, and min-p / top-p use it where they need the tempered distribution. Greedy rows are
never given to min-p, top-k or top-p (none of them changes the argmax).

Top-k never sorts the vocabulary: ``torch.topk`` of the largest k among its rows gives each row's
k-th value, and tokens below it are masked (tokens tied with it stay, as vLLM's threshold keeps
them). Top-p with top-k set works on those k sorted candidates: the kept set's normaliser is one
log-sum-exp over the row, the nucleus is a prefix of the candidates. Top-p without top-k sorts its
own rows only (the nucleus can hold any number of tokens). Both keep every token tied with the
last one of the nucleus.

Every shape here is known on the host; nothing reads a device value back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch


class LogitsProcessor(Protocol):
    def apply(self, logits: torch.Tensor) -> None:
        """Rewrite ``logits`` (fp32 [P, V], the processed rows) in place."""


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
    ``frequency * count + presence * (count > 0)`` over output tokens only."""

    rows: torch.Tensor  # int64 [R]
    presence: torch.Tensor  # fp32 [R]
    frequency: torch.Tensor  # fp32 [R]
    repetition: torch.Tensor  # fp32 [R]
    # Each row's tokens, prompt first, then output tokens, padded with the vocabulary size.
    history: torch.Tensor  # int64 [R, L]
    prompt_lens: torch.Tensor  # int64 [R]: leading history entries that are prompt tokens
    any_repetition: bool  # some row's repetition penalty is not 1 (the prompt tokens matter)

    def apply(self, logits: torch.Tensor) -> None:
        vocab = logits.shape[1]
        num_rows, width = self.history.shape
        x = logits[self.rows]
        is_output = torch.arange(width, device=x.device)[None, :] >= self.prompt_lens[:, None]
        outputs = torch.where(is_output, self.history, vocab)
        counts = torch.zeros(num_rows, vocab + 1, dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=x.dtype))
        counts = counts[:, :vocab]
        if self.any_repetition:
            seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=x.device)
            seen.scatter_(1, self.history, True)
            rep = self.repetition[:, None]
            x = torch.where(seen[:, :vocab], torch.where(x > 0, x / rep, x * rep), x)
        x -= self.frequency[:, None] * counts
        x -= self.presence[:, None] * (counts > 0).to(x.dtype)
        logits[self.rows] = x


@dataclass(slots=True)
class MinP:
    """Masks tokens whose tempered probability is below ``min_p`` times the row's largest one:
    ``p_i < min_p * p_max`` is ``(x_i - x_max) / T < log(min_p)``, so no softmax is needed."""

    rows: torch.Tensor  # int64 [R]
    min_p: torch.Tensor  # fp32 [R], > 0
    temperature: torch.Tensor  # fp32 [R], not greedy

    def apply(self, logits: torch.Tensor) -> None:
        x = logits[self.rows]
        floor = x.amax(dim=-1, keepdim=True) + self.temperature[:, None] * self.min_p[:, None].log()
        logits[self.rows] = x.masked_fill(x < floor, -math.inf)


def _nucleus_cut(
    candidates: torch.Tensor,  # [R, K] sorted descending
    scale: torch.Tensor,  # [R, 1]: 1 / temperature
    log_norm: torch.Tensor,  # [R, 1]: log-sum-exp of the tempered kept set
    top_p: torch.Tensor,  # [R]
    valid: torch.Tensor | None,  # [R, K] bool: candidates inside the row's top-k
) -> torch.Tensor:
    """[R, 1] the smallest logit of each row's nucleus: the candidates whose probability mass
    before them (in descending order) is below top_p; top_p = 1 keeps every candidate."""
    probs = (candidates * scale - log_norm).exp()
    if valid is not None:
        probs = probs.masked_fill(~valid, 0.0)
    before = torch.cumsum(probs, dim=-1)
    before = torch.cat([torch.zeros_like(before[:, :1]), before[:, :-1]], dim=-1)
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    if valid is not None:
        keep &= valid
    last = keep.sum(dim=-1, keepdim=True).clamp_(min=1) - 1  # the first candidate is always kept
    return candidates.gather(1, last)


@dataclass(slots=True)
class TopKTopP:
    """Top-k, then top-p (if any row has it) over the top-k renormalised, without a sort of the
    vocabulary: ``torch.topk`` gives the ``max_top_k`` largest logits of each row, sorted."""

    rows: torch.Tensor  # int64 [R]
    top_k: torch.Tensor  # int64 [R], 1 <= top_k <= max_top_k
    max_top_k: int
    temperature: torch.Tensor  # fp32 [R], not greedy
    top_p: torch.Tensor | None = None  # fp32 [R], 1 = off

    def apply(self, logits: torch.Tensor) -> None:
        x = logits[self.rows]
        candidates = x.topk(self.max_top_k, dim=-1).values
        kth = candidates.gather(1, self.top_k[:, None] - 1)
        x.masked_fill_(x < kth, -math.inf)
        if self.top_p is not None:
            scale = self.temperature.reciprocal()[:, None]
            log_norm = torch.logsumexp(x * scale, dim=-1, keepdim=True)
            ranks = torch.arange(self.max_top_k, device=x.device)[None, :]
            cut = _nucleus_cut(candidates, scale, log_norm, self.top_p, ranks < self.top_k[:, None])
            x.masked_fill_(x < cut, -math.inf)
        logits[self.rows] = x


@dataclass(slots=True)
class TopP:
    """Top-p on rows without top-k: the nucleus may be most of the vocabulary, so these rows (and
    only these) are sorted."""

    rows: torch.Tensor  # int64 [R]
    top_p: torch.Tensor  # fp32 [R], < 1
    temperature: torch.Tensor  # fp32 [R], not greedy

    def apply(self, logits: torch.Tensor) -> None:
        x = logits[self.rows]
        ordered = x.sort(dim=-1, descending=True).values
        scale = self.temperature.reciprocal()[:, None]
        log_norm = torch.logsumexp(ordered * scale, dim=-1, keepdim=True)
        cut = _nucleus_cut(ordered, scale, log_norm, self.top_p, None)
        logits[self.rows] = x.masked_fill_(x < cut, -math.inf)
