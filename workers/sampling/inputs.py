"""A step's sampling inputs, built on the host from the persistent batch.

``SamplingInputBuilder.build`` gathers what the step's sampling rows need from the batch's
per-row arrays, reading a request's SamplingParams only for rows flagged as needing more than
temperature and seed. The result, ``StepSamplingInputs``, is a list of numpy arrays that rides in
the step's one host-to-device upload with the other step inputs, and ``metadata`` turns the
uploaded tensors into the device-side ``SamplingMetadata``. Nothing here waits for the device.

Penalties need each penalised row's distinct history tokens with their output counts; the builder
keeps them per row and adds, each step, only the tokens new since the last. With async scheduling
the previous step's token may still be on its way to the host: ``metadata`` takes it from the
previous step's sampled-token tensor on the device (as the step's input ids are filled), and the
penalties processor counts it there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ipc.messages import NewRequestData
from ipc.sampling_params import MAX_LOGPROBS, SamplingParams
from workers.input_batch import InputBatch, RequestState
from workers.sampling.processors import LogitBias, MinP, Penalties, TopKTopP, TopP
from workers.sampling.sampler import SamplingMetadata, TokenBitmask

GREEDY_EPS = 1e-5  # temperatures below this are greedy (as vLLM's)


def seeded_key(seed: int, position: int) -> int:
    """The noise seed of a seeded request's token at output ``position`` (``InputBatch.noise_seeds``
    computes the same for many rows at once)."""
    return (seed * 6364136223846793005 + position * 1442695040888963407 + 1) % (1 << 63)


@dataclass(slots=True)
class HostBitmask:
    """A structured-output bitmask for some of the step's sampling rows."""

    positions: np.ndarray  # int64 [R]: indices into the step's sampling rows
    words: np.ndarray  # int32 [R, W], W >= ceil(vocab / 32); bit j of word w allows token 32 w + j


@dataclass(slots=True)
class StepSamplingInputs:
    """A step's sampling inputs on the host: ``arrays`` (named by ``names``) are uploaded with the
    step's other inputs; ``metadata`` takes the uploaded tensors back, in the same order."""

    names: list[str] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    all_greedy: bool = True
    # [start, stop) of the processed rows each truncation processor works on
    top_k_range: tuple[int, int] | None = None
    min_p_range: tuple[int, int] | None = None
    top_p_range: tuple[int, int] | None = None
    max_top_k: int = 0
    top_k_with_top_p: bool = False  # some top-k row also has top-p
    any_repetition: bool = False
    max_num_logprobs: int | None = None

    def add(self, name: str, array: np.ndarray) -> None:
        self.names.append(name)
        self.arrays.append(array)

    def metadata(
        self, uploaded: Sequence[torch.Tensor], prev_sampled: torch.Tensor | None
    ) -> SamplingMetadata:
        """The SamplingMetadata over the uploaded arrays. ``prev_sampled`` is the previous step's
        sampled-token tensor on the device (for penalised rows whose last token is in flight)."""
        t = dict(zip(self.names, uploaded, strict=True))
        md = SamplingMetadata(
            temperature=t["temperature"], all_greedy=self.all_greedy, seeds=t.get("seeds"),
            processed=t.get("processed"), unprocessed=t.get("unprocessed"),
            max_num_logprobs=self.max_num_logprobs, logprob_rows=t.get("logprob_rows"),
        )  # fmt: skip
        if "bitmask" in t:
            md.bitmask = TokenBitmask(rows=t["bitmask_rows"], bitmask=t["bitmask"])
        if "bias_rows" in t:
            md.processors.append(LogitBias(t["bias_rows"], t["bias_tokens"], t["bias_values"]))
        if "penalty_rows" in t:
            params = t["penalty_params"]
            penalties = Penalties(
                rows=t["penalty_rows"],
                presence=params[:, 0],
                frequency=params[:, 1],
                repetition=params[:, 2],
                tokens=t["penalty_tokens"],
                counts=t["penalty_counts"],
                seen=t["penalty_seen"],
                any_repetition=self.any_repetition,
            )
            if "in_flight_rows" in t:
                if prev_sampled is None:
                    raise RuntimeError(
                        "a penalised row's last token is in flight but no previous step was given"
                    )
                rows = t["penalty_rows"]
                penalties.in_flight = torch.full_like(rows, -1)
                penalties.in_flight[t["in_flight_rows"]] = prev_sampled[t["in_flight_src"]]
            md.processors.append(penalties)
        if self.min_p_range is not None:
            params = t["min_p_params"]
            md.processors.append(MinP(*self.min_p_range, min_p=params[:, 0], temperature=params[:, 1]))
        if self.top_k_range is not None:
            params = t["top_k_params"]
            md.processors.append(
                TopKTopP(
                    *self.top_k_range,
                    top_k=t["top_k"],
                    max_top_k=self.max_top_k,
                    temperature=params[:, 1],
                    top_p=params[:, 0] if self.top_k_with_top_p else None,
                )
            )
        if self.top_p_range is not None:
            params = t["top_p_params"]
            md.processors.append(TopP(*self.top_p_range, top_p=params[:, 0], temperature=params[:, 1]))
        return md


