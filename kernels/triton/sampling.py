"""Temperature sampling in one pass over the logits (``sample_race_ref`` semantics).

Sampling from ``softmax(logits / T)`` is drawing ``argmax(logits / T + G)`` with ``G`` Gumbel
noise (the exponential race ``argmax(p / E)``, ``E ~ Exp(1)``, in log space): no softmax, no sort,
no normalisation, so the logits are read exactly once and never written. Greedy rows
(``T < 1e-5``) take the plain argmax in the same pass.

The noise is counter-based (Philox, ``tl.rand4x``): row ``r``'s uniforms are a function of
``seeds[r]`` and the token index alone, so a row's token depends only on its logits and its seed, never on the rest of the batch and with
no generator object per request. A seeded request's seed is derived from (seed, output position)
by the caller; unseeded rows get seeds from the device's default generator.

Grid ``(rows, chunks)``: each program reduces ``BLOCK`` tokens of one row to (best score, token);
a second small kernel picks the best chunk per row (ties go to the lowest token id, as
``torch.argmax``). With ``rows`` given, program row ``i`` samples logits row ``rows[i]``: the sampler
races the rows it left unprocessed straight from the model's logits, without a gathered copy.

``apply_token_bitmask`` sets to -inf, in place, the tokens whose bit is clear in a packed int32
bitmask (structured outputs), for the rows it names only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton.launch import launch

_BLOCK = 4096
_GREEDY_EPS = 1e-5


@triton.jit
def _race_scores(row_ptr, tokens, u, vocab, inv_t, greedy):
    """Per-token scores of one sub-block of tokens with its uniforms ``u`` (-inf past the vocab)."""
    valid = tokens < vocab
    x = tl.load(row_ptr + tokens, mask=valid, other=float("-inf")).to(tl.float32)
    # Scores in base-2 units (a positive scale leaves the argmax alone): x / T * log2(e) plus
    # Gumbel / ln 2 = -log2(E), E = -ln(u) = -log2(u) * ln 2. u == 0 gives -inf: that token cannot
    # win (probability 2^-31).
    gumbel = -tl.log2(-tl.log2(u) * 0.6931471805599453)
    score = tl.where(greedy, x, x * inv_t + gumbel)
    return tl.where(valid, score, float("-inf"))


@triton.jit
def _race_chunk_kernel(
    logits_ptr,
    rows_ptr,  # int64 [programs] logits rows, read when HAS_ROWS
    temperature_ptr,
    seeds_ptr,
    best_score_ptr,  # fp32 [rows, chunks]
    best_token_ptr,  # int32 [rows, chunks]
    stride_row,
    vocab,
    num_chunks,
    GREEDY_EPS: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    program_row = tl.program_id(0)
    chunk = tl.program_id(1)
    if HAS_ROWS:
        row = tl.load(rows_ptr + program_row)
    else:
        row = program_row
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperature_ptr + row)
    seed = tl.load(seeds_ptr + row)
    greedy = temperature < GREEDY_EPS
    inv_t = 1.4426950408889634 / tl.where(greedy, 1.0, temperature)
    # One Philox call yields four uniforms: counter c feeds tokens c, c + Q, c + 2Q, c + 3Q of the
    # chunk (a quarter of the generator's work of one call per token; the RNG, not the memory,
    # bounds this kernel).
    QUARTER: tl.constexpr = BLOCK // 4
    lanes = tl.arange(0, QUARTER)
    u0, u1, u2, u3 = tl.rand4x(seed, chunk * QUARTER + lanes)
    base = chunk * BLOCK + lanes
    # The four sub-blocks are merged lane by lane first, so the program reduces across its threads
    # once (a max and a min) instead of once per sub-block, each a round of shared memory and
    # barriers. A later sub-block holds the higher token of a lane, so it wins only when strictly
    # better (ties stay with the lowest).
    best = _race_scores(row_ptr, base, u0, vocab, inv_t, greedy)
    token = base
    score = _race_scores(row_ptr, base + QUARTER, u1, vocab, inv_t, greedy)
    token = tl.where(score > best, base + QUARTER, token)
    best = tl.maximum(best, score)
    score = _race_scores(row_ptr, base + 2 * QUARTER, u2, vocab, inv_t, greedy)
    token = tl.where(score > best, base + 2 * QUARTER, token)
    best = tl.maximum(best, score)
    score = _race_scores(row_ptr, base + 3 * QUARTER, u3, vocab, inv_t, greedy)
    token = tl.where(score > best, base + 3 * QUARTER, token)
    best = tl.maximum(best, score)
    chunk_best = tl.max(best, 0)
    chunk_token = tl.min(tl.where(best == chunk_best, token, vocab), 0)
    out = program_row * num_chunks + chunk
    tl.store(best_score_ptr + out, chunk_best)
    tl.store(best_token_ptr + out, tl.minimum(chunk_token, vocab - 1))  # an all -inf chunk names a real token


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


def sample_race(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seeds: torch.Tensor,
    rows: torch.Tensor | None = None,
    scratch: bool = False,
) -> torch.Tensor:
    """logits [B, V] (any float dtype, unit stride along V), temperature fp32 [B] (0 = greedy),
    seeds int64 [B], rows int64 [R] or None (every row); returns int64 token ids, [R] or [B].
    The kernel never writes the logits (``scratch`` lets the reference do so)."""
    vocab = logits.shape[1]
    num_rows = logits.shape[0] if rows is None else rows.shape[0]
    # Zeros, not empty: inside parallel_compile the kernels do not run, and warm-up passes still
    # read the tokens as indices (logprobs).
    out = torch.zeros(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    # The per-row vectors are read at a row's index: unit stride (a no-op when they have it).
    temperature, seeds = temperature.contiguous(), seeds.contiguous()
    rows = None if rows is None else rows.contiguous()
    block = max(64, min(_BLOCK, triton.next_power_of_2(vocab)))
    chunks = triton.cdiv(vocab, block)
    best_score = torch.empty((num_rows, chunks), dtype=torch.float32, device=logits.device)
    best_token = torch.empty((num_rows, chunks), dtype=torch.int32, device=logits.device)
    launch(_race_chunk_kernel, (num_rows, chunks),
        logits, out if rows is None else rows, temperature, seeds, best_score, best_token,
        logits.stride(0), vocab, chunks,
        GREEDY_EPS=_GREEDY_EPS, BLOCK=block, HAS_ROWS=rows is not None, num_warps=8 if block >= 4096 else 4,
    )  # fmt: skip
    launch(
        _race_reduce_kernel,
        (num_rows,),
        best_score,
        best_token,
        out,
        chunks,
        CHUNKS_PAD=max(2, triton.next_power_of_2(chunks)),
        num_warps=1,
    )
    return out


_MASK_BLOCK = 1024


@triton.jit
def _bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, stride_row, stride_mask, vocab, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = tokens < vocab
    row = tl.load(rows_ptr + i)
    words = tl.load(bitmask_ptr + i * stride_mask + tokens // 32, mask=valid, other=-1)
    blocked = valid & (((words >> (tokens % 32)) & 1) == 0)
    tl.store(logits_ptr + row * stride_row + tokens, float("-inf"), mask=blocked)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [B, V] (unit stride along V), modified in place; bitmask int32 [R, W], bit j of word
    w allows token 32 w + j; rows int64 [R], the logits row of each bitmask row."""
    num_rows, vocab = rows.shape[0], logits.shape[1]
    if num_rows == 0:
        return
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1
    rows = rows.contiguous()
    launch(_bitmask_kernel, (num_rows, triton.cdiv(vocab, _MASK_BLOCK)),
        logits, bitmask, rows, logits.stride(0), bitmask.stride(0), vocab, BLOCK=_MASK_BLOCK, num_warps=4,
    )  # fmt: skip
