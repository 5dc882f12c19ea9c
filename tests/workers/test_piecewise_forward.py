"""The piecewise graphs' forward pass, cut at attention by workers/cuda_graphs.py from the layers the
model exposes, equals the model's whole forward pass: same hidden states for the real tokens, same
KV-cache contents, whatever the padding tokens (slot -1) carry. The pieces run through the graph
code on the CPU, each "replay" re-running the captured piece (tests/workers/eager_graphs.py)."""

from __future__ import annotations

import pytest
import torch

from tests.workers.eager_graphs import EagerCapture
from workers.attention import AttentionMetadata
from workers.cuda_graphs import PiecewiseGraphs, piecewise_sizes
from workers.models.llama import LlamaForCausalLM, dummy_checkpoint

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


def _step_inputs() -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A mixed step: a 5-token prefill chunk after 3 cached tokens (blocks 0-1) and a one-token
    decode after 6 cached tokens (blocks 2-3)."""
    input_ids = torch.tensor([11, 12, 13, 14, 15, 42])
    positions = torch.tensor([3, 4, 5, 6, 7, 6])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([3, 4, 5, 6, 7, 2 * BLOCK + 6]),
        block_tables=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        seq_lens=torch.tensor([8, 7], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 5, 6], dtype=torch.int32),
        max_query_len=5,
        max_seq_len=8,
    )
    return input_ids, positions, meta


@pytest.mark.parametrize("padding", [0, 3])
def test_pieces_equal_the_whole_forward(padding: int) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG)
    model.load_weights(dummy_checkpoint(CONFIG, seed=0))
    model.eval()
    args = model.args
    cache_shape = (2, 4, BLOCK, args.num_kv_heads, args.head_dim)
    context = torch.randn(args.num_layers, *cache_shape)  # the tokens cached by earlier steps
    input_ids, positions, meta = _step_inputs()
    n = len(input_ids)

    whole_caches = [c.clone() for c in context]
    with torch.inference_mode():
        expected = model(input_ids, positions, whole_caches, meta)

    size = n + padding
    piece_caches = [c.clone() for c in context]
    capture = EagerCapture()
    pieces = PiecewiseGraphs(model, piece_caches, [size], torch.device("cpu"), torch.float32, capture)
    assert capture.captured == args.num_layers + 1
    for got, want in zip(piece_caches, context):
        torch.testing.assert_close(got, want)  # capturing wrote no KV
    for buffer in (pieces.residual, pieces.attn_in, pieces.attn_out):
        buffer.fill_(float("nan"))  # no piece may read state left from an earlier step

    pad = lambda t, fill: torch.cat([t, torch.full((padding,), fill, dtype=t.dtype)])  # noqa: E731
    padded_meta = AttentionMetadata(
        slot_mapping=pad(meta.slot_mapping, -1),
        block_tables=meta.block_tables,
        seq_lens=meta.seq_lens,
        query_start_loc=meta.query_start_loc,
        max_query_len=meta.max_query_len,
        max_seq_len=meta.max_seq_len,
    )
    with torch.inference_mode():
        hidden = pieces.run(pad(input_ids, 0), pad(positions, 0), padded_meta, n)
    assert pieces.replays == 1
    assert hidden.shape == (n, args.hidden_size)
    torch.testing.assert_close(hidden, expected)
    for got, want in zip(piece_caches, whole_caches):
        torch.testing.assert_close(got, want)  # padding tokens wrote nothing


def test_unequal_attention_widths_are_refused() -> None:
    model = LlamaForCausalLM(CONFIG)
    model.layers[1].attention_input_width += 1
    with pytest.raises(ValueError, match="equal attention widths"):
        PiecewiseGraphs(model, [], [16], torch.device("cpu"), torch.float32, EagerCapture())


def test_piecewise_sizes_follow_the_gemm_tile_and_the_token_budget() -> None:
    sizes = piecewise_sizes(16384)
    assert sizes == sorted(set(sizes)) and sizes[-1] == 2048
    assert all(s % 128 == 0 for s in sizes if s >= 128)  # padding never adds a 128-row GEMM tile
    assert piecewise_sizes(512)[-1] == 512 and piecewise_sizes(600)[-1] == 512
    assert piecewise_sizes(8) == [16]  # a budget below the smallest size still gets one graph
