"""Steps that are not plain decodes (prefill chunks, mixed prefill + decode) as CUDA graphs with
the attention left out.

An eager step of an 8B model launches some 330 kernels from Python: ~30 ms of host time on an
H200 host against ~10 ms of GPU work for a 64-decode + 256-token-prefill step, so every step that
carried a new prompt (and with it a streamed request's first token) ran at the host's pace. Here
the forward pass is cut at each layer's attention (``model.forward_piece``): the num_layers + 1
pieces are captured per padded token count, and only the attention, whose work depends on every
sequence's length, runs eagerly between them: two launches per layer instead of ten.

State crosses the cuts in buffers owned here, shared by every captured size (steps never overlap):
the residual stream, the q/k/v projections and the attention output. Padding tokens (past the
step's ``n`` real ones) have slot -1, so they write no KV; attention runs on the ``n`` real tokens
only, and what the padding rows compute is never read.
"""

from __future__ import annotations

import bisect

import torch

from workers.models.llama import AttentionMetadata

# Token counts with a captured graph; a step runs in the smallest that holds it. Past 128 they step
# by 128, the row tile of the large GEMMs, so padding a step up to its graph adds no GEMM tile (a
# first cut that stepped by 256 past 512 added up to 14% to the GPU-bound mixed steps). Beyond the
# largest size a step is GPU-bound anyway (its GPU time exceeds the eager launch time), so it runs
# eagerly.
PIECEWISE_SIZES = (16, 32, 64, 128, *range(256, 2049, 128))


def piecewise_sizes(max_num_batched_tokens: int) -> list[int]:
    sizes = [s for s in PIECEWISE_SIZES if s <= max_num_batched_tokens]
    return sizes or [PIECEWISE_SIZES[0]]


class PiecewiseGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], sizes: list[int]) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = sizes
        n = sizes[-1]
        param = next(model.parameters())
        dev, dtype = param.device, param.dtype
        attn = model.layers[0].self_attn
        self.num_layers = len(model.layers)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.residual = torch.zeros(n, model.args.hidden_size, dtype=dtype, device=dev)
        self.qkv = torch.zeros(n, attn.qkv_proj.out_per_rank, dtype=dtype, device=dev)
        self.attn_out = torch.zeros(n, attn.num_heads * attn.head_dim, dtype=dtype, device=dev)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.hidden: dict[int, torch.Tensor] = {}  # the last piece's output, per size
        self.replays = 0  # steps run from these graphs (checked by the GPU tests)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for size in reversed(sizes):  # largest first: smaller graphs reuse its pool memory
                pieces = []
                for index in range(self.num_layers + 1):
                    self._piece(index, size)  # warm-up outside the capture (cuBLAS picks its kernels)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        hidden = self._piece(index, size)
                    pieces.append(graph)
                self.graphs[size] = pieces
                self.hidden[size] = hidden
        torch.cuda.current_stream(dev).wait_stream(stream)
        torch.cuda.synchronize(dev)

    def _piece(self, index: int, size: int) -> torch.Tensor | None:
        return self.model.forward_piece(
            index,
            self.input_ids[:size],
            self.positions[:size],
            self.kv_caches,
            self.slot_mapping[:size],
            self.residual[:size],
            self.qkv[:size],
            self.attn_out[:size],
        )

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.sizes[-1]

    def size_for(self, num_tokens: int) -> int:
        return self.sizes[bisect.bisect_left(self.sizes, num_tokens)]

    def run(
        self,
        input_ids: torch.Tensor,  # [size], padded
        positions: torch.Tensor,  # [size], padded
        slot_mapping: torch.Tensor,  # [size], -1 past n
        meta: AttentionMetadata,  # of the n real tokens
        n: int,
    ) -> torch.Tensor:
        """The final hidden states [n, hidden] of the step's n real tokens."""
        size = len(positions)
        self.input_ids[:size].copy_(input_ids)
        self.positions[:size].copy_(positions)
        self.slot_mapping[:size].copy_(slot_mapping)
        graphs = self.graphs[size]
        qkv, attn_out = self.qkv[:n], self.attn_out[:n]
        for index in range(self.num_layers):
            graphs[index].replay()
            self.model.attend_piece(index, qkv, self.kv_caches, meta, attn_out)
        graphs[-1].replay()
        self.replays += 1
        return self.hidden[size][:n]
