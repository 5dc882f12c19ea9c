"""The sampler and its logits processors against independent references: greedy, temperature,
top-k, top-p, min-p and the repetition penalty against HF transformers' warpers; presence /
frequency penalties, logit bias and min_tokens by vLLM's definitions; the structured-output bitmask
bit by bit; seeded rows; logprobs of the raw distribution. Inputs are built as the engine builds
them, from requests in a persistent batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ipc.messages import NewRequestData
from ipc.sampling_params import SamplingParams
from workers.input_batch import InputBatch
from workers.sampling import (
    HostBitmask,
    SamplingInputBuilder,
    SamplingMetadata,
    apply_processors,
    sample,
)
from workers.sampling.processors import LogitBias

VOCAB = 8


def make_batch(
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    eos: int | None = None,
    room: int = 2,
) -> tuple[InputBatch, np.ndarray, list]:
    """A persistent batch holding one request per params, with ``room`` tokens to grow."""
    n = len(params)
    prompts = prompts or [[]] * n
    outputs = outputs or [[]] * n
    width = room + max(len(p) + len(o) for p, o in zip(prompts, outputs))
    batch = InputBatch(n, width, 1)
    states = [
        batch.add(NewRequestData(str(i), prompt, p, [0], 0, output_token_ids=out, eos_token_id=eos))
        for i, (p, prompt, out) in enumerate(zip(params, prompts, outputs))
    ]
    return batch, np.array([s.row for s in states], dtype=np.int64), states


def build_md(
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    vocab: int = VOCAB,
    eos: int | None = None,
    bitmask: HostBitmask | None = None,
) -> SamplingMetadata:
    """The metadata the engine builds for these requests (unseeded rows' noise from torch's RNG)."""
    batch, rows, states = make_batch(params, prompts, outputs, eos)
    builder = SamplingInputBuilder(batch, vocab, noise_seed=int(torch.randint(0, 2**62, ())))
    inputs = builder.build(rows, states, bitmask=bitmask)
    return inputs.metadata([torch.from_numpy(a) for a in inputs.arrays], None)


def counts_of(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double()


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - probs.double()).abs().sum().item()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a zero-probability token was sampled"
    return (((counts - expected) ** 2)[keep] / expected[keep]).sum().item()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


BASE_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
N = 20_000


def draw(logits: torch.Tensor, n: int = N, eos: int | None = None, **kw: object) -> torch.Tensor:
    """n independent samples of one row (the batch is n requests with the same parameters)."""
    md = build_md([SamplingParams(**kw)] * n, vocab=logits.shape[-1], eos=eos)  # type: ignore[arg-type]
    return sample(logits.expand(n, -1).clone(), md).token_ids


# --------------------------------------------------------------------------- greedy / temperature


def test_greedy_is_argmax() -> None:
    logits = torch.randn(16, 100)
    out = sample(logits.clone(), build_md([SamplingParams(temperature=0.0)] * 16, vocab=100))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_ranks is None


def test_greedy_rows_in_a_mixed_batch_are_argmax() -> None:
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=t) for t in [0.0, 1.0, 0.0, 0.8, 1e-6, 2.0]]
    for _ in range(5):
        out = sample(logits.clone(), build_md(params, vocab=50))
        for row in (0, 2, 4):
            assert out.token_ids[row] == logits[row].argmax()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_temperature_sampling_matches_softmax(temperature: float) -> None:
    probs = TemperatureLogitsWarper(temperature)(None, BASE_LOGITS[None].clone())[0].softmax(-1)
    counts = counts_of(draw(BASE_LOGITS, temperature=temperature), VOCAB)
    # chi-square with 7 degrees of freedom: p = 0.001 at 24.3.
    assert chi_square(counts, probs) < 24.3
    assert total_variation(counts, probs) < 0.02
    # The bound can fail: a neighbouring temperature is far outside it.
    other = (BASE_LOGITS / (temperature * 1.3)).softmax(-1)
    assert total_variation(counts, other) > 0.04


# --------------------------------------------------------------------------- top-k / top-p / min-p


def nucleus(probs: torch.Tensor, top_p: float) -> set[int]:
    """Smallest set of most likely tokens whose mass reaches top_p (reference, by loop)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs[i].item()
    return kept


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_only_returns_the_top_k_and_renormalises(k: int) -> None:
    tokens = draw(BASE_LOGITS, top_k=k)
    assert set(tokens.tolist()) == set(range(k)), "exactly the k most likely tokens appear"
    probs = torch.zeros(VOCAB)
    probs[:k] = BASE_LOGITS[:k].softmax(-1)
    assert total_variation(counts_of(tokens, VOCAB), probs) < 0.02


