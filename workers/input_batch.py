"""The persistent batch: per-request rows of preallocated numpy arrays on the worker.

A request keeps its row from admission to finish; each step only applies the SchedulerOutput
diff (new rows, appended block ids, dropped rows) and gathers the scheduled rows (``schedule``).
Token ids live here too: the worker appends what it samples, so the scheduler never ships token
ids back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ipc.messages import NewRequestData
from ipc.sampling_params import SamplingParams


@dataclass(slots=True)
class ScheduledTokens:
    """A step's tokens gathered from the persistent batch (host arrays)."""

    rows: np.ndarray  # [S] batch row of each scheduled request, in scheduling order
    query_start: np.ndarray  # int64 [S + 1]: where each request's tokens start in the step
    token_req: np.ndarray  # [T] index into ``rows`` of each token
    token_rows: np.ndarray  # [T] batch row of each token
    positions: np.ndarray  # int64 [T]
    input_ids: np.ndarray  # int64 [T]; stale where the id is still in flight (see ``in_flight``)
    seq_lens: np.ndarray  # int64 [S]: tokens computed once the step has run
    samples: np.ndarray  # bool [S]: the step reaches the end of the request's tokens
    in_flight: np.ndarray  # indices of the tokens whose id the previous step is still sampling

    @property
    def num_tokens(self) -> int:
        return len(self.positions)

    @property
    def is_decode(self) -> bool:
        """One token per request."""
        return len(self.positions) == len(self.rows)


@dataclass(slots=True)
class RequestState:
    req_id: str
    row: int
    sampling_params: SamplingParams
    num_prompt_tokens: int
    # Masked until min_tokens are out: every EOS id and stop token, with or without ignore_eos
    # (vLLM's all_stop_token_ids).
    min_tokens_blocked: tuple[int, ...]


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
        # Sampling parameters per row, set at admission, so a step gathers them with one index
        # instead of a pass over Python objects per parameter.
        self.num_prompt = np.zeros(max_num_reqs, dtype=np.int64)
        self.temperature = np.zeros(max_num_reqs, dtype=np.float32)
        self.seed = np.zeros(max_num_reqs, dtype=np.uint64)  # seed mod 2^64 (see noise_seeds)
        self.seeded = np.zeros(max_num_reqs, dtype=bool)
        # top-k / top-p / min-p, penalties, logit bias or min_tokens, logprobs: rows that leave the
        # plain temperature path.
        self.truncates = np.zeros(max_num_reqs, dtype=bool)
        self.special = np.zeros(max_num_reqs, dtype=bool)
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
        p = new.sampling_params
        self.num_prompt[row] = len(new.prompt_token_ids)
        self.temperature[row] = p.temperature
        self.seeded[row] = p.seed is not None and not p.is_greedy
        self.seed[row] = (p.seed or 0) % 2**64
        self.truncates[row] = p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0
        self.special[row] = bool(
            p.presence_penalty
            or p.frequency_penalty
            or p.repetition_penalty != 1.0
            or p.logit_bias
            or p.min_tokens
            or p.logprobs is not None
        )
        eos = [new.eos_token_id] if new.eos_token_id is not None else []
        blocked = tuple(dict.fromkeys([*eos, *new.extra_eos_token_ids, *p.stop_token_ids]))
        state = RequestState(new.req_id, row, p, len(new.prompt_token_ids), blocked)
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

    def schedule(self, rows: np.ndarray, num_scheduled: np.ndarray) -> ScheduledTokens:
        """The tokens of the step that runs ``num_scheduled`` tokens of each row, and the rows'
        computed counts advanced past them.

        A request samples when the step reaches the end of its tokens, known or in flight: a
        position at ``num_tokens`` of its row is the token that the previous step is sampling.
        """
        computed = self.num_computed[rows]
        query_start = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(num_scheduled, out=query_start[1:])
        total = int(query_start[-1])
        if total == len(rows):  # one token per request: no repeat / gather needed
            token_req = np.arange(len(rows))
            positions = computed
        else:
            token_req = np.repeat(np.arange(len(rows)), num_scheduled)
            positions = computed[token_req] + (np.arange(total) - query_start[token_req])
        token_rows = rows[token_req]
        input_ids = self.token_ids[token_rows, np.minimum(positions, self.max_model_len - 1)]
        seq_lens = computed + num_scheduled
        samples = seq_lens >= self.num_tokens[rows]
        self.num_computed[rows] = seq_lens
        in_flight = np.nonzero(positions >= self.num_tokens[token_rows])[0]
        return ScheduledTokens(
            rows, query_start, token_req, token_rows, positions, input_ids, seq_lens, samples, in_flight
        )

    def noise_seeds(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Per-row keys of seeded rows at their output positions: ``_seeded_key`` of the sampler,
        (seed * A + position * B + 1) mod 2^63, in wrapping uint64 arithmetic (2^63 divides 2^64)."""
        key = self.seed[rows] * np.uint64(6364136223846793005)
        key += positions.astype(np.uint64) * np.uint64(1442695040888963407) + np.uint64(1)
        return (key & np.uint64(2**63 - 1)).astype(np.int64)

    def output_token_ids(self, state: RequestState) -> np.ndarray:
        return self.token_ids[state.row, state.num_prompt_tokens : self.num_tokens[state.row]]

    def prompt_token_ids(self, state: RequestState) -> np.ndarray:
        return self.token_ids[state.row, : state.num_prompt_tokens]


def pad(array: np.ndarray, size: int, fill: int) -> np.ndarray:
    """``array`` extended to ``size`` entries with ``fill`` (a CUDA graph's padding)."""
    if len(array) == size:
        return array
    out = np.full(size, fill, dtype=array.dtype)
    out[: len(array)] = array
    return out
