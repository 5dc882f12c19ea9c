"""Temperature sampling in one pass over the logits (``sample_race_ref`` semantics).

Sampling from ``softmax(logits / T)`` is drawing ``argmax(logits / T + G)`` with ``G`` Gumbel
noise (the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, in log space): no softmax, no sort,
no normalisation, so the logits are read exactly once and never written. Greedy rows
(``T < 1e-5``) take the plain argmax in the same pass.

The noise is counter-based (Philox, ``tl.rand``): row ``r`` draws ``u = rand(seeds[r], token)``,
so a row's token depends only on its logits and its seed, never on the rest of the batch and with
no generator object per request. A seeded request's seed is derived from (seed, output position)
by the caller; unseeded rows get seeds from the device's default generator.

Grid ``(rows, chunks)``: each program reduces ``BLOCK`` tokens of one row to (best score, token);
a second small kernel picks the best chunk per row (ties go to the lowest token id, as
``torch.argmax``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096
_GREEDY_EPS = 1e-5


@triton.jit
def _race_chunk_kernel(
    logits_ptr,
    temperature_ptr,
    seeds_ptr,
    best_score_ptr,  # fp32 [rows, chunks]
    best_token_ptr,  # int32 [rows, chunks]
    stride_row,
    vocab,
    num_chunks,
    GREEDY_EPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    tokens = chunk * BLOCK + tl.arange(0, BLOCK)
    valid = tokens < vocab
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + tokens, mask=valid, other=float("-inf"))
    x = x.to(tl.float32)
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seeds_ptr + row)
    u = tl.rand(seed, tokens)
    # Gumbel(0, 1) = -log(E), E = -log(u); u == 0 gives -inf, a token that cannot win (p = 2^-32).
    gumbel = -tl.log(-tl.log(u))
    greedy = temperature < GREEDY_EPS
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
    score = tl.where(greedy, x, x * inv_t + gumbel)
    score = tl.where(valid, score, float("-inf"))
    best = tl.max(score, 0)
    # Lowest index among the maxima (an all -inf chunk still names a valid token).
    token = tl.min(tl.where(score == best, tokens, vocab), 0)
    token = tl.minimum(token, vocab - 1)
    out = row * num_chunks + chunk
    tl.store(best_score_ptr + out, best)
    tl.store(best_token_ptr + out, token)


@triton.jit
def _race_reduce_kernel(best_score_ptr, best_token_ptr, out_ptr, num_chunks, CHUNKS_PAD: tl.constexpr):
    row = tl.program_id(0)
    chunks = tl.arange(0, CHUNKS_PAD)
    ok = chunks < num_chunks
    score = tl.load(best_score_ptr + row * num_chunks + chunks, mask=ok, other=float("-inf"))
    token = tl.load(best_token_ptr + row * num_chunks + chunks, mask=ok, other=2**30)
    best = tl.max(score, 0)
    # Chunks are in token order, so the lowest token among the best chunks is the first maximum.
    winner = tl.min(tl.where(ok & (score == best), token, 2**30), 0)
    tl.store(out_ptr + row, winner.to(tl.int64))


def sample_race(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (any float dtype, unit stride along V), temperature fp32 [B] (0 = greedy),
    seeds int64 [B]; returns int64 [B] token ids."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block = min(_BLOCK, triton.next_power_of_2(vocab))
    chunks = triton.cdiv(vocab, block)
    best_score = torch.empty((rows, chunks), dtype=torch.float32, device=logits.device)
    best_token = torch.empty((rows, chunks), dtype=torch.int32, device=logits.device)
    _race_chunk_kernel[(rows, chunks)](
        logits, temperature, seeds, best_score, best_token, logits.stride(0), vocab, chunks,
        GREEDY_EPS=_GREEDY_EPS, BLOCK=block, num_warps=8 if block >= 4096 else 4,
    )  # fmt: skip
    _race_reduce_kernel[(rows,)](
        best_score, best_token, out, chunks, CHUNKS_PAD=max(2, triton.next_power_of_2(chunks)), num_warps=1
    )
    return out
