"""The sampler: vectorised over the batch, on the logits' device, with no host sync.

A step's rows are of two kinds. Rows that need no processing (temperature, seed and maybe
logprobs only: the common case) are sampled straight from the model's logits, in their own dtype,
by one pass of ``kernels.ops.sample_race``. Rows that need processing (logit bias, min_tokens,
penalties, min-p, top-k, top-p) are copied, alone, to an fp32 working tensor, run through the
logits processors (``workers.sampling.processors``), each of which touches only its own rows, and
then raced the same way. A row's token is a function of its (processed) logits and its noise seed
only, so what else is in the batch, and which kind the other rows are, never changes it.

Sampling is an exponential race, ``argmax(logits / T + Gumbel)`` (the kernel) or its equivalent
inversion (the CPU reference): no normalisation, no sort, no ``torch.multinomial``. A seeded
request's noise seed is keyed by (seed, output position), so its tokens are reproducible whatever
the batch, and survive preemption.

The structured-output bitmask, when given, is applied to the model's logits first, in place, as
vLLM applies the grammar bitmask before its sampler. Logprobs are those of the model's
distribution after that mask and before anything else (vLLM's default, raw logprobs), computed for
the rows that ask for them only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels import ops
from workers.sampling.processors import LogitsProcessor


@dataclass(slots=True)
class TokenBitmask:
    """The allowed tokens of constrained rows, packed as xgrammar and vLLM pack them: bit j of
    word w allows token 32 w + j."""

    rows: torch.Tensor  # int64 [R]: batch rows
    bitmask: torch.Tensor  # int32 [R, W], W >= ceil(V / 32)

    def apply(self, logits: torch.Tensor) -> None:
        ops.apply_token_bitmask(logits, self.bitmask, self.rows)


@dataclass(slots=True)
class SamplingMetadata:
    """A step's sampling inputs on the device (``workers.sampling.inputs`` builds them)."""

    temperature: torch.Tensor  # fp32 [B]; < 1e-5 = greedy
    all_greedy: bool
    seeds: torch.Tensor | None = None  # int64 [B] noise seeds; required unless all_greedy
    # Batch rows copied to fp32 and run through ``processors`` (whose row indices index this
    # list), and the other rows; both None when no row needs processing.
    processed: torch.Tensor | None = None  # int64 [P]
    unprocessed: torch.Tensor | None = None  # int64 [B - P]
    processors: list[LogitsProcessor] = field(default_factory=list)
    bitmask: TokenBitmask | None = None
    max_num_logprobs: int | None = None  # None: no row wants logprobs
    logprob_rows: torch.Tensor | None = None  # int64: the rows that want them; None: every row


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [B]
    # Rows that asked for logprobs; the other rows hold zeros.
    logprob_token_ids: torch.Tensor | None = None  # int64 [B, 1 + K]: sampled, then top-K
    logprobs: torch.Tensor | None = None  # fp32 [B, 1 + K]
    sampled_ranks: torch.Tensor | None = None  # int64 [B]


def sample(logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
    """Sample one token per row of ``logits`` [B, V]. ``logits`` is modified only by the bitmask."""
    if md.bitmask is not None:
        md.bitmask.apply(logits)
    raw_logprobs = None
    if md.max_num_logprobs is not None:
        wanted = logits if md.logprob_rows is None else logits.index_select(0, md.logprob_rows)
        raw_logprobs = wanted.float().log_softmax(dim=-1)
    if md.processed is None:
        tokens = logits.argmax(dim=-1) if md.all_greedy else ops.sample_race(logits, md.temperature, md.seeds)
    else:
        tokens = _sample_processed(logits, md)
    out = SamplerOutput(token_ids=tokens)
    if raw_logprobs is not None:
        _add_logprobs(out, raw_logprobs, md)
    return out


def apply_processors(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """fp32 [P, V]: the processed rows of ``logits`` after every logits processor, in order."""
    assert md.processed is not None
    work = logits.index_select(0, md.processed).float()
    for processor in md.processors:
        processor.apply(work)
    return work


def _sample_processed(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    assert md.processed is not None and md.unprocessed is not None
    work = apply_processors(logits, md)
    if md.all_greedy:
        tokens = logits.argmax(dim=-1)
        tokens[md.processed] = work.argmax(dim=-1)
        return tokens
    assert md.seeds is not None
    tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    if md.unprocessed.numel():
        tokens[md.unprocessed] = ops.sample_race(logits, md.temperature, md.seeds, md.unprocessed)
    temperature, seeds = md.temperature[md.processed], md.seeds[md.processed]
    tokens[md.processed] = ops.sample_race(work, temperature, seeds, scratch=True)
    return tokens


def _add_logprobs(out: SamplerOutput, raw_logprobs: torch.Tensor, md: SamplingMetadata) -> None:
    rows = md.logprob_rows
    tokens = out.token_ids if rows is None else out.token_ids[rows]
    sampled_lp = raw_logprobs.gather(1, tokens[:, None])
    ranks = (raw_logprobs > sampled_lp).sum(dim=-1) + 1
    ids, lps = tokens[:, None], sampled_lp
    if md.max_num_logprobs:
        top_lp, top_ids = raw_logprobs.topk(md.max_num_logprobs, dim=-1)
        ids, lps = torch.cat([ids, top_ids], dim=1), torch.cat([lps, top_lp], dim=1)
    if rows is not None:
        num_rows = out.token_ids.shape[0]
        ids = ids.new_zeros(num_rows, ids.shape[1]).index_copy_(0, rows, ids)
        lps = lps.new_zeros(num_rows, lps.shape[1]).index_copy_(0, rows, lps)
        ranks = ranks.new_zeros(num_rows).index_copy_(0, rows, ranks)
    out.logprob_token_ids, out.logprobs, out.sampled_ranks = ids, lps, ranks
