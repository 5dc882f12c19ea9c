"""Triton paged attention against the torch reference (interpreter on CPU, bf16 on GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kernels.reference import paged_attention_ref
from kernels.triton import attention
from kernels.triton.attention import AttentionConfig
from tests.kernels.paged_batch import PagedBatch, make_paged_batch

HEAD_DIM = 64
SCALE = HEAD_DIM**-0.5
SMALL = AttentionConfig(block_m=16, tile_n=16, num_warps=4, num_stages=1)  # many tiles per sequence
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (1.5e-2, 1e-2)}

# One call mixing every kind of sequence: decode over a prefix, chunked prefill over a cached
# prefix, fresh prefill, a padded sequence with nothing to do, and a decode of a 1-token sequence.
MIXED = [(40, 1), (21, 11), (0, 19), (5, 0), (0, 1)]


def check(batch: PagedBatch, out: torch.Tensor) -> None:
    """Every valid output element is written and matches; padding rows are left untouched."""
    expected = paged_attention_ref(*batch.args(), SCALE, out=torch.full_like(out, float("nan")))
    n = batch.num_valid
    assert torch.isfinite(out[:n]).all(), "an output element was not written (or is NaN)"
    atol, rtol = TOL[out.dtype]
    torch.testing.assert_close(out[:n].float(), expected[:n].float(), atol=atol, rtol=rtol)
    assert torch.isnan(out[n:]).all(), "padding tokens must not be written"


def run(batch: PagedBatch, config: AttentionConfig, splits: int, min_split_tokens: int = 16) -> torch.Tensor:
    out = torch.full_like(batch.query, float("nan"))
    result = attention.paged_attention_launch(
        *batch.args(), SCALE, out, config, splits, min_split_tokens=min_split_tokens
    )
    assert result is out
    return out


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_mixed_batch_gqa(group: int, splits: int) -> None:
    # One KV head keeps the interpreter's grid small; the other tests cover several KV heads.
    batch = make_paged_batch(MIXED, group, 1, HEAD_DIM, 16, torch.float32, pad_tokens=2, share_prefix=True)
    check(batch, run(batch, SMALL, splits))


@pytest.mark.parametrize("splits", [1, 4])
def test_mixed_batch_fp16_page32(splits: int) -> None:
    batch = make_paged_batch(
        MIXED, 8, 2, HEAD_DIM, 32, torch.float16, pad_tokens=1, share_prefix=True, seed=1
    )
    check(batch, run(batch, SMALL, splits))


@pytest.mark.parametrize(("page_size", "splits"), [(16, 1), (16, 2), (32, 1)])
def test_prefix_of_every_length_mod_page(page_size: int, splits: int) -> None:
    # Context r + page * (r % 3) for every residue r, queries of 1 and 3 tokens (GQA group 3).
    seqs = [(r + page_size * (r % 3), 1 + 2 * (r % 2)) for r in range(page_size)]
    batch = make_paged_batch(seqs, 3, 1, HEAD_DIM, page_size, torch.float32, seed=page_size)
    check(batch, run(batch, SMALL, splits))


def test_decode_batch_default_path() -> None:
    # Decode-shaped: the public entry picks the decode tiles and, with few programs, splits.
    seqs = [(0, 1), (5, 1), (16, 1), (63, 1), (100, 1)]
    batch = make_paged_batch(seqs, 3, 1, HEAD_DIM, 16, torch.float16, seed=3)
    assert attention.choose_num_splits(5, 5, 1, attention.num_sms(batch.query.device)) > 1
    out = torch.full_like(batch.query, float("nan"))
    attention.paged_attention(*batch.args(), SCALE, out=out)
    check(batch, out)


def test_decode_tiles_split_and_unsplit() -> None:
    seqs = [(130, 1), (7, 1), (64, 1), (0, 1)]
    batch = make_paged_batch(seqs, 4, 2, HEAD_DIM, 16, torch.float32, pad_tokens=1, seed=4)
    for programs_per_sm in (0.5, 8.0):  # the deep and the shallow decode tiles
        config = attention.choose_config(4, 4, 2, HEAD_DIM, programs_per_sm)
        check(batch, run(batch, config, 1))
        check(batch, run(batch, config, 4, min_split_tokens=64))


def test_decode_tiles_follow_the_programs_per_sm() -> None:
    few = attention.choose_config(16, 16, 4, 128, programs_per_sm=1.9)
    many = attention.choose_config(64, 64, 4, 128, programs_per_sm=3.9)
    assert (few.tile_n, few.num_stages) == (128, 3)
    assert (many.tile_n, many.num_stages) == (64, 2)
    assert attention.choose_config(64, 64, 4, 64, programs_per_sm=3.9).num_stages == 2


def test_prefill_default_path() -> None:
    # Public entry with prefill tiles (128-row q-blocks packing 3 query heads per KV head).
    seqs = [(0, 70), (30, 50), (17, 9)]
    batch = make_paged_batch(seqs, 3, 1, HEAD_DIM, 16, torch.float16, seed=5)
    assert attention.choose_config(129, 3, 3, HEAD_DIM).block_m == 128
    check(batch, attention.paged_attention(*batch.args(), SCALE))


def test_choose_num_splits_depends_on_shapes_only() -> None:
    assert attention.choose_num_splits(8, 8, 8, 132) > 1  # small decode batch: split
    assert attention.choose_num_splits(256, 256, 8, 132) == 1  # fills the GPU already
    assert attention.choose_num_splits(9, 8, 8, 132) == 1  # not decode-shaped
    for seqs in range(1, 300):
        splits = attention.choose_num_splits(seqs, seqs, 8, 132)
        assert 1 <= splits <= attention.MAX_SPLITS and splits & (splits - 1) == 0


def test_empty_batch() -> None:
    batch = make_paged_batch([(3, 0)], 2, 1, HEAD_DIM, 16, torch.float32)
    out = attention.paged_attention(*batch.args(), SCALE)
    assert out.shape == (0, 2, HEAD_DIM)


# --------------------------------------------------------------------------------------------- GPU

PRESETS = Path(__file__).resolve().parents[3] / "shared" / "bench" / "presets"


def preset_heads(name: str) -> tuple[int, int, int]:
    path = PRESETS / name / "config.json"
    if path.exists():
        cfg = json.loads(path.read_text())
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim
    return {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}[name]


def _gpu_check(batch: PagedBatch, out: torch.Tensor, scale: float) -> None:
    expected = paged_attention_ref(*batch.args(), scale)
    n = batch.num_valid
    assert torch.isfinite(out[:n]).all()
    torch.testing.assert_close(out[:n].float(), expected[:n].float(), atol=1.5e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("preset", ["llama3-8b", "smollm2-135m"])
def test_gpu_bf16_mixed_and_decode(preset: str, page_size: int) -> None:
    hq, hkv, d = preset_heads(preset)
    scale = d**-0.5
    mixed = [(1000, 1), (517, 300), (0, 257), (33, 0), (0, 1), (2047, 1), (64, 64)]
    batch = make_paged_batch(mixed, hq, hkv, d, page_size, torch.bfloat16, device="cuda", share_prefix=True)
    _gpu_check(batch, attention.paged_attention(*batch.args(), scale), scale)
    for num_seqs in (1, 4, 64):  # small batches split, large ones do not
        seqs = [(1 + (977 * i) % 3000, 1) for i in range(num_seqs)]
        batch = make_paged_batch(seqs, hq, hkv, d, page_size, torch.bfloat16, device="cuda", seed=num_seqs)
        _gpu_check(batch, attention.paged_attention(*batch.args(), scale), scale)
        for splits in (1, 8):
            cfg = attention.choose_config(num_seqs, num_seqs, hq // hkv, d, num_seqs * hkv * splits / 132)
            out = attention.paged_attention_launch(*batch.args(), scale, None, cfg, splits)
            _gpu_check(batch, out, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_block_ids_past_int32_offsets() -> None:
    # 8 KV heads x 128 x 16 = 16K elements per block: block ids above 131072 overflow int32 offsets.
    batch = make_paged_batch(
        [(300, 1), (40, 20)], 32, 8, 128, 16, torch.bfloat16, device="cuda", min_block_id=140_000
    )
    _gpu_check(batch, attention.paged_attention(*batch.args(), 128**-0.5), 128**-0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cuda_graph_replay_follows_new_metadata() -> None:
    # A captured decode step (split path: 4 sequences) replayed after the block tables, lengths and
    # queries changed in place must equal a fresh computation: nothing host-side was frozen.
    hq, hkv, d = preset_heads("llama3-8b")
    scale = d**-0.5
    batch = make_paged_batch(
        [(100, 1), (2000, 1), (5, 1), (700, 1)], hq, hkv, d, 16, torch.bfloat16, device="cuda"
    )
    assert attention.choose_num_splits(4, 4, hkv, attention.num_sms(batch.query.device)) > 1
    out = torch.empty_like(batch.query)
    attention.paged_attention(*batch.args(), scale, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention.paged_attention(*batch.args(), scale, out=out)
    # Rows swapped between sequences, each new length within what its blocks hold.
    batch.block_tables.copy_(batch.block_tables[[1, 0, 3, 2]].clone())
    batch.seq_lens.copy_(torch.tensor([1500, 90, 600, 4], dtype=torch.int32))
    batch.query.copy_(torch.randn_like(batch.query))
    graph.replay()
    _gpu_check(batch, out, scale)
