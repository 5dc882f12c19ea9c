"""ModelRunner: turns a SchedulerOutput into one forward pass and one sampling call.

Inputs are built with numpy from the persistent batch and copied to the device once; the only
device-to-host transfer of the step is the sampled token ids (plus logprobs when asked).
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ipc.messages import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from workers.input_batch import InputBatch, RequestState
from workers.models.llama import AttentionMetadata
from workers.piecewise_graphs import PiecewiseGraphs, piecewise_sizes
from workers.sampling import SamplerOutput, SamplingInputBuilder, profile_sampling_inputs, sample
from workers.staging import HostStaging

logger = logging.getLogger(__name__)

# Triton compiles at start-up run on this many threads at most (each compile is mostly MLIR
# passes and ptxas, which release the GIL).
MAX_COMPILE_THREADS = 8


def compile_threads() -> int:
    """Threads for start-up Triton compiles: the usable CPUs, at most MAX_COMPILE_THREADS."""
    return max(1, min(MAX_COMPILE_THREADS, len(os.sched_getaffinity(0))))


@dataclass(frozen=True, slots=True)
class ModelWarmup:
    """What ModelRunner.warmup did: how many step shapes, on how many compile threads, how long."""

    num_shapes: int
    compile_threads: int
    compile_s: float
    run_s: float


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        block_size: int,
        max_num_seqs: int,
        max_model_len: int,
        vocab_size: int,
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.vocab_size = vocab_size
        max_blocks = -(-max_model_len // block_size)
        self.batch = InputBatch(max_num_seqs, max_model_len, max_blocks)
        self.max_blocks_per_seq = max_blocks
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: CudaGraphs | None = None
        self.pieces: PiecewiseGraphs | None = None
        self._last: PendingStep | None = None  # the most recent step that sampled
        self._staging: HostStaging | None = None  # created on the first CUDA step
        # Unseeded rows' noise seeds come from torch's seed: the same on every TP rank.
        self.sampling_inputs = SamplingInputBuilder(self.batch, vocab_size, torch.initial_seed())

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type == "cpu":
            return tensor
        # Pinned staging (torch's caching host allocator) makes the copy asynchronous: a
        # pageable copy would wait for the GPU queue to drain, a hidden sync every step.
        return tensor.pin_memory().to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ state
    def update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.batch.remove(req_id)
        for new in so.scheduled_new_reqs:
            self.batch.add(new)
        cached = so.scheduled_cached_reqs
        for req_id, block_ids, computed in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens
        ):
            self.batch.append_blocks(req_id, block_ids, computed)

    # ------------------------------------------------------------------ step
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(so).result()

    @torch.inference_mode()
    def execute_model_async(self, so: SchedulerOutput) -> PendingStep:
        """Launch the step and return at once; ``result()`` waits for the sampled tokens.

        Tokens sampled by the previous step may still be on their way to the host: a position
        whose token is not known here yet (``position == num_tokens`` of its row) takes its
        input id from the previous step's sampled-token tensor, on the device.
        """
        self.update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return PendingStep.empty()
        batch = self.batch
        req_ids = list(so.num_scheduled_tokens)
        states = [batch.states[r] for r in req_ids]
        rows = np.fromiter((s.row for s in states), dtype=np.int64, count=len(states))
        num_sched = np.fromiter(so.num_scheduled_tokens.values(), dtype=np.int64, count=len(states))
        computed = batch.num_computed[rows]
        query_start = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(num_sched, out=query_start[1:])
        total = int(query_start[-1])
        is_decode = total == len(rows)
        if is_decode:  # one token per request: no repeat / gather needed
            token_req = np.arange(len(rows))
            positions = computed
        else:
            token_req = np.repeat(np.arange(len(rows)), num_sched)
            positions = computed[token_req] + (np.arange(total) - query_start[token_req])
        token_rows = rows[token_req]
        input_ids = batch.token_ids[token_rows, np.minimum(positions, batch.max_model_len - 1)]
        seq_lens = computed + num_sched
        bs = self.block_size
        slot_mapping = batch.block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        max_blocks = -(-int(seq_lens.max()) // bs)
        block_tables = batch.block_table[rows, :max_blocks]
        # A request samples when this step reaches the end of its tokens (known or in flight).
        samples = seq_lens >= batch.num_tokens[rows]
        batch.num_computed[rows] = seq_lens
        in_flight = np.nonzero(positions >= batch.num_tokens[token_rows])[0]
        in_flight_src = None
        if len(in_flight):
            index_of = self._last.index_of
            in_flight_src = np.fromiter(
                (index_of[req_ids[t]] for t in token_req[in_flight]), dtype=np.int64, count=len(in_flight)
            )
        sample_idx = np.nonzero(samples)[0]
        sample_states = [states[i] for i in sample_idx]
        last = self._last  # its tokens may still be in flight
        in_flight_index = last.index_of if last is not None else None
        sampling = self.sampling_inputs.build(rows[sample_idx], sample_states, in_flight_index)
        # The hidden rows whose logits are needed: each sampling request's last token.
        every_row_samples = is_decode and len(sample_idx) == len(rows)
        logit_rows = None if every_row_samples else query_start[1:][sample_idx] - 1
        use_graph = every_row_samples and self.graphs is not None and self.graphs.fits(total)
        use_pieces = not use_graph and self.pieces is not None and self.pieces.fits(total)
        if use_pieces:  # padded on the host too: the graphs' token inputs are one copy each
            size = self.pieces.size_for(total)
            input_ids, positions, slot_mapping = (
                _pad(input_ids, size, 0),
                _pad(positions, size, 0),
                _pad(slot_mapping, size, -1),
            )
        elif use_graph:
            # Padded to the graph's size on the host, so each static input is filled by one copy.
            size = self.graphs.size_for(total)
            positions, slot_mapping, seq_lens = (
                _pad(positions, size, 0),
                _pad(slot_mapping, size, -1),
                _pad(seq_lens, size, 0),
            )
            query_start = np.minimum(np.arange(size + 1), total)
        arrays = [input_ids, positions, slot_mapping, block_tables, seq_lens.astype(np.int32)]
        arrays += [query_start.astype(np.int32), *sampling.arrays]
        if logit_rows is not None:
            arrays.append(logit_rows)
        if in_flight_src is not None:
            arrays += [in_flight, in_flight_src]
        uploaded = self._upload(*arrays)
        ids_dev, pos_dev, slots_dev, tables_dev, lens_dev, qsl_dev = uploaded[:6]
        md = sampling.metadata(uploaded[6 : 6 + len(sampling.arrays)], last.token_ids_dev if last else None)
        logit_rows_dev = uploaded[6 + len(sampling.arrays)] if logit_rows is not None else None
        if in_flight_src is not None:
            ids_dev[uploaded[-2]] = self._last.token_ids_dev[uploaded[-1]]

        if use_graph:
            logits = self.graphs.run(ids_dev, pos_dev, slots_dev, tables_dev, lens_dev, qsl_dev, total)
        else:
            meta = AttentionMetadata(
                slot_mapping=slots_dev,
                block_tables=tables_dev,
                seq_lens=lens_dev,
                query_start_loc=qsl_dev,
                max_query_len=int(num_sched.max()),
                max_seq_len=int(seq_lens.max()),
            )
            if use_pieces:
                hidden = self.pieces.run(ids_dev, pos_dev, slots_dev, meta, total)
            else:
                hidden = self.model(ids_dev, pos_dev, self.kv_caches, meta)
            if not len(sample_idx):
                return PendingStep.empty()
            logits = self.model.compute_logits(hidden if logit_rows_dev is None else hidden[logit_rows_dev])
        out = sample(logits, md)
        batch.num_pending[rows[sample_idx]] += 1
        step = PendingStep(self, sample_states, out)
        self._last = step
        return step

    def _upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        if self.device.type == "cpu":
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        if self._staging is None:
            self._staging = HostStaging(self.device)
        return self._staging.upload(*arrays)

    # ------------------------------------------------------------------ memory profile
    def warmup(self) -> ModelWarmup:
        """Compile every kernel variant a step can need before serving, all at once: mixed steps
        (decodes with short chunks), a one-sequence prefill, an eager decode, and a decode at
        every captured batch size (each split-KV factor is its own attention variant). Compiling
        on first use, mid-serving, would stall a step for seconds; compiling one variant after
        another made most of a first start on a machine with an empty Triton cache. The eager
        shapes then run once for real, which loads their kernels; graph capture does the same
        for the decode sizes."""
        from kernels.triton.launch import parallel_compile  # CUDA only: the CPU engine never imports Triton

        eager = [(72, 8), (512, 1), (3, 3)]
        shapes = eager + [(n, n) for n in capture_sizes(len(self.batch.num_tokens))]
        threads = compile_threads()
        start = time.perf_counter()
        with parallel_compile(threads):
            for num_tokens, num_seqs in shapes:
                self.profile_run(num_tokens, num_seqs)
        compiled = time.perf_counter()
        for num_tokens, num_seqs in eager:
            self.profile_run(num_tokens, num_seqs)
        torch.cuda.synchronize(self.device)
        return ModelWarmup(len(shapes), threads, compiled - start, time.perf_counter() - compiled)

    @torch.inference_mode()
    def profile_run(self, num_tokens: int, num_seqs: int | None = None) -> None:
        """One forward pass of ``num_tokens`` prompt tokens spread over up to max_num_seqs
        sequences, then sampling for every sequence with top-p on: the activation peak that the
        KV cache must leave room for. KV writes are skipped (slot -1) into a one-block cache."""
        num_seqs = num_seqs or max(1, min(len(self.batch.num_tokens), num_tokens))
        q_lens = np.full(num_seqs, num_tokens // num_seqs, dtype=np.int64)
        q_lens[: num_tokens % num_seqs] += 1
        query_start = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(q_lens, out=query_start[1:])
        positions = np.concatenate([np.arange(n) for n in q_lens])
        width = -(-int(q_lens.max()) // self.block_size)
        m = self.model.args
        heads = self.model.layers[0].self_attn.num_kv_heads
        dummy_cache = torch.zeros(
            (2, 1, self.block_size, heads, m.head_dim),
            dtype=next(self.model.parameters()).dtype,
            device=self.device,
        )
        meta = AttentionMetadata(
            slot_mapping=self._to_device(np.full(num_tokens, -1, dtype=np.int64)),
            block_tables=self._to_device(np.zeros((num_seqs, width), dtype=np.int32)),
            seq_lens=self._to_device(q_lens.astype(np.int32)),
            query_start_loc=self._to_device(query_start.astype(np.int32)),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(q_lens.max()),
        )
        input_ids = self._to_device(np.zeros(num_tokens, dtype=np.int64))
        hidden = self.model(
            input_ids, self._to_device(positions), [dummy_cache] * len(self.model.layers), meta
        )
        logits = self.model.compute_logits(hidden[self._to_device(query_start[1:] - 1)])
        for inputs in profile_sampling_inputs(num_seqs, self.vocab_size):
            sample(logits, inputs.metadata([self._to_device(a) for a in inputs.arrays], None))

    # ------------------------------------------------------------------ CUDA graphs
    def capture_cuda_graphs(self, max_num_batched_tokens: int) -> tuple[list[int], list[int]]:
        """Decode graphs per batch size, then piecewise graphs per token count for the other
        steps; returns both lists of sizes."""
        self.graphs = CudaGraphs(self, capture_sizes(len(self.batch.num_tokens)))
        self.pieces = PiecewiseGraphs(self.model, self.kv_caches, piecewise_sizes(max_num_batched_tokens))
        return self.graphs.sizes, self.pieces.sizes


def _pad(array: np.ndarray, size: int, fill: int) -> np.ndarray:
    """``array`` extended to ``size`` entries with ``fill``."""
    if len(array) == size:
        return array
    out = np.full(size, fill, dtype=array.dtype)
    out[: len(array)] = array
    return out


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes with a captured graph: 1, 2, 4, 8, then every 8 up to 256, every 16
    beyond; a batch runs in the smallest graph that holds it."""
    limit = min(max_num_seqs, 512)
    sizes = [s for s in (1, 2, 4) if s < limit]
    sizes += list(range(8, min(limit, 256) + 1, 8)) + list(range(272, limit + 1, 16))
    if not sizes or sizes[-1] < limit:
        sizes.append(limit)
    return sizes


