"""ModelRunner: turns a SchedulerOutput into one forward pass and one sampling call.

Inputs are built with numpy from the persistent batch and copied to the device once; the only
device-to-host transfer of the step is the sampled token ids (plus logprobs when asked).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ipc.messages import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from workers.input_batch import InputBatch, RequestState
from workers.models.llama import AttentionMetadata
from workers.sampler import SamplingMetadata, sample

logger = logging.getLogger(__name__)


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
        self.kv_caches: list[torch.Tensor] = []

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

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
    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self.update_states(so)
        if so.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        batch = self.batch
        req_ids = list(so.num_scheduled_tokens)
        states = [batch.states[r] for r in req_ids]
        rows = np.fromiter((s.row for s in states), dtype=np.int64, count=len(states))
        num_sched = np.fromiter(so.num_scheduled_tokens.values(), dtype=np.int64, count=len(states))
        computed = batch.num_computed[rows]
        query_start = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(num_sched, out=query_start[1:])
        total = int(query_start[-1])
        token_req = np.repeat(np.arange(len(rows)), num_sched)
        positions = computed[token_req] + (np.arange(total) - query_start[token_req])
        token_rows = rows[token_req]
        input_ids = batch.token_ids[token_rows, positions]
        seq_lens = computed + num_sched
        bs = self.block_size
        slot_mapping = batch.block_table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        max_blocks = -(-int(seq_lens.max()) // bs)
        block_tables = np.ascontiguousarray(batch.block_table[rows, :max_blocks])
        # A request samples when this step reaches the end of its known tokens.
        samples = seq_lens >= batch.num_tokens[rows]
        batch.num_computed[rows] = seq_lens

        meta = AttentionMetadata(
            slot_mapping=self._to_device(slot_mapping),
            block_tables=self._to_device(block_tables),
            seq_lens=self._to_device(seq_lens.astype(np.int32)),
            query_start_loc=self._to_device(query_start.astype(np.int32)),
            max_query_len=int(num_sched.max()),
            max_seq_len=int(seq_lens.max()),
        )
        hidden = self.model(self._to_device(input_ids), self._to_device(positions), self.kv_caches, meta)
        if not samples.any():
            return EMPTY_MODEL_RUNNER_OUTPUT
        sample_idx = np.nonzero(samples)[0]
        logits = self.model.compute_logits(hidden[self._to_device(query_start[1:][sample_idx] - 1)])
        sample_states = [states[i] for i in sample_idx]
        out = sample(logits, self._sampling_metadata(sample_states))

        token_ids = out.token_ids.tolist()  # the step's one device->host sync
        for state, token_id in zip(sample_states, token_ids):
            batch.append_token(state.row, token_id)
        result = ModelRunnerOutput(req_ids=[s.req_id for s in sample_states], sampled_token_ids=token_ids)
        if out.logprobs is not None:
            lp_ids, lps, ranks = (
                out.logprob_token_ids.tolist(),
                out.logprobs.tolist(),
                out.sampled_ranks.tolist(),
            )
            for i, state in enumerate(sample_states):
                k = state.sampling_params.logprobs
                if k is not None:
                    result.logprobs[state.req_id] = TokenLogprobs(
                        token_ids=lp_ids[i][: k + 1], logprobs=lps[i][: k + 1], sampled_rank=ranks[i]
                    )
        return result

    # ------------------------------------------------------------------ sampling inputs
    def _sampling_metadata(self, states: list[RequestState]) -> SamplingMetadata:
        batch = self.batch
        params = [s.sampling_params for s in states]
        dev = self.device
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
        md = SamplingMetadata(temperature=temperature, all_greedy=all(p.is_greedy for p in params))
        if any(p.top_k > 0 for p in params):
            md.top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=dev)
        if any(p.top_p < 1.0 for p in params):
            md.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
        if any(p.min_p > 0.0 for p in params):
            md.min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)
        num_outputs = [int(batch.num_tokens[s.row]) - s.num_prompt_tokens for s in states]
        md.seeded_rows = [
            (i, p.seed, num_outputs[i])
            for i, p in enumerate(params)
            if p.seed is not None and not p.is_greedy
        ]
        if any(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 for p in params):
            self._penalty_inputs(md, states)
        rows, tokens, values = [], [], []
        for i, (state, p) in enumerate(zip(states, params)):
            if p.logit_bias:
                for token_id, bias in p.logit_bias.items():
                    rows.append(i), tokens.append(token_id), values.append(bias)
            if num_outputs[i] < p.min_tokens:
                blocked = list(p.stop_token_ids)
                if state.eos_token_id is not None and not p.ignore_eos:
                    blocked.append(state.eos_token_id)
                for token_id in blocked:
                    rows.append(i), tokens.append(token_id), values.append(float("-inf"))
        if rows:
            md.bias_rows = torch.tensor(rows, dtype=torch.int64, device=dev)
            md.bias_tokens = torch.tensor(tokens, dtype=torch.int64, device=dev)
            md.bias_values = torch.tensor(values, dtype=torch.float32, device=dev)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        md.max_num_logprobs = max(wanted) if wanted else None
        return md

    def _penalty_inputs(self, md: SamplingMetadata, states: list[RequestState]) -> None:
        params = [s.sampling_params for s in states]
        dev = self.device
        md.presence_penalty = torch.tensor([p.presence_penalty for p in params], device=dev)
        md.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], device=dev)
        md.repetition_penalty = torch.tensor([p.repetition_penalty for p in params], device=dev)
        prompts = [self.batch.prompt_token_ids(s) for s in states]
        # The token being sampled now is not yet in the batch; outputs are everything after the prompt.
        outputs = [self.batch.output_token_ids(s) for s in states]
        md.prompt_token_ids = self._to_device(_pad(prompts, self.vocab_size))
        md.output_token_ids = self._to_device(_pad(outputs, self.vocab_size))


def _pad(seqs: list[np.ndarray], fill: int) -> np.ndarray:
    out = np.full((len(seqs), max(1, max(len(s) for s in seqs))), fill, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out