# Processed rows are ordered by truncation group so that every truncation processor's rows are one
# contiguous range of the working tensor (a view, no gather): top-k in groups 0-1, min-p in 1-3,
# top-p without top-k in 3-4.
_TOP_K, _TOP_K_MIN_P, _MIN_P, _MIN_P_TOP_P, _TOP_P, _NO_TRUNCATION = range(6)


@dataclass(slots=True)
class _Row:
    """A row that needs processing: its step position, truncation group and parameters."""

    position: int
    group: int
    temperature: float
    min_p: float
    top_k: int
    top_p: float


@dataclass(slots=True)
class _History:
    """A penalised row's distinct history tokens and how often each is an output token: entries
    in first-seen order in arrays that grow by doubling, with a token -> entry index."""

    state: RequestState  # the request the row holds
    length: int  # the row's tokens taken in so far
    index: dict[int, int]
    tokens: np.ndarray  # int64 [capacity]; the first ``size`` are used
    counts: np.ndarray  # fp32 [capacity]
    size: int

    @classmethod
    def of_prompt(cls, state: RequestState, prompt: np.ndarray) -> _History:
        tokens = np.unique(prompt)
        index = dict(zip(tokens.tolist(), range(len(tokens))))
        capacity = max(16, 2 * len(tokens))
        history = cls(
            state,
            state.num_prompt_tokens,
            index,
            np.zeros(capacity, np.int64),
            np.zeros(capacity, np.float32),
            len(tokens),
        )
        history.tokens[: len(tokens)] = tokens
        return history

    def add_outputs(self, new: np.ndarray) -> None:
        for token in new.tolist():
            i = self.index.get(token)
            if i is None:
                if self.size == len(self.tokens):
                    self.tokens = np.concatenate([self.tokens, np.zeros_like(self.tokens)])
                    self.counts = np.concatenate([self.counts, np.zeros_like(self.counts)])
                i = self.index[token] = self.size
                self.tokens[i] = token
                self.size += 1
            self.counts[i] += 1.0


@dataclass(slots=True)
class _General:
    """What the rows that need more than temperature and seed ask for, while it is collected."""

    processed: list[_Row] = field(default_factory=list)
    bias: list[tuple[int, int, float]] = field(default_factory=list)  # (step position, token, value)
    penalties: list[int] = field(default_factory=list)  # step positions
    logprobs: list[int] = field(default_factory=list)  # step positions
    max_num_logprobs: int = 0


