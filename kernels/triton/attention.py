"""Paged attention over the NHD block cache: one varlen kernel for prefill, chunked prefill and decode.

Same signature and semantics as ``kernels.reference.paged_attention_ref`` (the layout is documented
there). Design:

* A program owns one *q-block* of one sequence for one KV head: ``BLOCK_Q`` query tokens times the
  ``GROUP = Hq // Hkv`` query heads that share the KV head, packed into ``BLOCK_M = BLOCK_Q * GROUP``
  (padded) rows. K and V of a KV head are therefore read once per q-block, not once per query head,
  and a decode step reads each sequence's cache exactly once per KV head.
* The grid is ``(num_tokens // BLOCK_Q + num_seqs, Hkv[, splits])``: an upper bound on the number of
  q-blocks that needs nothing but shapes, so launching needs no host sync and can be graph-captured.
  Each program finds its sequence by binary search over ``query_start_loc[s] // BLOCK_Q + s`` (the
  index of sequence s's first q-block) and exits if it has no tokens (padding, q_len 0).
* The cache is walked in tiles of ``TILE_N`` positions. Each position looks up its page in the block
  table on its own, so a tile may span pages and any page size works. Tiles that every row of the
  q-block may see run without masks; only the last tiles (causal diagonal, end of sequence) mask.
* Softmax and accumulation are fp32 with exp2 (log2(e) folded into the scale); offsets are int64.
* Split-KV (flash-decoding): for decode-shaped batches whose ``num_seqs * Hkv`` programs cannot fill
  the GPU, a third grid axis splits each sequence's tiles into ``num_splits`` chunks that write
  partial (acc, max, sum) to fp32 scratch, and a reduce kernel merges them. The split count is a
  function of shapes only (batch size, head count, SM count), so a captured graph stays valid; how
  many chunks are non-empty is decided in-kernel from ``seq_lens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton.launch import launch, num_sms

_LOG2E = 1.4426950408889634

# Split-KV tuning (shape-only heuristics; no autotune, since graphs cannot autotune). Measured on an
# H100 with benchmarks/kernels_bench.py: splitting pays until the grid holds about two programs per
# SM (although the decode tile's ~192 KB of shared memory at head_dim 128 keeps one resident at a
# time, shorter programs balance the SMs better); past that the reduce pass costs more than it gains.
MAX_SPLITS = 32
# Fewest cache positions one split handles: shorter splits cost more in the reduce than they gain.
MIN_SPLIT_TOKENS = 256
_PROGRAMS_PER_SM = 2
# Decode grids with at least this many programs per SM take the shallow-pipeline tiles.
_MANY_PROGRAMS_PER_SM = 3.0


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int  # packed rows (query tokens x query heads of one KV head) per program
    tile_n: int  # cache positions per inner-loop step
    num_warps: int
    num_stages: int


@triton.jit
def _find_q_block_seq(pid, query_start_loc_ptr, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s < num_seqs whose first q-block index ``query_start_loc[s] // BLOCK_Q + s`` is <= pid."""
    lo = pid * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        # Branch-free update with integer arithmetic (the interpreter turns scalar tl.where into 1-D).
        right = (first_block <= pid).to(tl.int32)
        lo = lo + right * (mid - lo)
        hi = mid - 1 + right * (hi - mid + 1)
    return lo


@triton.jit
def _find_token_seq(token, query_start_loc_ptr, num_seqs):
    """Largest s < num_seqs with query_start_loc[s] <= token: the sequence that owns the token."""
    lo = token * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        right = (tl.load(query_start_loc_ptr + mid) <= token).to(tl.int32)
        lo = lo + right * (mid - lo)
        hi = mid - 1 + right * (hi - mid + 1)
    return lo


