"""The forward pass cut at attention (what the piecewise CUDA graphs replay) equals the whole
forward pass: same hidden states for the real tokens, same KV-cache contents, whatever the padding
tokens (slot -1) carry."""

from __future__ import annotations

import pytest
import torch

from workers.models.llama import AttentionMetadata, LlamaForCausalLM, dummy_checkpoint
from workers.piecewise_graphs import piecewise_sizes

CONFIG = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
BLOCK = 4


def _step_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A mixed step: a 5-token prefill chunk after 3 cached tokens (blocks 0-1) and a one-token
    decode after 6 cached tokens (blocks 2-3)."""
    input_ids = torch.tensor([11, 12, 13, 14, 15, 42])
    positions = torch.tensor([3, 4, 5, 6, 7, 6])
    slots = torch.tensor([3, 4, 5, 6, 7, 2 * BLOCK + 6])
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        seq_lens=torch.tensor([8, 7], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 5, 6], dtype=torch.int32),
        max_query_len=5,
        max_seq_len=8,
    )
    return input_ids, positions, slots, meta


@pytest.mark.parametrize("padding", [0, 3])
def test_pieces_equal_the_whole_forward(padding: int) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    model.load_weights(dummy_checkpoint(CONFIG, seed=0))
    model.eval()
    args = model.args
    cache_shape = (2, 4, BLOCK, args.num_kv_heads, args.head_dim)
    context = torch.randn(args.num_layers, *cache_shape)  # the tokens cached by earlier steps
    input_ids, positions, slots, meta = _step_inputs()
    n = len(input_ids)

    whole_caches = [c.clone() for c in context]
    with torch.inference_mode():
        expected = model(input_ids, positions, whole_caches, meta)

    size = n + padding
    pad = lambda t, fill: torch.cat([t, torch.full((padding,), fill, dtype=t.dtype)])  # noqa: E731
    attn = model.layers[0].self_attn
    residual = torch.full((size, args.hidden_size), float("nan"))  # no piece may read stale state
    qkv = torch.full((size, attn.qkv_proj.out_per_rank), float("nan"))
    attn_out = torch.full((size, attn.num_heads * attn.head_dim), float("nan"))
    piece_caches = [c.clone() for c in context]
    ids, pos, slot = pad(input_ids, 0), pad(positions, 0), pad(slots, -1)
    with torch.inference_mode():
        for index in range(args.num_layers + 1):
            hidden = model.forward_piece(index, ids, pos, piece_caches, slot, residual, qkv, attn_out)
            if index < args.num_layers:
                assert hidden is None
                model.attend_piece(index, qkv[:n], piece_caches, meta, attn_out[:n])
    assert hidden.shape == (size, args.hidden_size)
    torch.testing.assert_close(hidden[:n], expected)
    for got, want in zip(piece_caches, whole_caches):
        torch.testing.assert_close(got, want)  # padding tokens wrote nothing


def test_piecewise_sizes_follow_the_gemm_tile_and_the_token_budget() -> None:
    sizes = piecewise_sizes(16384)
    assert sizes == sorted(set(sizes)) and sizes[-1] == 2048
    assert all(s % 128 == 0 for s in sizes if s >= 128)  # padding never adds a 128-row GEMM tile
    assert piecewise_sizes(512)[-1] == 512 and piecewise_sizes(600)[-1] == 512
    assert piecewise_sizes(8) == [16]  # a budget below the smallest size still gets one graph