class SamplingInputBuilder:
    """Builds each step's StepSamplingInputs from the persistent batch."""

    def __init__(self, batch: InputBatch, vocab_size: int, noise_seed: int) -> None:
        self.batch = batch
        self.vocab_size = vocab_size
        # Noise seeds of unseeded rows: every TP rank seeds this the same, so all draw the same.
        self._noise_rng = np.random.default_rng(noise_seed)
        # Penalised rows' histories, per row (a row's entry is rebuilt when it holds a new request).
        self._histories: dict[int, _History] = {}

    def build(
        self,
        rows: np.ndarray,
        states: Sequence[RequestState],
        in_flight: Mapping[str, int] | None = None,
        bitmask: HostBitmask | None = None,
    ) -> StepSamplingInputs:
        """Inputs for sampling ``rows`` (batch rows, in the order of the step's logits) of the
        requests ``states``. ``in_flight`` maps a request to its index in the previous step's
        sampled tokens, for requests whose last token is not on the host yet."""
        batch = self.batch
        temperature = batch.temperature[rows]
        greedy = temperature < GREEDY_EPS
        inputs = StepSamplingInputs(all_greedy=bool(greedy.all()))
        inputs.add("temperature", temperature)
        if not inputs.all_greedy:
            seeds = self._noise_rng.integers(0, 2**62, size=len(rows), dtype=np.int64)
            seeded = batch.seeded[rows]
            if seeded.any():
                seeds = np.where(seeded, batch.noise_seeds(rows, self._num_outputs(rows)), seeds)
            inputs.add("seeds", seeds)
        if bitmask is not None:
            self._add_bitmask(inputs, bitmask, len(rows))
        candidates = np.flatnonzero(batch.special[rows] | (batch.truncates[rows] & ~greedy))
        if len(candidates):
            general = self._collect(rows, states, candidates, greedy)
            self._add_general(inputs, general, rows, states, in_flight)
        return inputs

    def _num_outputs(self, rows: np.ndarray) -> np.ndarray:
        """Output tokens so far, those in flight included: a seed position or min_tokens must not
        depend on whether the previous step's tokens have reached the host yet."""
        batch = self.batch
        return batch.num_tokens[rows] + batch.num_pending[rows] - batch.num_prompt[rows]

    def _add_bitmask(self, inputs: StepSamplingInputs, bitmask: HostBitmask, num_rows: int) -> None:
        words = -(-self.vocab_size // 32)
        if bitmask.words.ndim != 2 or bitmask.words.shape[1] < words or bitmask.words.dtype != np.int32:
            raise ValueError(
                f"token bitmask must be int32 [rows, >= {words}] for a vocabulary of {self.vocab_size}, "
                f"got {bitmask.words.dtype} {list(bitmask.words.shape)}"
            )
        if (
            len(bitmask.positions) != len(bitmask.words)
            or not (bitmask.positions >= 0).all()
            or not (bitmask.positions < num_rows).all()
        ):
            raise ValueError(
                f"token bitmask positions must be {len(bitmask.words)} rows of the {num_rows} sampled"
            )
        inputs.add("bitmask_rows", bitmask.positions.astype(np.int64))
        inputs.add("bitmask", np.ascontiguousarray(bitmask.words))

    def _collect(
        self, rows: np.ndarray, states: Sequence[RequestState], candidates: np.ndarray, greedy: np.ndarray
    ) -> _General:
        vocab = self.vocab_size
        general = _General()
        num_outputs = self._num_outputs(rows[candidates])
        for i, num_out in zip(candidates.tolist(), num_outputs.tolist()):
            state = states[i]
            p = state.sampling_params
            processed = False
            if p.logprobs is not None:
                general.logprobs.append(i)
                general.max_num_logprobs = max(general.max_num_logprobs, p.logprobs)
            if p.logit_bias:
                general.bias += [(i, token, bias) for token, bias in p.logit_bias.items()]
                processed = True
            if num_out < p.min_tokens:
                blocked = [t for t in state.min_tokens_blocked if t < vocab]
                general.bias += [(i, token, -np.inf) for token in blocked]
                processed = processed or bool(blocked)
            if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
                general.penalties.append(i)
                processed = True
            group = _NO_TRUNCATION
            top_k = p.top_k if p.top_k < vocab else 0  # k >= vocab keeps everything
            if not greedy[i]:
                if top_k:
                    group = _TOP_K_MIN_P if p.min_p > 0.0 else _TOP_K
                elif p.top_p < 1.0:
                    group = _MIN_P_TOP_P if p.min_p > 0.0 else _TOP_P
                elif p.min_p > 0.0:
                    group = _MIN_P
            if processed or group != _NO_TRUNCATION:
                general.processed.append(_Row(i, group, p.temperature, p.min_p, top_k, p.top_p))
        return general

    def _add_general(
        self,
        inputs: StepSamplingInputs,
        general: _General,
        rows: np.ndarray,
        states: Sequence[RequestState],
        in_flight: Mapping[str, int] | None,
    ) -> None:
        if general.logprobs:
            inputs.max_num_logprobs = general.max_num_logprobs
            if len(general.logprobs) < len(rows):
                inputs.add("logprob_rows", np.array(general.logprobs, dtype=np.int64))
        if not general.processed:
            return
        ordered = sorted(general.processed, key=lambda r: r.group)
        slot_of = {r.position: slot for slot, r in enumerate(ordered)}
        processed = np.array([r.position for r in ordered], dtype=np.int64)
        unprocessed = np.ones(len(rows), dtype=bool)
        unprocessed[processed] = False
        inputs.add("processed", processed)
        inputs.add("unprocessed", np.flatnonzero(unprocessed).astype(np.int64))
        if general.bias:
            positions, tokens, values = zip(*general.bias)
            inputs.add("bias_rows", np.array([slot_of[i] for i in positions], dtype=np.int64))
            inputs.add("bias_tokens", np.array(tokens, dtype=np.int64))
            inputs.add("bias_values", np.array(values, dtype=np.float32))
        if general.penalties:
            self._add_penalties(inputs, general, slot_of, rows, states, in_flight)
        groups = np.array([r.group for r in ordered])
        bounds = np.searchsorted(groups, np.arange(_NO_TRUNCATION + 1)).tolist()
        top_k = ordered[bounds[_TOP_K] : bounds[_MIN_P]]
        if top_k:
            inputs.top_k_range = (bounds[_TOP_K], bounds[_MIN_P])
            inputs.max_top_k = max(r.top_k for r in top_k)
            inputs.top_k_with_top_p = any(r.top_p < 1.0 for r in top_k)
            inputs.add("top_k", np.array([r.top_k for r in top_k], dtype=np.int64))
            inputs.add("top_k_params", np.array([(r.top_p, r.temperature) for r in top_k], dtype=np.float32))
        min_p = ordered[bounds[_TOP_K_MIN_P] : bounds[_TOP_P]]
        if min_p:
            inputs.min_p_range = (bounds[_TOP_K_MIN_P], bounds[_TOP_P])
            inputs.add("min_p_params", np.array([(r.min_p, r.temperature) for r in min_p], dtype=np.float32))
        top_p = ordered[bounds[_MIN_P_TOP_P] : bounds[_NO_TRUNCATION]]
        if top_p:
            inputs.top_p_range = (bounds[_MIN_P_TOP_P], bounds[_NO_TRUNCATION])
            inputs.add("top_p_params", np.array([(r.top_p, r.temperature) for r in top_p], dtype=np.float32))

    def _add_penalties(
        self,
        inputs: StepSamplingInputs,
        general: _General,
        slot_of: Mapping[int, int],
        rows: np.ndarray,
        states: Sequence[RequestState],
        in_flight: Mapping[str, int] | None,
    ) -> None:
        """Each penalised row's distinct history tokens with their output counts (the prompt's
        only where the repetition penalty is not 1), packed one row per penalised request."""
        positions = general.penalties
        params = [states[i].sampling_params for i in positions]
        values = np.array(
            [(p.presence_penalty, p.frequency_penalty, p.repetition_penalty) for p in params],
            dtype=np.float32,
        )
        histories = [self._history(states[i], int(rows[i])) for i in positions]
        width = max(1, max(h.size for h in histories))
        tokens = np.zeros((len(positions), width), dtype=np.int64)
        counts = np.zeros((len(positions), width), dtype=np.float32)
        seen = np.zeros((len(positions), width), dtype=bool)
        for j, h in enumerate(histories):
            if h.size:  # unused entries repeat the first; an empty row's stay token 0, unseen
                n = h.size
                tokens[j, :n], tokens[j, n:] = h.tokens[:n], h.tokens[0]
                counts[j, :n], counts[j, n:] = h.counts[:n], h.counts[0]
                seen[j] = True
        inputs.any_repetition = bool((values[:, 2] != 1.0).any())
        inputs.add("penalty_rows", np.array([slot_of[i] for i in positions], dtype=np.int64))
        inputs.add("penalty_params", values)
        inputs.add("penalty_tokens", tokens)
        inputs.add("penalty_counts", counts)
        inputs.add("penalty_seen", seen)
        waiting = np.flatnonzero(self.batch.num_pending[rows[positions]])
        if len(waiting):
            if in_flight is None:
                raise RuntimeError("a penalised row's last token is in flight but no previous step was given")
            src = [in_flight[states[positions[j]].req_id] for j in waiting.tolist()]
            inputs.add("in_flight_rows", waiting.astype(np.int64))
            inputs.add("in_flight_src", np.array(src, dtype=np.int64))

    def _history(self, state: RequestState, row: int) -> _History:
        """The distinct tokens of ``row``'s history with their output counts, brought up to the
        tokens the host knows: kept per row, so a step adds only the tokens new since the last."""
        batch = self.batch
        history = self._histories.get(row)
        if history is None or history.state is not state:
            with_prompt = state.sampling_params.repetition_penalty != 1.0
            prompt = batch.token_ids[row, : state.num_prompt_tokens if with_prompt else 0]
            history = self._histories[row] = _History.of_prompt(state, prompt[prompt < self.vocab_size])
        known = int(batch.num_tokens[row])
        if known > history.length:
            new = batch.token_ids[row, history.length : known]
            history.add_outputs(new[new < self.vocab_size])
            history.length = known
        return history


def profile_sampling_inputs(num_rows: int, vocab_size: int) -> list[StepSamplingInputs]:
    """Sampling inputs for warm-up and memory profiling, over ``num_rows`` rows: every row through
    every processor and the bitmask, with the most logprobs (the sampler's largest footprint: top-p
    without top-k sorts its rows); every row plain (the race over the whole batch); and, from two
    rows, plain rows beside top-k/top-p rows (the race over a subset of rows). Between them they
    launch every sampling kernel variant."""
    worst = SamplingParams(
        temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
        logit_bias={0: 1.0}, logprobs=MAX_LOGPROBS,
    )  # fmt: skip
    plain = SamplingParams(temperature=1.0)
    top_k = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
    cases = [[worst] * num_rows, [plain] * num_rows]
    if num_rows >= 2:
        cases.append([top_k if i % 2 else plain for i in range(num_rows)])
    out = []
    for case in cases:
        batch = InputBatch(num_rows, 2, 1)
        states = [
            batch.add(NewRequestData(str(i), [0], params, block_ids=[0], num_computed_tokens=0))
            for i, params in enumerate(case)
        ]
        rows = np.array([s.row for s in states], dtype=np.int64)
        bitmask = None
        if case[0] is worst:
            words = np.full((num_rows, -(-vocab_size // 32)), -1, dtype=np.int32)  # every token allowed
            bitmask = HostBitmask(np.arange(num_rows, dtype=np.int64), words)
        out.append(SamplingInputBuilder(batch, vocab_size, noise_seed=0).build(rows, states, bitmask=bitmask))
    return out
