"""The paged-attention backend as the model sees it: the step's attention metadata, its builder, and
the attention call that reads it.

Where each sequence's queries and KV blocks are is described by ``AttentionMetadata`` (device
tensors). ``AttentionMetadataBuilder`` gathers it on the host from the persistent batch's block
table (``HostAttentionMetadata``, numpy), pads it to a CUDA graph's size where the step runs in one,
and turns the uploaded arrays into the device form. ``DecodeAttentionBuffers`` is the static form a
captured decode graph reads. Padding tokens have slot -1, so they write no KV; padding sequences have
no query tokens and length 0, so attention skips them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels import ops
from workers.input_batch import pad


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [T]: cache slot of each token's K and V, -1 for none
    block_tables: torch.Tensor  # int32 [S, max_blocks]
    seq_lens: torch.Tensor  # int32 [S]: tokens in the cache after this step, queries included
    query_start_loc: torch.Tensor  # int32 [S + 1]: where each sequence's queries start in the step
    max_query_len: int
    max_seq_len: int


def paged_attention(
    query: torch.Tensor,  # [T, H, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,  # [T, H, D]
) -> torch.Tensor:
    """Causal attention of each sequence's queries over its cached keys and values: [T, H, D]."""
    return ops.paged_attention(
        query,
        kv_cache[0],
        kv_cache[1],
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        scale,
        out,
    )


@dataclass(slots=True)
class HostAttentionMetadata:
    """AttentionMetadata on the host, in the dtypes it is uploaded in."""

    slot_mapping: np.ndarray  # int64 [T]
    block_tables: np.ndarray  # int32 [S, max_blocks]
    seq_lens: np.ndarray  # int32 [S]
    query_start_loc: np.ndarray  # int32 [S + 1]
    max_query_len: int
    max_seq_len: int

    def pad_tokens(self, size: int) -> HostAttentionMetadata:
        """Padding tokens up to ``size`` that write no KV; the sequences stay the real ones (a
        piecewise graph runs its pre-attention pieces on ``size`` tokens, attention on the real)."""
        return HostAttentionMetadata(
            pad(self.slot_mapping, size, -1),
            self.block_tables,
            self.seq_lens,
            self.query_start_loc,
            self.max_query_len,
            self.max_seq_len,
        )

    def pad_decode(self, size: int) -> HostAttentionMetadata:
        """A decode batch (one query per sequence) padded to ``size`` sequences with padding
        sequences of no queries and length 0, the shape a decode graph replays; the block table
        keeps its real rows only (the graph's static table holds the rest)."""
        num_tokens = len(self.slot_mapping)
        return HostAttentionMetadata(
            pad(self.slot_mapping, size, -1),
            self.block_tables,
            pad(self.seq_lens, size, 0),
            np.minimum(np.arange(size + 1), num_tokens).astype(np.int32),
            self.max_query_len,
            self.max_seq_len,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to upload, by name (``to_device`` takes them back by the same names)."""
        return {
            "attn.slot_mapping": self.slot_mapping,
            "attn.block_tables": self.block_tables,
            "attn.seq_lens": self.seq_lens,
            "attn.query_start_loc": self.query_start_loc,
        }

    def to_device(self, uploaded: dict[str, torch.Tensor]) -> AttentionMetadata:
        """The device metadata from the uploaded ``arrays()``."""
        return AttentionMetadata(
            slot_mapping=uploaded["attn.slot_mapping"],
            block_tables=uploaded["attn.block_tables"],
            seq_lens=uploaded["attn.seq_lens"],
            query_start_loc=uploaded["attn.query_start_loc"],
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
        )


class AttentionMetadataBuilder:
    """A step's attention metadata from the persistent batch's block table (rows: requests)."""

    def __init__(self, block_size: int, block_table: np.ndarray) -> None:
        self.block_size = block_size
        self.block_table = block_table  # int32 [max_num_reqs, max_blocks_per_req], updated in place

    def build(
        self,
        rows: np.ndarray,  # [S] batch row of each scheduled sequence
        token_rows: np.ndarray,  # [T] batch row of each token
        positions: np.ndarray,  # int64 [T]
        seq_lens: np.ndarray,  # int64 [S]
        query_start: np.ndarray,  # int64 [S + 1]
        max_query_len: int,
    ) -> HostAttentionMetadata:
        bs = self.block_size
        slot_mapping = self.block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        max_seq_len = int(seq_lens.max())
        return HostAttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=self.block_table[rows, : -(-max_seq_len // bs)],
            seq_lens=seq_lens.astype(np.int32),
            query_start_loc=query_start.astype(np.int32),
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
        )


class DecodeAttentionBuffers:
    """The attention metadata of decode graphs: static device buffers for up to ``max_seqs``
    sequences of one query each, refilled before each replay (``copy_from``)."""

    def __init__(self, max_seqs: int, max_blocks_per_seq: int, block_size: int, device: torch.device) -> None:
        self.slot_mapping = torch.full((max_seqs,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros((max_seqs, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(max_seqs + 1, dtype=torch.int32, device=device)
        self.max_seq_len = max_blocks_per_seq * block_size

    def set_dummy(self, size: int) -> None:
        """``size`` one-token sequences that write no KV: the batch a graph is captured on."""
        self.seq_lens[:size].fill_(1)
        self.query_start_loc[: size + 1].copy_(torch.arange(size + 1, dtype=torch.int32))
        self.slot_mapping[:size].fill_(-1)

    def view(self, size: int) -> AttentionMetadata:
        """The metadata of the first ``size`` sequences (what a graph of that size reads)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
        )

    def copy_from(self, meta: AttentionMetadata) -> None:
        """Fill the buffers from a step's metadata padded by ``HostAttentionMetadata.pad_decode``."""
        size = len(meta.seq_lens)
        num_seqs, width = meta.block_tables.shape
        self.slot_mapping[:size].copy_(meta.slot_mapping)
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables)
        self.seq_lens[:size].copy_(meta.seq_lens)
        self.query_start_loc[: size + 1].copy_(meta.query_start_loc)
