"""What a decoder-only model exposes, beyond its forward pass, for the code that runs it.

A model is an embedding, a list of decoder layers and a final norm, with an LM head over the
final hidden states. Each layer is cut at its attention into three parts with explicit state
between them (the residual stream, the attention's input and its output), so that a runner can
execute the parts apart (``workers/cuda_graphs.py`` captures everything but the attention). The
eager ``forward`` is the same parts in order.

The residual stream crosses each cut: a part may update the ``residual`` it is given in place and
return it, or return a new tensor; the caller carries the returned one on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from workers.attention import AttentionMetadata


class DecoderLayer(Protocol):
    # Per-token widths, on this rank, of what pre_attention hands to attention and of what
    # attention hands to post_attention.
    attention_input_width: int
    attention_output_width: int

    def pre_attention(
        self,
        positions: torch.Tensor,  # int64 [T]
        x: torch.Tensor,  # [T, hidden]
        residual: torch.Tensor | None,  # None in the first layer: x is the residual
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # int64 [T], -1: write no KV
        out: torch.Tensor | None = None,  # [T, attention_input_width]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything before the attention, this layer's KV-cache write included: (the attention's
        input, written into ``out`` when given, and the residual)."""
        ...

    def attention(
        self,
        attention_input: torch.Tensor,  # [T, attention_input_width]
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor | None = None,  # [T, attention_output_width]
    ) -> torch.Tensor:
        """The attention over the KV cache, whose work depends on every sequence's length."""
        ...

    def post_attention(
        self, attention_output: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything after the attention: (x, residual) for the next layer."""
        ...


class CausalLM(Protocol):
    hidden_size: int
    layers: Sequence[DecoderLayer]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The final hidden states [T, hidden] from the last layer's (x, residual)."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The final hidden states [T, hidden] of the step's tokens."""
        ...