def test_top_k_rows_are_independent() -> None:
    logits = torch.randn(4, 30)
    reps = 300
    params = [SamplingParams(top_k=k) for k in [1, 3, 0, 30]] * reps
    out = sample(logits.repeat(reps, 1), build_md(params, vocab=30))
    seen = [set(out.token_ids[row::4].tolist()) for row in range(4)]
    for row, k in enumerate([1, 3, 30, 30]):
        assert seen[row] <= set(logits[row].topk(k).indices.tolist())
    assert seen[0] == {int(logits[0].argmax())}
    assert len(seen[1]) == 3
    assert len(seen[2]) > 3, "top_k=0 disables top-k"


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.75, 0.9])
def test_top_p_only_returns_the_nucleus(top_p: float) -> None:
    probs = BASE_LOGITS.softmax(-1)
    kept = nucleus(probs, top_p)
    tokens = draw(BASE_LOGITS, top_p=top_p)
    assert set(tokens.tolist()) == kept
    expected = torch.zeros(VOCAB)
    idx = torch.tensor(sorted(kept))
    expected[idx] = probs[idx] / probs[idx].sum()
    assert total_variation(counts_of(tokens, VOCAB), expected) < 0.02


def test_top_k_then_top_p_on_the_renormalised_top_k() -> None:
    # vLLM applies top-k first; top-p then measures mass within the top k.
    k, top_p = 4, 0.8
    top = BASE_LOGITS[:k].softmax(-1)
    kept = nucleus(top, top_p)
    tokens = draw(BASE_LOGITS, top_k=k, top_p=top_p)
    assert set(tokens.tolist()) == kept


def test_top_k_top_p_mask_and_keep_the_best_token() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 3.25, -1.0, 0.0]])
    md = build_md([SamplingParams(top_k=2), SamplingParams(top_p=1e-6)], vocab=4)
    assert md.processed is not None and md.processed.tolist() == [0, 1]
    inf = float("-inf")
    assert apply_processors(logits, md).tolist() == [[inf, 5.0, inf, 2.0], [inf, 3.25, inf, inf]]


@pytest.mark.parametrize(("min_p", "temperature"), [(0.2, 1.0), (0.5, 1.0), (0.2, 0.5)])
def test_min_p_drops_tokens_below_threshold_after_temperature(min_p: float, temperature: float) -> None:
    probs = (BASE_LOGITS / temperature).softmax(-1)
    allowed = {i for i in range(VOCAB) if probs[i] >= min_p * probs.max()}
    tokens = draw(BASE_LOGITS, temperature=temperature, min_p=min_p)
    assert set(tokens.tolist()) == allowed
    expected = torch.zeros(VOCAB)
    idx = torch.tensor(sorted(allowed))
    expected[idx] = probs[idx] / probs[idx].sum()
    assert total_variation(counts_of(tokens, VOCAB), expected) < 0.02


# --------------------------------------------------------------------------- penalties


def reference_penalties(
    logits: torch.Tensor,
    prompts: list[list[int]],
    outputs: list[list[int]],
    presence: list[float],
    frequency: list[float],
    repetition: list[float],
) -> torch.Tensor:
    """vLLM's definitions, one token at a time."""
    out = logits.clone()
    for row in range(out.shape[0]):
        for token in set(prompts[row]) | set(outputs[row]):
            v = out[row, token].item()
            out[row, token] = v / repetition[row] if v > 0 else v * repetition[row]
        for token in set(outputs[row]):
            count = outputs[row].count(token)
            out[row, token] -= frequency[row] * count + presence[row]
    return out


