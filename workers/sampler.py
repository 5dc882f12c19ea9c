"""The sampler: vectorised over the batch, on the logits' device.

Order, as vLLM's: logit bias and min-tokens masking -> penalties -> (greedy argmax) ->
temperature -> min-p -> top-k / top-p -> exponential-race sampling. Sampling draws
``argmax(probs / E)`` with ``E ~ Exp(1)`` (equivalent to sampling from ``probs``; no sort, no host
sync). A seeded request draws its noise from a generator keyed by (seed, output position), so its
tokens do not depend on what else is in the batch, nor on preemptions.

Without min-p / top-k / top-p (the common case) the race runs as ``argmax(logits / T + Gumbel)``
in one fused pass (``kernels.ops.sample_race``): the logits are read once, in their own dtype, and
every row's noise is keyed by a per-row seed, so seeded rows cost nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels import ops

_EPS = 1e-5


@dataclass(slots=True)
class SamplingMetadata:
    temperature: torch.Tensor  # fp32 [B]; 0 = greedy
    all_greedy: bool
    top_k: torch.Tensor | None = None  # int64 [B], 0 = off
    top_p: torch.Tensor | None = None  # fp32 [B], 1 = off
    min_p: torch.Tensor | None = None  # fp32 [B], 0 = off
    # (row, seed, output position) of seeded random rows
    seeded_rows: list[tuple[int, int, int]] | None = None
    # int64 [B] per-row noise seeds; built by the sampler (_row_seeds) when None
    seeds: torch.Tensor | None = None
    # Penalties: per-row values and the token history they look at.
    presence_penalty: torch.Tensor | None = None  # fp32 [B]
    frequency_penalty: torch.Tensor | None = None  # fp32 [B]
    repetition_penalty: torch.Tensor | None = None  # fp32 [B]
    prompt_token_ids: torch.Tensor | None = None  # int64 [B, Lp], padded with vocab_size
    output_token_ids: torch.Tensor | None = None  # int64 [B, Lo], padded with vocab_size
    # Additive logit bias and -inf masks as flat (row, token, value) index lists.
    bias_rows: torch.Tensor | None = None
    bias_tokens: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    max_num_logprobs: int | None = None  # None: no row wants logprobs


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [B]
    logprob_token_ids: torch.Tensor | None = None  # int64 [B, 1 + K]: sampled, then top-K
    logprobs: torch.Tensor | None = None  # fp32 [B, 1 + K]
    sampled_ranks: torch.Tensor | None = None  # int64 [B]


def _seeded_key(seed: int, position: int) -> int:
    return (seed * 6364136223846793005 + position * 1442695040888963407 + 1) % (1 << 63)


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=counts.dtype))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> None:
    vocab = logits.shape[1]
    output_counts = _token_counts(md.output_token_ids, vocab)
    if md.repetition_penalty is not None:
        seen = (_token_counts(md.prompt_token_ids, vocab) + output_counts) > 0
        rep = md.repetition_penalty[:, None].expand_as(logits)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits.copy_(torch.where(seen, penalised, logits))
    if md.frequency_penalty is not None:
        logits.sub_(md.frequency_penalty[:, None] * output_counts)
    if md.presence_penalty is not None:
        logits.sub_(md.presence_penalty[:, None] * (output_counts > 0).to(logits.dtype))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> None:
    """Mask (to -inf) everything outside the top-k and outside the top-p nucleus, in place."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, logits.shape[1])[:, None]
        drop |= ranks >= k
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop |= mass_before > top_p[:, None]  # always keeps the first token
    logits.scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def _row_seeds(
    num_rows: int, seeded_rows: list[tuple[int, int, int]] | None, device: torch.device
) -> torch.Tensor:
    """int64 [B] noise seeds for ``sample_race`` when the caller gave none (the ModelRunner builds
    them with the step's inputs): drawn from the device's default generator, with seeded
    requests' rows keyed by (seed, output position)."""
    seeds = torch.randint(0, 2**62, (num_rows,), dtype=torch.int64, device=device)
    if seeded_rows:
        rows = np.fromiter((r for r, _, _ in seeded_rows), dtype=np.int64, count=len(seeded_rows))
        keys = np.fromiter(
            (_seeded_key(s, p) for _, s, p in seeded_rows), dtype=np.int64, count=len(seeded_rows)
        )
        seeds[torch.from_numpy(rows).to(device)] = torch.from_numpy(keys).to(device)
    return seeds


def sample(logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
    raw_logprobs = logits.float().log_softmax(dim=-1) if md.max_num_logprobs is not None else None
    if md.bias_rows is not None or md.output_token_ids is not None:
        logits = logits.float()
        if md.bias_rows is not None:
            logits.index_put_((md.bias_rows, md.bias_tokens), md.bias_values, accumulate=True)
        if md.output_token_ids is not None:
            apply_penalties(logits, md)

    if md.all_greedy:
        tokens = logits.argmax(dim=-1)
    elif md.top_k is None and md.top_p is None and md.min_p is None:
        # Temperature alone: one pass over the logits, the noise keyed per row.
        seeds = md.seeds if md.seeds is not None else _row_seeds(len(logits), md.seeded_rows, logits.device)
        tokens = ops.sample_race(logits, md.temperature, seeds)
    else:
        tokens = _sample_truncated(logits.float(), md)

    out = SamplerOutput(token_ids=tokens)
    if raw_logprobs is not None:
        sampled_lp = raw_logprobs.gather(1, tokens[:, None])
        out.sampled_ranks = (raw_logprobs > sampled_lp).sum(dim=-1) + 1
        if md.max_num_logprobs:
            top_lp, top_ids = raw_logprobs.topk(md.max_num_logprobs, dim=-1)
            out.logprob_token_ids = torch.cat([tokens[:, None], top_ids], dim=1)
            out.logprobs = torch.cat([sampled_lp, top_lp], dim=1)
        else:
            out.logprob_token_ids = tokens[:, None]
            out.logprobs = sampled_lp
    return out


def _sample_truncated(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Sampling with min-p / top-k / top-p: the masks need the probabilities, so this path
    normalises (and, for top-k / top-p, sorts) on the device."""
    greedy = logits.argmax(dim=-1)
    temperature = md.temperature
    is_greedy = temperature < _EPS
    scaled = logits / torch.where(is_greedy, 1.0, temperature)[:, None]
    if md.min_p is not None:
        probs = scaled.softmax(dim=-1)
        threshold = md.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        scaled.masked_fill_(probs < threshold, float("-inf"))
    if md.top_k is not None or md.top_p is not None:
        apply_top_k_top_p(scaled, md.top_k, md.top_p)
    probs = scaled.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    for row, seed, position in md.seeded_rows or ():
        gen = torch.Generator(device=probs.device).manual_seed(_seeded_key(seed, position))
        noise[row].exponential_(generator=gen)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(is_greedy, greedy, sampled)
