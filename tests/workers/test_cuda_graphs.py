"""The runner's CUDA-graph paths on the CPU: decode graphs and piecewise graphs built by
workers/cuda_graphs.py, each "replay" re-running the captured call on the graph's static buffers
(tests/workers/eager_graphs.py). What runs for real is everything around the capture: which path a
step takes, the host-side padding to a graph's size, the copies into the static buffers, in-flight
token ids (async scheduling) and the rows that sample. Greedy tokens must equal HF transformers'."""

from __future__ import annotations

import numpy as np
import torch

from frontend import LLM
from tests.workers.eager_graphs import EagerCapture
from tests.workers.test_model_vs_hf import GREEDY, engine_tokens, hf_greedy, make_model, prompts
from workers.attention import AttentionMetadataBuilder
from workers.cuda_graphs import (
    CUDAGraphMode,
    DecodeGraphs,
    GraphDispatch,
    PiecewiseGraphs,
    capture_sizes,
    dispatch,
    piecewise_sizes,
)

MAX_NUM_SEQS = 8
# Chunked prefill: the prompts' steps (prefill chunks, some beside decodes) fill the token budget
# but the last, which runs padded.
TOKEN_BUDGET = 16


def test_graph_paths_match_hf(tmp_path_factory) -> None:
    path, hf = make_model(tmp_path_factory, "llama-gqa-untied")
    batch = prompts(5, seed=11, lo=3, hi=50)
    expected = [hf_greedy(hf, p, GREEDY.max_tokens) for p in batch]
    llm = LLM(
        model=str(path),
        engine_process=False,
        skip_tokenizer_init=True,
        num_gpu_blocks_override=256,
        block_size=16,
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=TOKEN_BUDGET,
    )
    runner = llm.engine.core.executor.worker.runner
    runner.graphs = DecodeGraphs(
        runner.model,
        runner.kv_caches,
        capture_sizes(MAX_NUM_SEQS),
        runner.max_blocks_per_seq,
        runner.block_size,
        runner.device,
        EagerCapture(),
    )
    runner.pieces = PiecewiseGraphs(
        runner.model,
        runner.kv_caches,
        piecewise_sizes(TOKEN_BUDGET),
        runner.device,
        torch.float32,
        EagerCapture(),
    )
    assert engine_tokens(llm, batch) == expected
    assert runner.graphs.replays > 0 and runner.pieces.replays > 0
    llm.shutdown()


def test_dispatch_and_padding() -> None:
    decode = _Sized([1, 2, 4, 8])
    pieces = _Sized([16, 32])
    assert dispatch(decode, pieces, 3, uniform_decode=True) == GraphDispatch(CUDAGraphMode.FULL, 4)
    assert dispatch(decode, pieces, 3, uniform_decode=False) == GraphDispatch(CUDAGraphMode.PIECEWISE, 16)
    assert dispatch(decode, pieces, 9, uniform_decode=True) == GraphDispatch(CUDAGraphMode.PIECEWISE, 16)
    assert dispatch(decode, pieces, 33, uniform_decode=False) == GraphDispatch(CUDAGraphMode.NONE, 33)
    assert dispatch(None, None, 3, uniform_decode=True) == GraphDispatch(CUDAGraphMode.NONE, 3)

    # Three decodes at positions 5, 0 and 17 (block size 4), padded to a decode graph of 4.
    table = np.array([[7, 3, 0, 0, 0], [2, 0, 0, 0, 0], [1, 4, 6, 8, 9]], dtype=np.int32)
    positions = np.array([5, 0, 17])
    host = AttentionMetadataBuilder(4, table).build(
        np.arange(3), np.arange(3), positions, positions + 1, np.arange(4), 1
    )
    assert host.slot_mapping.tolist() == [3 * 4 + 1, 2 * 4, 9 * 4 + 1]
    assert host.block_tables.tolist() == table[:, :5].tolist()  # the longest sequence's 5 blocks
    ids, pos, full = GraphDispatch(CUDAGraphMode.FULL, 4).pad(np.array([9, 8, 7]), positions, host)
    assert ids.tolist() == [9, 8, 7] and pos.tolist() == [5, 0, 17, 0]
    assert full.slot_mapping.tolist()[3] == -1 and full.seq_lens.tolist() == [6, 1, 18, 0]
    assert full.query_start_loc.tolist() == [0, 1, 2, 3, 3]  # the padding sequence has no query
    ids, pos, tokens = GraphDispatch(CUDAGraphMode.PIECEWISE, 5).pad(np.array([9, 8, 7]), positions, host)
    assert ids.tolist() == [9, 8, 7, 0, 0] and tokens.slot_mapping.tolist()[3:] == [-1, -1]
    assert tokens.seq_lens.tolist() == [6, 1, 18] and tokens.query_start_loc.tolist() == [0, 1, 2, 3]


class _Sized:
    """The sizes part of a graph set, for dispatch."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def fits(self, n: int) -> bool:
        return n <= self.sizes[-1]

    def size_for(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)