def test_penalties_match_vllm_definitions() -> None:
    vocab = 12
    logits = torch.randn(4, vocab) * 3
    prompts = [[1, 2, 2, 3], [], [5], [0, 11]]
    outputs = [[3, 3, 4], [7, 7, 7, 1], [], [11, 0, 0]]
    presence = [0.5, -1.0, 2.0, 0.0]
    frequency = [0.25, 0.5, -2.0, 1.0]
    repetition = [1.3, 0.8, 2.0, 1.0]
    params = [
        SamplingParams(presence_penalty=p, frequency_penalty=f, repetition_penalty=r)
        for p, f, r in zip(presence, frequency, repetition)
    ]
    got = apply_processors(logits, build_md(params, prompts, outputs, vocab=vocab))
    expected = reference_penalties(logits, prompts, outputs, presence, frequency, repetition)
    torch.testing.assert_close(got, expected)
    # Untouched tokens keep their logits exactly.
    assert torch.equal(got[2, :5], logits[2, :5])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    md = build_md([SamplingParams(repetition_penalty=2.0)], prompts=[[0, 1]], vocab=4)
    assert apply_processors(logits, md).tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_penalties_steer_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    # Token 0 was generated twice: frequency 0.1 * 2 = 0.2 drops it below token 1.
    params = SamplingParams(temperature=0.0, frequency_penalty=0.1)
    assert sample(logits.clone(), build_md([params], outputs=[[0, 0]], vocab=4)).token_ids.tolist() == [1]
    params = SamplingParams(temperature=0.0, frequency_penalty=0.01)
    assert sample(logits.clone(), build_md([params], outputs=[[0, 0]], vocab=4)).token_ids.tolist() == [0]


def test_penalty_history_takes_the_in_flight_token_from_the_device() -> None:
    """With async scheduling a row's last token may still be on the device: the history shipped
    from the host leaves it a slot that the previous step's sampled-token tensor fills, no sync."""
    vocab = 10
    params = [
        SamplingParams(temperature=0.0, frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=1.5),
        SamplingParams(temperature=0.7, seed=1),
        SamplingParams(temperature=0.0, presence_penalty=1.0),  # the prompt does not count
    ]
    prompts, known = [[1, 2], [3], [7]], [[3], [], []]
    batch, rows, states = make_batch(params, prompts, known)
    batch.num_pending[rows] = 1
    builder = SamplingInputBuilder(batch, vocab, noise_seed=0)
    with pytest.raises(RuntimeError, match="in flight"):
        builder.build(rows, states, in_flight=None)
    inputs = builder.build(rows, states, in_flight={"0": 2, "1": 0, "2": 1})
    prev_sampled = torch.tensor([9, 5, 4])  # the previous step's tokens: row 0 got 4, row 2 got 5
    md = inputs.metadata([torch.from_numpy(a) for a in inputs.arrays], prev_sampled)
    logits = torch.randn(3, vocab) * 2
    got = apply_processors(logits, md)
    assert md.processed is not None and md.processed.tolist() == [0, 2]
    expected = reference_penalties(
        logits[[0, 2]],
        [[1, 2], [7]],
        [[3, 4], [5]],
        presence=[0.5, 1.0],
        frequency=[1.0, 0.0],
        repetition=[1.5, 1.0],
    )
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("seed", range(4))
def test_in_flight_tokens_merge_with_the_shipped_history(seed: int) -> None:
    """The in-flight token may repeat an output or a prompt token, be new, or land on an empty
    row (whose filler entries are token 0): every case counts it once."""
    vocab = 16
    gen = torch.Generator().manual_seed(seed)
    rep, pres, freq = [1.4, 1.0, 0.6, 1.2, 1.0], [0.3, 1.0, 0.0, -0.5, 0.7], [0.5, 0.25, 1.0, 0.0, 2.0]
    prompts = [[1, 2, 2], [3], [4, 5], [], []]
    known = [[0, 6, 6], [7], [], [], [0]]
    # An output again, a prompt token, a new token, token 0 on two empty rows (one with a known 0).
    in_flight = [6, 3, 5, 0, 0]
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=r, presence_penalty=p, frequency_penalty=f)
        for r, p, f in zip(rep, pres, freq)
    ]
    batch, rows, states = make_batch(params, prompts, known)
    batch.num_pending[rows] = 1
    order = torch.randperm(5, generator=gen).tolist()  # where each row's token sits in the previous step
    inputs = SamplingInputBuilder(batch, vocab, noise_seed=0).build(
        rows, states, in_flight={str(i): order[i] for i in range(5)}
    )
    prev_sampled = torch.empty(5, dtype=torch.int64)
    prev_sampled[order] = torch.tensor(in_flight)
    md = inputs.metadata([torch.from_numpy(a) for a in inputs.arrays], prev_sampled)
    logits = torch.randn(5, vocab, generator=gen) * 2
    expected = reference_penalties(
        logits, prompts, [[*k, t] for k, t in zip(known, in_flight)], pres, freq, rep
    )
    torch.testing.assert_close(apply_processors(logits, md), expected)