class CudaGraphs:
    """Decode steps (one token per sequence) replayed from CUDA graphs captured per padded batch
    size. All inputs live in static device buffers filled before each replay; padding sequences
    have no query tokens and padding tokens write to slot -1, so the kernels skip them."""

    def __init__(self, runner: ModelRunner, sizes: list[int]) -> None:
        self.runner = runner
        self.sizes = sizes
        dev = runner.device
        n = sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros((n, runner.max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.zeros(n + 1, dtype=torch.int32, device=dev)
        # Hidden states, not logits, are the graph outputs: one [size, vocab] buffer per captured
        # size would pin ~1 GB of pool memory for a 128k vocabulary.
        self.hidden: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = 0  # how many steps ran from a graph (checked by the GPU tests)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for size in reversed(sizes):  # largest first: smaller graphs reuse its pool memory
                self._set_dummy(size)
                self._forward(size)  # warm-up compiles every kernel variant outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.hidden[size] = self._forward(size)
                self.graphs[size] = graph
        torch.cuda.current_stream(dev).wait_stream(stream)
        torch.cuda.synchronize(dev)

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def _set_dummy(self, size: int) -> None:
        self.seq_lens[:size].fill_(1)
        self.query_start_loc[: size + 1].copy_(torch.arange(size + 1, dtype=torch.int32))
        self.slot_mapping[:size].fill_(-1)

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1,
            max_seq_len=self.runner.max_blocks_per_seq * self.runner.block_size,
        )
        return self.runner.model(self.input_ids[:size], self.positions[:size], self.runner.kv_caches, meta)

    def size_for(self, batch: int) -> int:
        """The smallest captured size that holds ``batch`` sequences."""
        return self.sizes[bisect.bisect_left(self.sizes, batch)]

    def run(
        self,
        input_ids: torch.Tensor,  # [n]
        positions: torch.Tensor,  # [size], padded: the rest is what the padding rows read
        slot_mapping: torch.Tensor,  # [size], -1 past n
        block_tables: torch.Tensor,  # [n, width]
        seq_lens: torch.Tensor,  # [size], 0 past n
        query_start_loc: torch.Tensor,  # [size + 1]
        n: int,
    ) -> torch.Tensor:
        size = len(positions)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:size].copy_(positions)
        self.slot_mapping[:size].copy_(slot_mapping)
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables)
        self.seq_lens[:size].copy_(seq_lens)
        self.query_start_loc[: size + 1].copy_(query_start_loc)
        self.graphs[size].replay()
        self.replays += 1
        return self.runner.model.compute_logits(self.hidden[size][:n])