@triton.jit
def _attend_tile(
    acc,
    m_i,
    l_i,
    q,
    tile,
    block_table_row_ptr,
    k_head_ptr,
    v_head_ptr,
    seq_len,
    row_pos,
    offs_d,
    qk_scale,
    stride_kb,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vd,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over cache positions [tile * TILE_N, (tile + 1) * TILE_N)."""
    pos = tile * TILE_N + tl.arange(0, TILE_N)
    kv_valid = pos < seq_len
    # Per-position page lookup: the tile may straddle pages, and the page size is free.
    if MASKED:
        page = tl.load(block_table_row_ptr + pos // PAGE_SIZE, mask=kv_valid, other=0)
    else:
        page = tl.load(block_table_row_ptr + pos // PAGE_SIZE)
    page = page.to(tl.int64)
    in_page = (pos % PAGE_SIZE).to(tl.int64)
    k_ptrs = k_head_ptr + (page * stride_kb + in_page * stride_ks)[None, :] + offs_d[:, None] * stride_kd
    v_ptrs = v_head_ptr + (page * stride_vb + in_page * stride_vs)[:, None] + offs_d[None, :] * stride_vd
    # Masked loads, not just masked scores: unwritten slots may hold NaN, and 0 * NaN poisons P @ V.
    if MASKED:
        if D_PAD == HEAD_DIM:
            k = tl.load(k_ptrs, mask=kv_valid[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=kv_valid[:, None], other=0.0)
        else:
            d_ok = offs_d < HEAD_DIM
            k = tl.load(k_ptrs, mask=kv_valid[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=kv_valid[:, None] & d_ok[None, :], other=0.0)
    else:
        if D_PAD == HEAD_DIM:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_ok = offs_d < HEAD_DIM
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)

    qk = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        visible = (pos[None, :] <= row_pos[:, None]) & kv_valid[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASKED:
        # A row may see nothing in this tile (split chunks past its causal limit): keep exp2 finite.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.exp2(qk - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# num_seqs and the block-table width (stride_bt) change every step: without do_not_specialize
# Triton compiles a variant per value class (== 1, divisible by 16, other), and each first use
# mid-serving stalls a step for as long as the compile takes (a TTFT tail under load).
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,  # fp32 [T, Hq, NUM_SPLITS, HEAD_DIM]; only touched when NUM_SPLITS > 1
    part_m_ptr,  # fp32 [T, Hq, NUM_SPLITS]
    part_l_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    qk_scale,
    num_seqs,
    num_q_heads,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    MIN_SPLIT_TILES: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)

    seq = _find_q_block_seq(pid, query_start_loc_ptr, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = pid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return  # beyond this sequence's queries: grid padding or a q_len 0 sequence
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    # Row r packs query token r // GROUP of the block with query head r % GROUP of this KV head.
    rows = tl.arange(0, BLOCK_M)
    row_tok = q_block * BLOCK_Q + rows // GROUP
    row_head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (row_tok < q_len)
    row_pos = ctx_len + row_tok
    row_token = (q_start + row_tok).to(tl.int64)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = q_ptr + (row_token * stride_qt + row_head * stride_qh)[:, None] + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_ok[None, :], other=0.0)

    # Positions every row may see: 0 .. first_pos. Positions the block needs: 0 .. last_pos.
    first_pos = ctx_len + q_block * BLOCK_Q
    last_pos = tl.minimum(first_pos + BLOCK_Q - 1, seq_len - 1)
    full_tiles = (first_pos + 1) // TILE_N
    num_tiles = tl.cdiv(last_pos + 1, TILE_N)
    split = 0
    tile_lo = 0
    tile_hi = num_tiles
    if NUM_SPLITS > 1:
        split = tl.program_id(2)
        seq_tiles = tl.cdiv(seq_len, TILE_N)
        per_split = tl.maximum(tl.cdiv(seq_tiles, NUM_SPLITS), MIN_SPLIT_TILES)
        if split * per_split >= seq_tiles:
            return  # empty chunk; the reduce kernel derives the same count and skips it
        tile_lo = split * per_split
        tile_hi = tl.minimum(tile_lo + per_split, num_tiles)

    block_table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head_ptr = k_cache_ptr + kv_head.to(tl.int64) * stride_kh
    v_head_ptr = v_cache_ptr + kv_head.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    for tile in range(tile_lo, tl.minimum(tile_hi, full_tiles)):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, tile, block_table_row_ptr, k_head_ptr, v_head_ptr, seq_len, row_pos,
            offs_d, qk_scale, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
            HEAD_DIM, D_PAD, PAGE_SIZE, TILE_N, False, DOT_PRECISION,
        )  # fmt: skip
    for tile in range(tl.maximum(tile_lo, full_tiles), tile_hi):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, tile, block_table_row_ptr, k_head_ptr, v_head_ptr, seq_len, row_pos,
            offs_d, qk_scale, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
            HEAD_DIM, D_PAD, PAGE_SIZE, TILE_N, True, DOT_PRECISION,
        )  # fmt: skip

    store_mask = row_valid[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:
        # Padding rows (never stored) may have l_i == 0; keep their division quiet.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = (
            out_ptr + (row_token * stride_ot + row_head * stride_oh)[:, None] + offs_d[None, :] * stride_od
        )
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        part = (row_token * num_q_heads + row_head) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=row_valid)
        tl.store(part_l_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=store_mask)


@triton.jit(do_not_specialize=["num_seqs"])
def _split_reduce_kernel(
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    num_seqs,
    num_q_heads,
    stride_ot,
    stride_oh,
    stride_od,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    S_PAD: tl.constexpr,
    MIN_SPLIT_TILES: tl.constexpr,
):
    """Merge the split partials of one (query token, query head).

    All splits are loaded at once rather than in a loop: one memory round trip, which is what this
    kernel's time is at decode sizes.
    """
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token >= tl.load(query_start_loc_ptr + num_seqs):
        return  # padding token past every sequence: the unsplit path does not write it either
    seq = _find_token_seq(token, query_start_loc_ptr, num_seqs)
    seq_len = tl.load(seq_lens_ptr + seq)
    seq_tiles = tl.cdiv(seq_len, TILE_N)
    per_split = tl.maximum(tl.cdiv(seq_tiles, NUM_SPLITS), MIN_SPLIT_TILES)
    active = tl.cdiv(seq_tiles, per_split)  # the chunks the attention kernel wrote

    splits = tl.arange(0, S_PAD)
    s_ok = splits < active
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    part = (token.to(tl.int64) * num_q_heads + head) * NUM_SPLITS + splits
    m = tl.load(part_m_ptr + part, mask=s_ok, other=float("-inf"))
    lse = tl.load(part_l_ptr + part, mask=s_ok, other=0.0)
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_max = tl.max(m, 0)
    # Chunks past a row's causal limit carry m = -inf and weigh 0.
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(lse * w, 0)
    out = num / tl.where(den == 0.0, 1.0, den)
    o_ptrs = out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + offs_d * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def choose_num_splits(num_tokens: int, num_seqs: int, num_kv_heads: int, sms: int) -> int:
    """Split-KV factor from shapes only, so that a CUDA graph captured at a batch size stays valid.

    Only decode-shaped batches (one query token per sequence, padded) split: a prefill has enough
    q-blocks to fill the GPU. Splits double while the grid stays within about two programs per SM.
    """
    if num_seqs == 0 or num_tokens > num_seqs:
        return 1
    programs = num_seqs * num_kv_heads
    target = _PROGRAMS_PER_SM * sms
    splits = 1
    while splits < MAX_SPLITS and programs * splits * 2 <= target:
        splits *= 2
    return splits


def choose_config(
    num_tokens: int, num_seqs: int, group: int, head_dim: int, programs_per_sm: float = 0.0
) -> AttentionConfig:
    """Tile shapes from shapes only (fixed heuristics: no autotune inside CUDA graphs).

    ``programs_per_sm``: the decode grid's programs (sequences x KV heads x splits) per SM.
    """
    d_pad = triton.next_power_of_2(head_dim)
    gpad = triton.next_power_of_2(group)
    if num_tokens <= num_seqs:
        # Decode: one token per sequence, so the rows are just the GROUP heads of a KV head; 16 is
        # the smallest tensor-core M. The kernel is bandwidth bound, and what keeps enough bytes in
        # flight depends on how many programs share an SM. Few (small, split batches): 128-position
        # tiles three stages deep. Many (serving batches): two stages, so that more programs fit
        # an SM's shared memory, and at head_dim 128 also 64-position tiles (64 KB, three programs
        # per SM, against one at 128 x 3). The choice follows the H200 sweep
        # (``kernels_bench --only decode_sweep``; BENCHMARKS.md, kernels); at small split batches
        # the deep tiles stay the best.
        block_m = max(16, gpad)
        if programs_per_sm >= _MANY_PROGRAMS_PER_SM and d_pad <= 128:
            return AttentionConfig(block_m, tile_n=64 if d_pad == 128 else 128, num_warps=4, num_stages=2)
        tile_n = 128 if d_pad <= 128 else 64  # keeps 3 stages of K and V within shared memory
        return AttentionConfig(block_m=block_m, tile_n=tile_n, num_warps=4, num_stages=3)
    rows_per_seq = num_tokens * group // max(num_seqs, 1)
    if rows_per_seq < 128:
        # Mixed batch of decodes and short chunks: smaller q-blocks waste less on the decode rows.
        return AttentionConfig(block_m=max(64, gpad), tile_n=64, num_warps=4, num_stages=3)
    # Prefill: FA2-style 128 x 64 tiles (best of a sweep on an H100 for head_dim 64 and 128).
    if d_pad <= 128:
        return AttentionConfig(block_m=max(128, gpad), tile_n=64, num_warps=8, num_stages=2)
    return AttentionConfig(block_m=max(64, gpad), tile_n=32, num_warps=8, num_stages=2)


def paged_attention_launch(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor | None,
    config: AttentionConfig,
    num_splits: int,
    min_split_tokens: int = MIN_SPLIT_TOKENS,
) -> torch.Tensor:
    """paged_attention with explicit tiles and split factor (tests and benchmarks pin both)."""
    num_tokens, num_heads, head_dim = query.shape
    _, page_size, num_kv_heads, cache_head_dim = k_cache.shape
    assert cache_head_dim == head_dim and num_heads % num_kv_heads == 0, "bad head shapes"
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0 or num_seqs == 0:
        return out

    block_m = max(config.block_m, triton.next_power_of_2(group))
    block_q = block_m // group
    d_pad = max(16, triton.next_power_of_2(head_dim))
    tile_n = max(16, config.tile_n)
    min_split_tiles = max(1, min_split_tokens // tile_n)
    grid_q = num_tokens // block_q + num_seqs
    # The interpreter has no tf32; on the GPU fp32 inputs would otherwise silently use tf32.
    precision = "ieee" if query.dtype == torch.float32 else "tf32"

    if num_splits > 1:
        part_acc = torch.empty(
            (num_tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device
        )
        part_m = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
        grid: tuple[int, ...] = (grid_q, num_kv_heads, num_splits)
    else:
        part_acc = part_m = part_l = out  # never touched: NUM_SPLITS == 1 compiles the stores out
        grid = (grid_q, num_kv_heads)

    launch(_paged_attention_kernel, grid,
        query, k_cache, v_cache, out, part_acc, part_m, part_l,
        block_tables, seq_lens, query_start_loc,
        scale * _LOG2E, num_seqs, num_heads,
        query.stride(0), query.stride(1), query.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, D_PAD=d_pad, PAGE_SIZE=page_size,
        BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n,
        NUM_SPLITS=num_splits, MIN_SPLIT_TILES=min_split_tiles, DOT_PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        s_pad = max(2, triton.next_power_of_2(num_splits))
        launch(_split_reduce_kernel, (num_tokens, num_heads),
            out, part_acc, part_m, part_l, seq_lens, query_start_loc,
            num_seqs, num_heads,
            out.stride(0), out.stride(1), out.stride(2),
            HEAD_DIM=head_dim, D_PAD=d_pad, TILE_N=tile_n,
            NUM_SPLITS=num_splits, S_PAD=s_pad, MIN_SPLIT_TILES=min_split_tiles,
            num_warps=4 if s_pad * d_pad >= 2048 else 2,
        )  # fmt: skip
    return out


def paged_attention(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [S, max_blocks]
    seq_lens: torch.Tensor,  # int32 [S]
    query_start_loc: torch.Tensor,  # int32 [S + 1]
    scale: float,
    out: torch.Tensor | None = None,  # [T, Hq, D]
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    sms = num_sms(query.device)
    splits = choose_num_splits(num_tokens, num_seqs, num_kv_heads, sms)
    programs_per_sm = num_seqs * num_kv_heads * splits / sms
    config = choose_config(num_tokens, num_seqs, num_heads // num_kv_heads, head_dim, programs_per_sm)
    return paged_attention_launch(
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, config, splits
    )