def test_penalty_histories_follow_the_batch_between_steps() -> None:
    """The builder keeps each penalised row's history between steps: after tokens are appended
    (one per step, or several at once) and a row is taken by a new request, its inputs equal a
    fresh builder's."""
    vocab = 20
    params = [
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5),
        SamplingParams(presence_penalty=1.0),
        SamplingParams(frequency_penalty=-1.0, repetition_penalty=0.9),
    ]
    batch, rows, states = make_batch(params, [[1, 2, 3], [4], [5, 5]], [[], [6], [7, 7]], room=10)
    kept = SamplingInputBuilder(batch, vocab, noise_seed=0)
    logits = torch.randn(3, vocab)

    def processed() -> tuple[torch.Tensor, torch.Tensor]:
        both = []
        for builder in (kept, SamplingInputBuilder(batch, vocab, noise_seed=0)):
            inputs = builder.build(rows, states)
            both.append(
                apply_processors(logits, inputs.metadata([torch.from_numpy(a) for a in inputs.arrays], None))
            )
        return both[0], both[1]

    for appended in ([6, 4, 7], [2, 9, 19], [6, 6, 1]):
        for row, token in zip(rows.tolist(), appended):
            batch.append_token(row, token)
        kept_out, fresh = processed()
        assert torch.equal(kept_out, fresh)
    for token in (3, 3, 11):  # several tokens between two steps (a resumed request's outputs)
        batch.append_token(int(rows[0]), token)
    kept_out, fresh = processed()
    assert torch.equal(kept_out, fresh)
    batch.remove("1")  # the row is taken by a new request
    new = batch.add(NewRequestData("new", [8, 8], SamplingParams(repetition_penalty=2.0), [0], 0))
    assert new.row == rows[1]
    states[1] = new
    kept_out, fresh = processed()
    assert torch.equal(kept_out, fresh)
    assert torch.equal(kept_out[1], reference_penalties(logits[1:2], [[8, 8]], [[]], [0.0], [0.0], [2.0])[0])


# --------------------------------------------------------------------------- bias, min_tokens, bitmask


def test_logit_bias_entries_add_up_and_minus_inf_masks() -> None:
    logits = torch.zeros(3, 6)
    logits[:, 0] = 5.0
    logits[0, 3] = -2.0
    logits[1, 1] = 0.5
    bias = LogitBias(
        rows=torch.tensor([0, 1, 1, 2, 2]),
        tokens=torch.tensor([3, 0, 0, 0, 4]),
        values=torch.tensor([6.0, -3.0, -3.0, float("-inf"), 1.0]),
    )
    md = SamplingMetadata(
        temperature=torch.zeros(3),
        all_greedy=True,
        processed=torch.arange(3),
        unprocessed=torch.zeros(0, dtype=torch.int64),
        processors=[bias],
    )
    out = sample(logits.clone(), md)
    # row 0: the bias adds to the logit (-2 + 6 = 4 < 5), it does not replace it;
    # row 1: two -3 entries on token 0 accumulate (5 - 6 < 0.5); row 2: token 0 masked, 4 biased.
    assert out.token_ids.tolist() == [0, 1, 4]


def test_logit_bias_of_a_request() -> None:
    logits = torch.zeros(2, 6)
    logits[:, 0] = 5.0
    params = [SamplingParams(temperature=0.0, logit_bias={3: 6.0, 0: -1.0}), SamplingParams(temperature=0.0)]
    assert sample(logits.clone(), build_md(params, vocab=6)).token_ids.tolist() == [3, 0]


def test_masked_token_is_never_sampled() -> None:
    # min_tokens masks EOS (token 0 here) until enough tokens are out.
    tokens = draw(BASE_LOGITS, eos=0, min_tokens=1)
    assert 0 not in tokens.tolist()
    probs = BASE_LOGITS.clone()
    probs[0] = float("-inf")
    assert total_variation(counts_of(tokens, VOCAB), probs.softmax(-1)) < 0.02


