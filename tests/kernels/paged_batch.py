"""Builds paged-attention inputs for kernel tests: a NaN-filled cache, random block tables, varlen queries."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    query: torch.Tensor  # [T, Hq, D], T = num_valid + padding tokens
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32
    seq_lens: torch.Tensor  # int32
    query_start_loc: torch.Tensor  # int32
    num_valid: int  # tokens that belong to a sequence; the rest are padding

    def args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.query,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
        )


def make_paged_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    *,
    device: str | torch.device = "cpu",
    pad_tokens: int = 0,
    share_prefix: bool = False,
    seed: int = 0,
    extra_blocks: int = 3,
    min_block_id: int = 0,
) -> PagedBatch:
    """``seqs`` lists (cached context length, new query tokens) per sequence.

    Physical block ids are a random permutation (holes, no order). With ``share_prefix`` the second
    sequence points at the first one's leading full blocks, as prefix caching does. Every cache slot
    that no sequence covers holds NaN, and block-table columns past a sequence's end point at a
    block that is all NaN: any load the kernel does not mask shows up in the output.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [ctx + q for ctx, q in seqs]
    blocks_needed = [math.ceil(n / page_size) for n in seq_lens]
    max_blocks = max([*blocks_needed, 1]) + 1
    num_blocks = min_block_id + sum(blocks_needed) + extra_blocks + 1
    ids = (torch.randperm(num_blocks - min_block_id, generator=gen) + min_block_id).tolist()
    nan_block = ids.pop()  # never written: stays NaN
    table = torch.full((len(seqs), max_blocks), nan_block, dtype=torch.int32)
    for s, n in enumerate(blocks_needed):
        for b in range(n):
            table[s, b] = ids.pop()
    if share_prefix and len(seqs) >= 2:
        shared = min(seqs[0][0], seqs[1][0]) // page_size
        table[1, :shared] = table[0, :shared]

    cache_shape = (num_blocks, page_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=device)
    for s, n in enumerate(seq_lens):
        pos = torch.arange(n)
        blocks = table[s, pos // page_size].long().to(device)
        offsets = (pos % page_size).to(device)
        k_cache[blocks, offsets] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(device, dtype)
        v_cache[blocks, offsets] = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(device, dtype)

    q_lens = torch.tensor([q for _, q in seqs], dtype=torch.int32)
    query_start_loc = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(q_lens, 0)
    num_valid = int(query_start_loc[-1])
    query = torch.randn(num_valid + pad_tokens, num_heads, head_dim, generator=gen).to(dtype)
    return PagedBatch(
        query=query.to(device),
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=query_start_loc.to(device),
        num_valid=num_valid,
    )
