"""ModelRunner: turns a SchedulerOutput into one forward pass and one sampling call.

A step runs in four phases: the persistent batch takes the SchedulerOutput's diff
(``_update_states``), the step's inputs are built with numpy and copied to the device once
(``_prepare_inputs``), the forward pass runs from a CUDA graph or eagerly (``_forward``), and the
sampler launches (``_sample``). The only device-to-host transfer of the step is the sampled token ids
(plus logprobs when asked), which ``PendingStep.result()`` waits for.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from ipc.messages import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from workers.attention import AttentionMetadata, AttentionMetadataBuilder
from workers.cuda_graphs import (
    CUDAGraphMode,
    DecodeGraphs,
    GraphDispatch,
    PiecewiseGraphs,
    capture_sizes,
    dispatch,
    piecewise_sizes,
)
from workers.input_batch import InputBatch, RequestState, ScheduledTokens
from workers.sampling import (
    SamplerOutput,
    SamplingInputBuilder,
    SamplingMetadata,
    profile_sampling_inputs,
    sample,
)
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


@dataclass(slots=True)
class StepInputs:
    """A step's device inputs, and what its forward pass and sampling need beside them."""

    input_ids: torch.Tensor  # [T], padded to the graph's size for a piecewise graph
    positions: torch.Tensor  # [T], padded to the graph's size for any graph
    attn: AttentionMetadata
    num_tokens: int  # the step's real tokens (the rest is graph padding)
    graph: GraphDispatch
    logit_rows: torch.Tensor | None  # the hidden rows that sample; None: every real row
    sampling: SamplingMetadata
    sample_rows: np.ndarray  # the batch rows that sample
    sample_states: list[RequestState]


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
        self.attn_builder = AttentionMetadataBuilder(block_size, self.batch.block_table)
        self.max_blocks_per_seq = max_blocks
        self.kv_caches: list[torch.Tensor] = []
        self.graphs: DecodeGraphs | None = None
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

    # ------------------------------------------------------------------ step
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.execute_model_async(so).result()

    @torch.inference_mode()
    def execute_model_async(self, so: SchedulerOutput) -> PendingStep:
        """Launch the step and return at once; ``result()`` waits for the sampled tokens."""
        self._update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return PendingStep.empty()
        inputs = self._prepare_inputs(so)
        logits = self._forward(inputs)
        if logits is None:  # no request reached the end of its tokens
            return PendingStep.empty()
        return self._sample(inputs, logits)

    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.batch.remove(req_id)
        for new in so.scheduled_new_reqs:
            self.batch.add(new)
        cached = so.scheduled_cached_reqs
        for req_id, block_ids, computed in zip(
            cached.req_ids, cached.new_block_ids, cached.num_computed_tokens
        ):
            self.batch.append_blocks(req_id, block_ids, computed)

    def _prepare_inputs(self, so: SchedulerOutput) -> StepInputs:
        """The step's inputs, built on the host, padded to the CUDA graph the step runs in (chosen
        here, as the padding is) and uploaded in one copy.

        Tokens sampled by the previous step may still be on their way to the host: a position
        whose token is not known here yet (``position == num_tokens`` of its row) takes its
        input id from the previous step's sampled-token tensor, on the device.
        """
        batch = self.batch
        req_ids = list(so.num_scheduled_tokens)
        states = [batch.states[r] for r in req_ids]
        rows = np.fromiter((s.row for s in states), dtype=np.int64, count=len(states))
        num_sched = np.fromiter(so.num_scheduled_tokens.values(), dtype=np.int64, count=len(states))
        step = batch.schedule(rows, num_sched)
        attn = self.attn_builder.build(
            rows, step.token_rows, step.positions, step.seq_lens, step.query_start, int(num_sched.max())
        )
        in_flight_src = self._in_flight_sources(step, req_ids) if len(step.in_flight) else None
        sample_idx = np.nonzero(step.samples)[0]
        sample_states = [states[i] for i in sample_idx]
        last = self._last  # its tokens may still be in flight
        in_flight_index = last.index_of if last is not None else None
        sampling = self.sampling_inputs.build(rows[sample_idx], sample_states, in_flight_index)
        # The hidden rows whose logits are needed: each sampling request's last token.
        every_row_samples = step.is_decode and len(sample_idx) == len(rows)
        logit_rows = None if every_row_samples else step.query_start[1:][sample_idx] - 1
        graph = dispatch(self.graphs, self.pieces, step.num_tokens, every_row_samples)
        input_ids, positions, attn = graph.pad(step.input_ids, step.positions, attn)
        arrays = {"input_ids": input_ids, "positions": positions, **attn.arrays()}
        arrays.update((f"sampling.{i}", a) for i, a in enumerate(sampling.arrays))
        if logit_rows is not None:
            arrays["logit_rows"] = logit_rows
        if in_flight_src is not None:
            arrays["in_flight"] = step.in_flight
            arrays["in_flight_src"] = in_flight_src
        uploaded = self._upload(arrays)
        md = sampling.metadata(
            [uploaded[f"sampling.{i}"] for i in range(len(sampling.arrays))],
            last.token_ids_dev if last else None,
        )
        input_ids_dev = uploaded["input_ids"]
        if in_flight_src is not None:
            input_ids_dev[uploaded["in_flight"]] = self._last.token_ids_dev[uploaded["in_flight_src"]]
        return StepInputs(
            input_ids=input_ids_dev,
            positions=uploaded["positions"],
            attn=attn.to_device(uploaded),
            num_tokens=step.num_tokens,
            graph=graph,
            logit_rows=uploaded.get("logit_rows"),
            sampling=md,
            sample_rows=rows[sample_idx],
            sample_states=sample_states,
        )

    def _in_flight_sources(self, step: ScheduledTokens, req_ids: list[str]) -> np.ndarray:
        """For each in-flight token, its row in the previous step's sampled-token tensor."""
        index_of = self._last.index_of
        return np.fromiter(
            (index_of[req_ids[t]] for t in step.token_req[step.in_flight]),
            dtype=np.int64,
            count=len(step.in_flight),
        )

    def _forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """The logits of the sampling rows (None when no row samples), from the decode graph, the
        piecewise graphs or the eager model, as ``inputs.graph`` says."""
        mode, n = inputs.graph.mode, inputs.num_tokens
        if mode is CUDAGraphMode.FULL:
            hidden = self.graphs.run(inputs.input_ids, inputs.positions, inputs.attn, n)
        elif mode is CUDAGraphMode.PIECEWISE:
            hidden = self.pieces.run(inputs.input_ids, inputs.positions, inputs.attn, n)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn)
        if not inputs.sample_states:
            return None
        return self.model.compute_logits(hidden if inputs.logit_rows is None else hidden[inputs.logit_rows])

    def _sample(self, inputs: StepInputs, logits: torch.Tensor) -> PendingStep:
        out = sample(logits, inputs.sampling)
        self.batch.num_pending[inputs.sample_rows] += 1
        step = PendingStep(self.batch, inputs.sample_states, out)
        self._last = step
        return step

    def _upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
        if self._staging is None:
            self._staging = HostStaging(self.device)
        return self._staging.upload(arrays)

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
        dtype = next(self.model.parameters()).dtype
        self.graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            capture_sizes(len(self.batch.num_tokens)),
            self.max_blocks_per_seq,
            self.block_size,
            self.device,
        )
        self.pieces = PiecewiseGraphs(
            self.model, self.kv_caches, piecewise_sizes(max_num_batched_tokens), self.device, dtype
        )
        return self.graphs.sizes, self.pieces.sizes


class PendingStep:
    """A launched step whose sampled tokens are being copied to the host.

    ``result()`` waits for them (the step's one device-to-host sync), appends them to the
    persistent batch and builds the ModelRunnerOutput; it is idempotent.
    """

    def __init__(
        self, batch: InputBatch | None, states: list[RequestState], out: SamplerOutput | None
    ) -> None:
        self._batch = batch  # where the sampled tokens go; None for a step without any
        self._states = states
        self._result: ModelRunnerOutput | None = None if batch is not None else EMPTY_MODEL_RUNNER_OUTPUT
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
        batch = self._batch
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
        self._logprobs = None
        return result