def test_min_tokens_masks_eos_and_stop_tokens_until_reached_in_flight_tokens_included() -> None:
    vocab = 6
    logits = torch.zeros(4, vocab)
    logits[:, 1] = 3.0  # EOS
    logits[:, 2] = 2.0  # a stop token
    params = [
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2, 99]),  # 99: outside the vocab
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2]),
        SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True),  # EOS masked all the same
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[2]),
    ]
    batch, rows, states = make_batch(params, [[0]] * 4, [[4, 4], [4, 4, 4], [4], [4, 4]], eos=1)
    batch.num_pending[rows[3]] = 1  # its third token is in flight: min_tokens is reached
    inputs = SamplingInputBuilder(batch, vocab, noise_seed=0).build(rows, states, in_flight={"3": 0})
    md = inputs.metadata([torch.from_numpy(a) for a in inputs.arrays], torch.zeros(4, dtype=torch.int64))
    assert sample(logits.clone(), md).token_ids.tolist() == [0, 1, 2, 1]


def reference_bitmask(logits: torch.Tensor, words: np.ndarray, rows: list[int]) -> torch.Tensor:
    out = logits.clone()
    for i, row in enumerate(rows):
        for token in range(logits.shape[1]):
            if not (int(words[i, token // 32]) >> (token % 32)) & 1:
                out[row, token] = float("-inf")
    return out


def test_token_bitmask_constrains_its_rows_only_before_logprobs() -> None:
    vocab, batch = 70, 5
    rng = np.random.default_rng(0)
    words = rng.integers(-(2**31), 2**31, size=(2, 3), dtype=np.int64).astype(np.int32)
    logits = torch.randn(batch, vocab)
    params = [SamplingParams(temperature=0.0, logprobs=2)] * batch
    bitmask = HostBitmask(positions=np.array([3, 1]), words=words)
    md = build_md(params, vocab=vocab, bitmask=bitmask)
    out = sample(logits.clone(), md)
    masked = reference_bitmask(logits, words, [3, 1])
    assert torch.equal(out.token_ids, masked.argmax(-1))
    assert out.logprobs is not None
    torch.testing.assert_close(
        out.logprobs[:, 0], masked.log_softmax(-1).gather(1, out.token_ids[:, None])[:, 0]
    )
    with pytest.raises(ValueError, match="bitmask must be int32"):
        build_md(params, vocab=vocab, bitmask=HostBitmask(np.array([0]), words[:1, :2]))


# --------------------------------------------------------------------------- HF references, mixed batches


MIXED = [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.6),
    SamplingParams(temperature=0.6, min_p=0.1),
    SamplingParams(temperature=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2),  # greedy: no truncation
    SamplingParams(temperature=1.1, min_p=0.05, top_k=10, top_p=0.9),
    SamplingParams(temperature=0.5, repetition_penalty=0.7, top_p=0.5),
    SamplingParams(temperature=1.0, seed=3),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=0.5, top_p=0.95, repetition_penalty=1.1, logprobs=3),
]


def hf_reference(logits: torch.Tensor, p: SamplingParams, history: list[int]) -> torch.Tensor:
    """One row through HF's processors in vLLM's order (penalty, min-p, top-k, top-p); the masks
    are those of the tempered distribution, the values those before temperature."""
    x = logits[None].clone()
    ids = torch.tensor([history or [0]])
    if p.repetition_penalty != 1.0:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x)
    if p.temperature < 1e-5:
        return x[0]
    warped = TemperatureLogitsWarper(p.temperature)(ids, x.clone())
    if p.min_p > 0:
        warped = MinPLogitsWarper(p.min_p)(ids, warped)
    if p.top_k > 0:
        warped = TopKLogitsWarper(p.top_k)(ids, warped)
    if p.top_p < 1.0:
        warped = TopPLogitsWarper(p.top_p)(ids, warped)
    return x.masked_fill(warped.isinf(), float("-inf"))[0]


