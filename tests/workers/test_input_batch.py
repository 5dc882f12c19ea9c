"""The persistent batch's per-row sampling arrays: what a step gathers instead of reading every
request's SamplingParams."""

from __future__ import annotations

import numpy as np
import pytest

from ipc.messages import NewRequestData
from ipc.sampling_params import SamplingParams
from workers.input_batch import InputBatch
from workers.sampling import seeded_key as _seeded_key


def _add(batch: InputBatch, req_id: str, params: SamplingParams, prompt_len: int = 5) -> int:
    new = NewRequestData(
        req_id=req_id,
        prompt_token_ids=list(range(prompt_len)),
        sampling_params=params,
        block_ids=[0],
        num_computed_tokens=0,
    )
    return batch.add(new).row


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31 + 7, 2**63 - 1, -1, -(2**63)])  # SamplingParams takes int64
def test_noise_seeds_equal_the_samplers_key(seed: int) -> None:
    batch = InputBatch(4, 64, 4)
    row = _add(batch, "a", SamplingParams(temperature=0.7, seed=seed))
    positions = np.array([0, 1, 17, 10**6], dtype=np.int64)
    keys = batch.noise_seeds(np.full(4, row), positions)
    assert keys.tolist() == [_seeded_key(seed, int(p)) for p in positions]
    assert (keys >= 0).all()


def test_rows_carry_their_sampling_parameters() -> None:
    batch = InputBatch(4, 64, 4)
    plain = _add(batch, "plain", SamplingParams(temperature=0.6, seed=3), prompt_len=7)
    greedy = _add(batch, "greedy", SamplingParams(temperature=0.0, seed=5))
    top_p = _add(batch, "top_p", SamplingParams(temperature=1.0, top_p=0.9))
    bias = _add(batch, "bias", SamplingParams(temperature=1.0, logit_bias={3: 1.0}))
    assert batch.temperature[[plain, greedy]].tolist() == pytest.approx([0.6, 0.0])
    assert batch.num_prompt[plain] == 7
    # A greedy request's seed never draws noise.
    assert batch.seeded[plain] and not batch.seeded[greedy] and not batch.seeded[top_p]
    assert batch.truncates[top_p] and not batch.truncates[plain] and not batch.truncates[bias]
    assert batch.special[bias] and not batch.special[plain] and not batch.special[top_p]
    # A row handed to a new request forgets the old one's parameters.
    batch.remove("top_p")
    again = _add(batch, "next", SamplingParams(temperature=0.2, logprobs=2))
    assert again == top_p
    assert not batch.truncates[again] and batch.special[again]
    assert batch.temperature[again] == pytest.approx(0.2)


def test_schedule_gathers_the_steps_tokens() -> None:
    """Positions, input ids, sequence lengths, sampling rows and in-flight tokens, against a
    token-by-token reading of the batch."""
    batch = InputBatch(6, 64, 4)
    # prompt length, tokens computed before the step, tokens scheduled
    cases = {
        "prefill": (9, 0, 9),
        "chunk": (20, 4, 7),  # a chunk that does not reach the end: no sampling
        "decode": (5, 5, 1),  # its input is the token that the previous step is still sampling
        "resumed": (12, 10, 2),
    }
    rows = {}
    for req_id, (prompt_len, computed, _) in cases.items():
        new = NewRequestData(
            req_id=req_id,
            prompt_token_ids=[100 + 7 * len(rows) + i for i in range(prompt_len)],
            sampling_params=SamplingParams(),
            block_ids=[0],
            num_computed_tokens=computed,
        )
        rows[req_id] = batch.add(new).row
    order = ["decode", "prefill", "resumed", "chunk"]  # not the rows' order
    num_sched = np.array([cases[r][2] for r in order])
    step = batch.schedule(np.array([rows[r] for r in order]), num_sched)

    positions, in_flight = [], []
    for req_id in order:
        prompt_len, computed, scheduled = cases[req_id]
        for p in range(computed, computed + scheduled):
            if p >= prompt_len:
                in_flight.append(len(positions))
            else:
                assert step.input_ids[len(positions)] == batch.token_ids[rows[req_id], p]
            assert step.token_rows[len(positions)] == rows[req_id]
            positions.append(p)
    assert step.positions.tolist() == positions
    assert step.in_flight.tolist() == in_flight == [0]
    assert step.query_start.tolist() == [0, *np.cumsum(num_sched).tolist()]
    assert step.seq_lens.tolist() == [cases[r][1] + cases[r][2] for r in order]
    assert step.samples.tolist() == [True, True, True, False]
    assert not step.is_decode and step.num_tokens == len(positions)
    assert [batch.num_computed[rows[r]] for r in order] == step.seq_lens.tolist()

    # The next step decodes two of them: their inputs are both in flight.
    decode = batch.schedule(np.array([rows["prefill"], rows["resumed"]]), np.array([1, 1]))
    assert decode.is_decode and decode.positions.tolist() == [9, 12]
    assert decode.in_flight.tolist() == [0, 1] and decode.samples.all()
