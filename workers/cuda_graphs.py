"""CUDA graphs of the forward pass, for any model with the structure of ``workers/models/interface.py``.

Two kinds, and ``dispatch`` picks one per step:

* Decode graphs (``DecodeGraphs``): a uniform decode step (one token per sequence, every sequence
  sampling) replays the whole forward pass from a graph captured per padded batch size.
* Piecewise graphs (``PiecewiseGraphs``): every other step (prefill chunks, mixed prefill and
  decode). Eagerly, such a step launches every kernel of every layer from Python, and on a large
  model the host then sets the pace of every step that carries a new prompt (and with it a
  streamed request's first token). Here the forward pass is cut at each layer's attention: the
  num_layers + 1 pieces around the attentions are captured per padded token count, and only the
  attention, whose work depends on every sequence's length, runs eagerly between them.

A graph's inputs live in static device buffers filled before each replay. Padding tokens (past the
step's real ones) write no KV (slot -1) and padding sequences have no queries, so what the padding
rows compute is never read. Graphs of every size share one memory pool per kind and are captured
largest first, so that the smaller ones reuse its memory.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

import numpy as np
import torch

from workers.attention import AttentionMetadata, DecodeAttentionBuffers, HostAttentionMetadata
from workers.input_batch import pad
from workers.models.interface import CausalLM

T = TypeVar("T")

# Token counts with a piecewise graph; a step runs in the smallest that holds it. Past 128 they step
# by 128, the row tile of the large GEMMs, so padding a step up to its graph adds no GEMM tile.
# Beyond the largest size a step is GPU-bound anyway (its GPU time exceeds the eager launch time),
# so it runs eagerly.
PIECEWISE_SIZES = (16, 32, 64, 128, *range(256, 2049, 128))


def piecewise_sizes(max_num_batched_tokens: int) -> list[int]:
    sizes = [s for s in PIECEWISE_SIZES if s <= max_num_batched_tokens]
    return sizes or [PIECEWISE_SIZES[0]]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes with a captured graph: 1, 2, 4, 8, then every 8 up to 256, every 16
    beyond; a batch runs in the smallest graph that holds it."""
    limit = min(max_num_seqs, 512)
    sizes = [s for s in (1, 2, 4) if s < limit]
    sizes += list(range(8, min(limit, 256) + 1, 8)) + list(range(272, limit + 1, 16))
    if not sizes or sizes[-1] < limit:
        sizes.append(limit)
    return sizes


class CUDAGraphMode(enum.Enum):
    NONE = "none"
    PIECEWISE = "piecewise"
    FULL = "full"


@dataclass(frozen=True, slots=True)
class GraphDispatch:
    """How a step runs: its mode and the number of tokens it runs on (the graph's size)."""

    mode: CUDAGraphMode
    size: int

    def pad(
        self, input_ids: np.ndarray, positions: np.ndarray, attn: HostAttentionMetadata
    ) -> tuple[np.ndarray, np.ndarray, HostAttentionMetadata]:
        """The step's host inputs padded to the graph's size, so that each static input is filled
        by one copy. A decode graph's token ids are copied unpadded: padding rows read whatever
        its buffer holds."""
        if self.mode is CUDAGraphMode.PIECEWISE:
            return pad(input_ids, self.size, 0), pad(positions, self.size, 0), attn.pad_tokens(self.size)
        if self.mode is CUDAGraphMode.FULL:
            return input_ids, pad(positions, self.size, 0), attn.pad_decode(self.size)
        return input_ids, positions, attn


def dispatch(
    decode: DecodeGraphs | None, piecewise: PiecewiseGraphs | None, num_tokens: int, uniform_decode: bool
) -> GraphDispatch:
    """A decode graph for a uniform decode step whose every sequence samples (the graph's output
    is every row's hidden state), else piecewise graphs if the step fits, else eager."""
    if uniform_decode and decode is not None and decode.fits(num_tokens):
        return GraphDispatch(CUDAGraphMode.FULL, decode.size_for(num_tokens))
    if piecewise is not None and piecewise.fits(num_tokens):
        return GraphDispatch(CUDAGraphMode.PIECEWISE, piecewise.size_for(num_tokens))
    return GraphDispatch(CUDAGraphMode.NONE, num_tokens)


class Graph(Protocol):
    def replay(self) -> None: ...


class Capture(Protocol):
    """How graphs are recorded: ``GraphCapture`` on CUDA."""

    def session(self) -> AbstractContextManager[None]: ...

    def capture(self, fn: Callable[[], T]) -> tuple[Graph, T]: ...


class GraphCapture:
    """Records CUDA graphs into one memory pool, on a side stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=device)

    @contextmanager
    def session(self) -> Iterator[None]:
        """Captures run inside: on the side stream, in inference mode. The device is idle after."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        torch.cuda.synchronize(self.device)

    def capture(self, fn: Callable[[], T]) -> tuple[Graph, T]:
        """``fn`` run once outside the capture (kernels compile, cuBLAS picks its algorithms), then
        recorded; returns the graph and what the recorded call returned (pool memory that every
        replay rewrites)."""
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = fn()
        return graph, out