@pytest.mark.parametrize("seed", range(5))
def test_processors_match_hf_on_a_mixed_batch(seed: int) -> None:
    vocab = 300
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(MIXED), vocab, generator=gen) * 3
    prompts = [torch.randint(0, vocab, (6,), generator=gen).tolist() for _ in MIXED]
    outputs = [torch.randint(0, vocab, (4,), generator=gen).tolist() for _ in MIXED]
    md = build_md(MIXED, prompts, outputs, vocab=vocab)
    needs = [
        i
        for i, p in enumerate(MIXED)
        if p.repetition_penalty != 1.0 or (p.temperature > 0 and (p.top_k or p.top_p < 1 or p.min_p))
    ]
    assert md.processed is not None and sorted(md.processed.tolist()) == needs, "only the rows that need it"
    got = apply_processors(logits, md)
    for slot, row in enumerate(md.processed.tolist()):
        expected = hf_reference(logits[row], MIXED[row], prompts[row] + outputs[row])
        assert torch.equal(got[slot].isinf(), expected.isinf()), f"row {row}: the masks differ"
        torch.testing.assert_close(got[slot], expected)


def test_top_k_top_p_keeps_tokens_tied_with_the_cut() -> None:
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, 1.0]])
    md = build_md([SamplingParams(top_k=2)], vocab=6)
    assert apply_processors(logits, md).isfinite().tolist() == [[True, True, True, True, False, True]]


@pytest.mark.parametrize("top_p", [1.0, 0.3, 0.7, 0.95])
def test_top_k_top_p_with_ties_keeps_whole_value_groups(top_p: float) -> None:
    """Logits with many ties (as bf16 logits have), a vocabulary large enough for the two-stage
    top-k: top-k keeps every token at or above the k-th value (as HF's TopKLogitsWarper), and
    top-p keeps a value's tokens when the mass of the larger values is below top_p."""
    vocab, k, temperature = 4096, 16, 0.7
    gen = torch.Generator().manual_seed(int(top_p * 100))
    logits = (torch.randn(6, vocab, generator=gen) * 2).round() / 2
    logits[5] = 0.0  # one value everywhere: every token is tied with the k-th
    md = build_md([SamplingParams(temperature=temperature, top_k=k, top_p=top_p)] * 6, vocab=vocab)
    got = apply_processors(logits, md).isfinite()
    top_k = TopKLogitsWarper(k)(None, logits.clone()).isfinite()
    for row in range(6):
        x = logits[row]
        kept = x >= x.topk(k).values[-1]
        assert torch.equal(kept, top_k[row])
        probs = torch.where(kept, x / temperature, -math.inf).softmax(-1)
        above = (probs[None, :] * (x[None, :] > x[:, None])).sum(-1)  # mass of larger values
        expected = kept & ((above < top_p) | (top_p >= 1.0))
        assert torch.equal(got[row], expected), row


# --------------------------------------------------------------------------- no cliffs


@pytest.mark.parametrize(
    "special",
    [
        SamplingParams(temperature=0.9, seed=7, top_p=0.9),
        SamplingParams(temperature=0.9, seed=7, top_k=50, top_p=0.9),
        SamplingParams(temperature=0.9, seed=7, repetition_penalty=1.1),
        SamplingParams(temperature=0.9, seed=7, min_p=0.1, logprobs=2),
    ],
)
def test_a_processed_row_leaves_the_other_rows_bit_identical(special: SamplingParams) -> None:
    vocab, batch = 500, 24
    base = [SamplingParams(temperature=0.9, seed=i, logprobs=1 if i % 5 == 0 else None) for i in range(batch)]
    base[3] = SamplingParams(temperature=0.0)
    mixed = list(base)
    mixed[7] = special
    others = [i for i in range(batch) if i != 7]
    for step in range(4):
        logits = torch.randn(batch, vocab) * 0.5
        outputs = [[step] * step] * batch
        a = sample(logits.clone(), build_md(base, outputs=outputs, vocab=vocab))
        b = sample(logits.clone(), build_md(mixed, outputs=outputs, vocab=vocab))
        assert torch.equal(a.token_ids[others], b.token_ids[others])
        assert a.logprobs is not None and b.logprobs is not None
        with_lp = [i for i in others if i % 5 == 0]
        assert torch.equal(a.logprobs[with_lp], b.logprobs[with_lp, :2])  # the special row may ask for more