class PendingStep:
    """A launched step whose sampled tokens are being copied to the host.

    ``result()`` waits for them (the step's one device-to-host sync), appends them to the
    persistent batch and builds the ModelRunnerOutput; it is idempotent.
    """

    def __init__(
        self, runner: ModelRunner | None, states: list[RequestState], out: SamplerOutput | None
    ) -> None:
        self._runner = runner
        self._states = states
        self._result: ModelRunnerOutput | None = None if runner is not None else EMPTY_MODEL_RUNNER_OUTPUT
        self.index_of = {s.req_id: i for i, s in enumerate(states)}
        if out is None:
            return
        self.token_ids_dev = out.token_ids
        self._logprobs = out
        if out.token_ids.is_cuda:
            self._host = torch.empty(out.token_ids.shape, dtype=out.token_ids.dtype, pin_memory=True)
            self._host.copy_(out.token_ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = out.token_ids, None

    @classmethod
    def empty(cls) -> PendingStep:
        return cls(None, [], None)

    @classmethod
    def finished(cls, output: ModelRunnerOutput) -> PendingStep:
        """A step whose output is already known (a worker that runs synchronously)."""
        step = cls(None, [], None)
        step._result = output
        return step

    def done(self) -> bool:
        """Whether ``result()`` would return without waiting for the device."""
        return self._result is not None or self._event is None or self._event.query()

    def result(self) -> ModelRunnerOutput:
        if self._result is not None:
            return self._result
        if self._event is not None:
            self._event.synchronize()
        token_ids = self._host.tolist()
        batch = self._runner.batch
        for state, token_id in zip(self._states, token_ids):
            if batch.states.get(state.req_id) is state:  # not dropped (aborted) meanwhile
                batch.num_pending[state.row] -= 1
                batch.append_token(state.row, token_id)
        result = ModelRunnerOutput(req_ids=[s.req_id for s in self._states], sampled_token_ids=token_ids)
        out = self._logprobs
        if out.logprobs is not None:
            lp_ids, lps, ranks = (
                out.logprob_token_ids.tolist(),
                out.logprobs.tolist(),
                out.sampled_ranks.tolist(),
            )
            for i, state in enumerate(self._states):
                k = state.sampling_params.logprobs
                if k is not None:
                    result.logprobs[state.req_id] = TokenLogprobs(
                        token_ids=lp_ids[i][: k + 1], logprobs=lps[i][: k + 1], sampled_rank=ranks[i]
                    )
        self._result = result
        if self._runner._last is self:
            self._runner._last = None
        self._logprobs = None
        return result