class DecodeGraphs:
    """Uniform decode steps replayed from whole-forward graphs, one per padded batch size."""

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        sizes: list[int],
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
        capture: Capture | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sizes
        n = sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.attn = DecodeAttentionBuffers(n, max_blocks_per_seq, block_size, device)
        # Hidden states, not logits, are the graph outputs: one [size, vocab] buffer per captured
        # size would pin a vocabulary-sized slab of pool memory per size.
        self.hidden: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, Graph] = {}
        self.replays = 0  # how many steps ran from a graph (checked by the GPU tests)
        capture = capture or GraphCapture(device)
        with capture.session():
            for size in reversed(sizes):  # largest first: smaller graphs reuse its pool memory
                self.attn.set_dummy(size)
                self.graphs[size], self.hidden[size] = capture.capture(partial(self._forward, size))

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, self.attn.view(size))

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def size_for(self, batch: int) -> int:
        """The smallest captured size that holds ``batch`` sequences."""
        return self.sizes[bisect.bisect_left(self.sizes, batch)]

    def run(
        self,
        input_ids: torch.Tensor,  # [n]
        positions: torch.Tensor,  # [size], padded
        meta: AttentionMetadata,  # padded to size sequences (HostAttentionMetadata.pad_decode)
        num_tokens: int,
    ) -> torch.Tensor:
        """The final hidden states [n, hidden] of the step's n sequences."""
        size = len(positions)
        self.input_ids[:num_tokens].copy_(input_ids)
        self.positions[:size].copy_(positions)
        self.attn.copy_from(meta)
        self.graphs[size].replay()
        self.replays += 1
        return self.hidden[size][:num_tokens]


class PiecewiseGraphs:
    """Steps replayed from num_layers + 1 graphs per padded token count, the attentions eager.

    Piece ``i`` is (the embedding | layer i-1 after its attention), then (layer i up to its
    attention | the final norm). State crosses the cuts in buffers owned here, shared by every
    captured size (steps never overlap): the residual stream, the attention's input and its output.
    Attention runs on the step's real tokens only.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[torch.Tensor],
        sizes: list[int],
        device: torch.device,
        dtype: torch.dtype,
        capture: Capture | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sizes
        n = sizes[-1]
        widths = {(layer.attention_input_width, layer.attention_output_width) for layer in model.layers}
        if len(widths) != 1:
            raise ValueError(
                f"piecewise CUDA graphs need equal attention widths in every layer, got {widths}"
            )
        ((in_width, out_width),) = widths
        self.num_layers = len(model.layers)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.residual = torch.zeros(n, model.hidden_size, dtype=dtype, device=device)
        self.attn_in = torch.zeros(n, in_width, dtype=dtype, device=device)
        self.attn_out = torch.zeros(n, out_width, dtype=dtype, device=device)
        self.graphs: dict[int, list[Graph]] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # the last piece's output, per size
        self.replays = 0  # steps run from these graphs (checked by the GPU tests)
        capture = capture or GraphCapture(device)
        with capture.session():
            for size in reversed(sizes):  # largest first: smaller graphs reuse its pool memory
                pieces = []
                for index in range(self.num_layers + 1):
                    graph, hidden = capture.capture(partial(self._piece, index, size))
                    pieces.append(graph)
                self.graphs[size] = pieces
                self.hidden[size] = hidden

    def _piece(self, index: int, size: int) -> torch.Tensor | None:
        """Piece ``index`` on the first ``size`` rows; the last piece returns the final hidden states."""
        model, residual = self.model, self.residual[:size]
        if index == 0:
            residual.copy_(model.embed(self.input_ids[:size]))
            x, res = residual, None
        else:
            x, res = model.layers[index - 1].post_attention(self.attn_out[:size], residual)
        if index == self.num_layers:
            return model.final_norm(x, res)
        _, res = model.layers[index].pre_attention(
            self.positions[:size],
            x,
            res,
            self.kv_caches[index],
            self.slot_mapping[:size],
            out=self.attn_in[:size],
        )
        if res.data_ptr() != residual.data_ptr():  # the CUDA norms update in place; others return
            residual.copy_(res)
        return None

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.sizes[-1]

    def size_for(self, num_tokens: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, num_tokens)]

    def run(
        self,
        input_ids: torch.Tensor,  # [size], padded
        positions: torch.Tensor,  # [size], padded
        meta: AttentionMetadata,  # slot_mapping [size], -1 past n; the rest of the n real tokens
        num_tokens: int,
    ) -> torch.Tensor:
        """The final hidden states [n, hidden] of the step's n real tokens."""
        size = len(positions)
        self.input_ids[:size].copy_(input_ids)
        self.positions[:size].copy_(positions)
        self.slot_mapping[:size].copy_(meta.slot_mapping)
        graphs = self.graphs[size]
        attn_in, attn_out = self.attn_in[:num_tokens], self.attn_out[:num_tokens]
        for index, layer in enumerate(self.model.layers):
            graphs[index].replay()
            layer.attention(attn_in, self.kv_caches[index], meta, out=attn_out)
        graphs[-1].replay()
        self.replays += 1
        return self.hidden[size][:num_tokens]