def test_processing_that_changes_nothing_changes_no_token() -> None:
    """A processed row is raced from its fp32 copy, an unprocessed row from the model's logits:
    with equal logits and seed the token is the same."""
    vocab = 400
    for position in range(6):
        logits = torch.randn(2, vocab) * 0.3
        plain = [SamplingParams(temperature=0.8, seed=11), SamplingParams(temperature=0.8, seed=12)]
        biased = [SamplingParams(temperature=0.8, seed=11, logit_bias={5: 0.0}), plain[1]]
        outputs = [[1] * position] * 2
        a = sample(logits.clone(), build_md(plain, outputs=outputs, vocab=vocab))
        b_md = build_md(biased, outputs=outputs, vocab=vocab)
        assert b_md.processed is not None and b_md.processed.tolist() == [0]
        assert torch.equal(a.token_ids, sample(logits.clone(), b_md).token_ids)


# --------------------------------------------------------------------------- seeds


def test_seeded_row_is_independent_of_batch_and_row_position() -> None:
    vocab = 1000
    row_logits = torch.randn(vocab) * 0.1  # near uniform: a different draw almost surely differs

    def token_at(batch: int, row: int, seed: int, position: int) -> int:
        logits = torch.randn(batch, vocab)
        logits[row] = row_logits
        params = [SamplingParams(temperature=0.9) for _ in range(batch)]
        params[0] = SamplingParams(temperature=0.0 if row != 0 else 0.9)  # a greedy neighbour does not matter
        if batch > 2:
            params[1 if row != 1 else 2] = SamplingParams(temperature=0.9, top_k=5)
        params[row] = SamplingParams(temperature=0.9, seed=seed)
        outputs = [[]] * batch
        outputs[row] = [0] * position
        return int(sample(logits, build_md(params, outputs=outputs, vocab=vocab)).token_ids[row])

    for position in range(5):
        alone = token_at(1, 0, seed=42, position=position)
        torch.manual_seed(position + 99)  # global RNG state must not matter
        assert token_at(8, 5, seed=42, position=position) == alone
        assert token_at(3, 1, seed=42, position=position) == alone
    by_position = {token_at(1, 0, seed=42, position=p) for p in range(10)}
    assert len(by_position) > 5, "the output position must be part of the key"
    by_seed = {token_at(1, 0, seed=s, position=0) for s in range(10)}
    assert len(by_seed) > 5, "the seed must be part of the key"


def test_seeded_sampling_follows_the_distribution() -> None:
    n = 4000
    md = build_md([SamplingParams(seed=1000 + i) for i in range(n)])
    tokens = sample(BASE_LOGITS.expand(n, -1).clone(), md).token_ids
    assert total_variation(counts_of(tokens, VOCAB), BASE_LOGITS.softmax(-1)) < 0.04


def test_unseeded_rows_vary() -> None:
    md = [build_md([SamplingParams()], vocab=1000) for _ in range(10)]
    tokens = {int(sample(torch.zeros(1, 1000), m).token_ids[0]) for m in md}
    assert len(tokens) > 5


# --------------------------------------------------------------------------- logprobs


