"""The persistent batch: per-request rows of preallocated numpy arrays on the worker.

A request keeps its row from admission to finish; each step only applies the SchedulerOutput
diff (new rows, appended block ids, dropped rows) and gathers the scheduled rows. Token ids live
here too: the worker appends what it samples, so the scheduler never ships token ids back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ipc.messages import NewRequestData
from ipc.sampling_params import SamplingParams


@dataclass(slots=True)
class RequestState:
    req_id: str
    row: int
    sampling_params: SamplingParams
    num_prompt_tokens: int
    eos_token_id: int | None


class InputBatch:
    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int) -> None:
        self.max_model_len = max_model_len
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed = np.zeros(max_num_reqs, dtype=np.int64)
        # Sampled tokens launched but not yet on the host (async scheduling): 0 or 1.
        self.num_pending = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.states: dict[str, RequestState] = {}
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.states)

    def add(self, new: NewRequestData) -> RequestState:
        if new.req_id in self.states:
            self.remove(new.req_id)
        if not self._free_rows:
            raise RuntimeError("the persistent batch is full (more requests than max_num_seqs)")
        row = self._free_rows.pop()
        tokens = new.prompt_token_ids + new.output_token_ids
        self.token_ids[row, : len(tokens)] = tokens
        self.num_tokens[row] = len(tokens)
        self.num_pending[row] = 0
        self.num_computed[row] = new.num_computed_tokens
        self.block_table[row, : len(new.block_ids)] = new.block_ids
        self.num_blocks[row] = len(new.block_ids)
        state = RequestState(
            new.req_id, row, new.sampling_params, len(new.prompt_token_ids), new.eos_token_id
        )
        self.states[new.req_id] = state
        return state

    def remove(self, req_id: str) -> None:
        state = self.states.pop(req_id, None)
        if state is not None:
            self._free_rows.append(state.row)

    def append_blocks(self, req_id: str, block_ids: list[int], num_computed: int) -> None:
        row = self.states[req_id].row
        n = int(self.num_blocks[row])
        self.block_table[row, n : n + len(block_ids)] = block_ids
        self.num_blocks[row] = n + len(block_ids)
        self.num_computed[row] = num_computed

    def append_token(self, row: int, token_id: int) -> None:
        n = int(self.num_tokens[row])
        if n < self.max_model_len:
            self.token_ids[row, n] = token_id
            self.num_tokens[row] = n + 1

    def output_token_ids(self, state: RequestState) -> np.ndarray:
        return self.token_ids[state.row, state.num_prompt_tokens : self.num_tokens[state.row]]

    def prompt_token_ids(self, state: RequestState) -> np.ndarray:
        return self.token_ids[state.row, : state.num_prompt_tokens]