def test_logprobs_are_of_the_raw_logits_with_sorted_top_k_and_rank() -> None:
    batch, vocab, k = 64, 40, 5
    logits = torch.randn(batch, vocab) * 2
    params = [
        SamplingParams(temperature=t, top_k=top_k, logit_bias={7: 4.0}, logprobs=k)
        for t, top_k in [(0.0, 0), (0.5, 10), (1.3, 3), (1.0, 0)] * (batch // 4)
    ]
    out = sample(logits.clone(), build_md(params, vocab=vocab))
    raw = logits.log_softmax(-1)
    assert out.logprob_token_ids is not None and out.logprobs is not None and out.sampled_ranks is not None
    assert out.logprob_token_ids.shape == (batch, 1 + k) and out.logprobs.shape == (batch, 1 + k)
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    # Sampled logprob: log_softmax of the raw logits (not of the biased / tempered ones).
    torch.testing.assert_close(out.logprobs[:, 0], raw.gather(1, out.token_ids[:, None])[:, 0])
    top_lp, top_ids = raw.topk(k, dim=-1)
    assert torch.equal(out.logprob_token_ids[:, 1:], top_ids)
    torch.testing.assert_close(out.logprobs[:, 1:], top_lp)
    assert (out.logprobs[:, 1:-1] >= out.logprobs[:, 2:]).all(), "top-k sorted, best first"
    for row in range(batch):
        sampled_lp = raw[row, out.token_ids[row]]
        rank = 1 + int((raw[row] > sampled_lp).sum())
        assert out.sampled_ranks[row] == rank
        if rank <= k:
            assert out.logprob_token_ids[row, rank].item() == out.token_ids[row].item()


def test_logprobs_only_for_the_rows_that_ask() -> None:
    logits = torch.randn(5, 30)
    params = [SamplingParams(logprobs=n) for n in [None, 2, None, 4, 0]]
    md = build_md(params, vocab=30)
    assert md.logprob_rows is not None and md.logprob_rows.tolist() == [1, 3, 4]
    out = sample(logits.clone(), md)
    assert out.logprobs is not None and out.logprob_token_ids is not None and out.sampled_ranks is not None
    raw = logits.log_softmax(-1)
    for row in (1, 3, 4):
        assert out.logprobs[row, 0] == pytest.approx(raw[row, out.token_ids[row]].item(), abs=1e-5)
        assert out.logprob_token_ids[row, 1:].tolist() == raw[row].topk(4).indices.tolist()
    assert out.logprobs[[0, 2]].eq(0).all() and out.sampled_ranks[[0, 2]].eq(0).all()


def test_greedy_sampled_token_has_rank_one() -> None:
    logits = torch.randn(5, 30)
    out = sample(logits.clone(), build_md([SamplingParams(temperature=0.0, logprobs=2)] * 5, vocab=30))
    assert out.sampled_ranks is not None and out.sampled_ranks.tolist() == [1] * 5


def test_zero_logprobs_returns_only_the_sampled_token() -> None:
    logits = torch.randn(3, 30)
    out = sample(logits.clone(), build_md([SamplingParams(logprobs=0)] * 3, vocab=30))
    assert out.logprob_token_ids is not None and out.logprobs is not None
    assert out.logprob_token_ids.shape == (3, 1) and out.logprobs.shape == (3, 1)
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    expected = logits.log_softmax(-1).gather(1, out.token_ids[:, None])
    torch.testing.assert_close(out.logprobs, expected)
    assert all(math.isfinite(v) for v in out.logprobs.flatten().tolist())


def test_half_precision_logits_are_sampled_in_float32() -> None:
    logits = torch.randn(4, 64).to(torch.bfloat16)
    out = sample(logits, build_md([SamplingParams(temperature=0.0, logprobs=3)] * 4, vocab=64))
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mixed_batch_matches_the_cpu_processors_and_keeps_seeds() -> None:
    """On CUDA: the processors give the CPU's logits on a mixed bf16 batch (up to a boundary
    token's rounding), sampled tokens lie in the kept sets, and a seeded row's token does not
    depend on the other rows' kinds."""
    vocab, batch = 32000, 64
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, vocab, generator=gen) * 3).to(torch.bfloat16)
    mixed = [SamplingParams(temperature=0.8, seed=i) for i in range(batch)]
    for i in range(0, batch, 4):
        mixed[i] = MIXED[(i // 4) % len(MIXED)].clone(seed=i)
    plain = [SamplingParams(temperature=0.8, seed=i) for i in range(batch)]
    prompts = [torch.randint(0, vocab, (30,), generator=gen).tolist() for _ in mixed]
    outputs = [torch.randint(0, vocab, (10,), generator=gen).tolist() for _ in mixed]

    def cuda_md(params: list[SamplingParams]) -> SamplingMetadata:
        batch_, rows, states = make_batch(params, prompts, outputs)
        inputs = SamplingInputBuilder(batch_, vocab, noise_seed=0).build(rows, states)
        return inputs.metadata([torch.from_numpy(a).cuda() for a in inputs.arrays], None)

    md = cuda_md(mixed)
    kept = apply_processors(logits.cuda(), md).cpu()
    expected = apply_processors(logits, build_md(mixed, prompts, outputs, vocab=vocab))
    assert (kept.isinf() != expected.isinf()).sum() <= 2
    both = kept.isfinite() & expected.isfinite()
    torch.testing.assert_close(kept[both], expected[both])
    out = sample(logits.cuda(), md)
    assert md.processed is not None
    assert kept.gather(1, out.token_ids[md.processed].cpu()[:, None]).isfinite().all()
    alone = sample(logits.cuda(), cuda_md(plain))
    untouched = [i for i in range(batch) if i % 4]
    assert torch.equal(out.token_ids[untouched], alone.token_ids[untouched])
