"""The vectorised sampler against independent references: greedy, temperature, top-k, top-p,
min-p, penalties (vLLM's definitions), logit bias / -inf masks, seeded rows, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from workers.sampler import SamplingMetadata, apply_penalties, apply_top_k_top_p, sample

VOCAB = 8


def make_md(batch: int, temperature: float | list[float] = 1.0, **kw: object) -> SamplingMetadata:
    temps = temperature if isinstance(temperature, list) else [temperature] * batch
    t = torch.tensor(temps, dtype=torch.float32)
    return SamplingMetadata(temperature=t, all_greedy=bool((t < 1e-5).all()), **kw)  # type: ignore[arg-type]


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


def draw(logits: torch.Tensor, n: int = N, **kw: object) -> torch.Tensor:
    """n independent samples of one row (the batch is n copies of it)."""
    md = make_md(n, **kw)  # type: ignore[arg-type]
    return sample(logits.expand(n, -1).clone(), md).token_ids


# --------------------------------------------------------------------------- greedy / temperature


def test_greedy_is_argmax() -> None:
    logits = torch.randn(16, 100)
    out = sample(logits.clone(), make_md(16, temperature=0.0))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.logprob_token_ids is None and out.sampled_ranks is None


def test_greedy_rows_in_a_mixed_batch_are_argmax() -> None:
    logits = torch.randn(6, 50)
    temps = [0.0, 1.0, 0.0, 0.8, 1e-6, 2.0]
    for _ in range(5):
        out = sample(logits.clone(), make_md(6, temperature=temps))
        for row in (0, 2, 4):
            assert out.token_ids[row] == logits[row].argmax()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_temperature_sampling_matches_softmax(temperature: float) -> None:
    probs = (BASE_LOGITS / temperature).softmax(-1)
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
    tokens = draw(BASE_LOGITS, top_k=torch.full((N,), k))
    assert set(tokens.tolist()) == set(range(k)), "exactly the k most likely tokens appear"
    probs = torch.zeros(VOCAB)
    probs[:k] = BASE_LOGITS[:k].softmax(-1)
    assert total_variation(counts_of(tokens, VOCAB), probs) < 0.02


def test_top_k_rows_are_independent() -> None:
    logits = torch.randn(4, 30)
    top_k = torch.tensor([1, 3, 0, 30])
    reps = 300
    out = sample(logits.repeat(reps, 1), make_md(4 * reps, top_k=top_k.repeat(reps)))
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
    tokens = draw(BASE_LOGITS, top_p=torch.full((N,), top_p))
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
    tokens = draw(BASE_LOGITS, top_k=torch.full((N,), k), top_p=torch.full((N,), top_p))
    assert set(tokens.tolist()) == kept


def test_apply_top_k_top_p_masks_in_place_and_keeps_the_best_token() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 3.25, -1.0, 0.0]])
    apply_top_k_top_p(logits, torch.tensor([2, 0]), torch.tensor([1.0, 1e-6]))
    inf = float("-inf")
    assert logits.tolist() == [[inf, 5.0, inf, 2.0], [inf, 3.25, inf, inf]]


@pytest.mark.parametrize(("min_p", "temperature"), [(0.2, 1.0), (0.5, 1.0), (0.2, 0.5)])
def test_min_p_drops_tokens_below_threshold_after_temperature(min_p: float, temperature: float) -> None:
    probs = (BASE_LOGITS / temperature).softmax(-1)
    allowed = {i for i in range(VOCAB) if probs[i] >= min_p * probs.max()}
    tokens = draw(BASE_LOGITS, temperature=temperature, min_p=torch.full((N,), min_p))
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


def pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.int64)


def test_penalties_match_vllm_definitions() -> None:
    vocab = 12
    logits = torch.randn(4, vocab) * 3
    prompts = [[1, 2, 2, 3], [], [5], [0, 11]]
    outputs = [[3, 3, 4], [7, 7, 7, 1], [], [11, 0, 0]]
    presence = [0.5, -1.0, 2.0, 0.0]
    frequency = [0.25, 0.5, -2.0, 1.0]
    repetition = [1.3, 0.8, 2.0, 1.0]
    md = make_md(
        4,
        presence_penalty=torch.tensor(presence),
        frequency_penalty=torch.tensor(frequency),
        repetition_penalty=torch.tensor(repetition),
        prompt_token_ids=pad(prompts, vocab),
        output_token_ids=pad(outputs, vocab),
    )
    got = logits.clone()
    apply_penalties(got, md)
    expected = reference_penalties(logits, prompts, outputs, presence, frequency, repetition)
    torch.testing.assert_close(got, expected)
    # Untouched tokens keep their logits exactly.
    assert torch.equal(got[2, :5], logits[2, :5])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    md = make_md(
        1,
        repetition_penalty=torch.tensor([2.0]),
        prompt_token_ids=torch.tensor([[0, 1]]),
        output_token_ids=torch.tensor([[4]]),  # padding only
    )
    apply_penalties(logits, md)
    assert logits.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_penalties_steer_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    # Token 0 was generated twice: frequency 0.1 * 2 = 0.2 drops it below token 1.
    md = make_md(
        1,
        temperature=0.0,
        frequency_penalty=torch.tensor([0.1]),
        presence_penalty=torch.tensor([0.0]),
        repetition_penalty=torch.tensor([1.0]),
        prompt_token_ids=torch.tensor([[4]]),
        output_token_ids=torch.tensor([[0, 0]]),
    )
    assert sample(logits.clone(), md).token_ids.tolist() == [1]
    md.frequency_penalty = torch.tensor([0.01])
    assert sample(logits.clone(), md).token_ids.tolist() == [0]


# --------------------------------------------------------------------------- bias and masks


def test_logit_bias_and_inf_masks_as_flat_index_lists() -> None:
    logits = torch.zeros(3, 6)
    logits[:, 0] = 5.0
    logits[0, 3] = -2.0
    logits[1, 1] = 0.5
    md = make_md(
        3,
        temperature=0.0,
        bias_rows=torch.tensor([0, 1, 1, 2, 2]),
        bias_tokens=torch.tensor([3, 0, 0, 0, 4]),
        bias_values=torch.tensor([6.0, -3.0, -3.0, float("-inf"), 1.0]),
    )
    out = sample(logits.clone(), md)
    # row 0: the bias adds to the logit (-2 + 6 = 4 < 5), it does not replace it;
    # row 1: two -3 entries on token 0 accumulate (5 - 6 < 0.5); row 2: token 0 masked, 4 biased.
    assert out.token_ids.tolist() == [0, 1, 4]


def test_masked_token_is_never_sampled() -> None:
    md = make_md(N, bias_rows=torch.arange(N), bias_tokens=torch.zeros(N, dtype=torch.int64))
    md.bias_values = torch.full((N,), float("-inf"))
    tokens = sample(BASE_LOGITS.expand(N, -1).clone(), md).token_ids
    assert 0 not in tokens.tolist()
    probs = BASE_LOGITS.clone()
    probs[0] = float("-inf")
    assert total_variation(counts_of(tokens, VOCAB), probs.softmax(-1)) < 0.02


# --------------------------------------------------------------------------- seeds


def test_seeded_row_is_independent_of_batch_and_row_position() -> None:
    vocab = 1000
    row_logits = torch.randn(vocab) * 0.1  # near uniform: a different draw almost surely differs

    def token_at(batch: int, row: int, seed: int, position: int) -> int:
        logits = torch.randn(batch, vocab)
        logits[row] = row_logits
        temps = [0.9] * batch
        temps[0] = 0.0 if row != 0 else 0.9  # a greedy neighbour does not matter either
        md = make_md(batch, temperature=temps, seeded_rows=[(row, seed, position)])
        if batch > 2:
            md.top_k = torch.tensor([0] * batch)
            md.top_k[1 if row != 1 else 2] = 5
        return int(sample(logits, md).token_ids[row])

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
    md = make_md(n, seeded_rows=[(i, 1000 + i, 0) for i in range(n)])
    tokens = sample(BASE_LOGITS.expand(n, -1).clone(), md).token_ids
    assert total_variation(counts_of(tokens, VOCAB), BASE_LOGITS.softmax(-1)) < 0.04


def test_unseeded_rows_vary() -> None:
    tokens = {int(sample(torch.zeros(1, 1000), make_md(1)).token_ids[0]) for _ in range(10)}
    assert len(tokens) > 5


# --------------------------------------------------------------------------- logprobs


def test_logprobs_are_of_the_raw_logits_with_sorted_top_k_and_rank() -> None:
    batch, vocab, k = 64, 40, 5
    logits = torch.randn(batch, vocab) * 2
    md = make_md(
        batch,
        temperature=[0.0, 0.5, 1.3, 1.0] * (batch // 4),
        top_k=torch.tensor([0, 10, 3, 0] * (batch // 4)),
        bias_rows=torch.arange(batch),
        bias_tokens=torch.full((batch,), 7),
        bias_values=torch.full((batch,), 4.0),
        max_num_logprobs=k,
    )
    out = sample(logits.clone(), md)
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


def test_greedy_sampled_token_has_rank_one() -> None:
    logits = torch.randn(5, 30)
    out = sample(logits.clone(), make_md(5, temperature=0.0, max_num_logprobs=2))
    assert out.sampled_ranks is not None and out.sampled_ranks.tolist() == [1] * 5


def test_zero_logprobs_returns_only_the_sampled_token() -> None:
    logits = torch.randn(3, 30)
    out = sample(logits.clone(), make_md(3, max_num_logprobs=0))
    assert out.logprob_token_ids is not None and out.logprobs is not None
    assert out.logprob_token_ids.shape == (3, 1) and out.logprobs.shape == (3, 1)
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    expected = logits.log_softmax(-1).gather(1, out.token_ids[:, None])
    torch.testing.assert_close(out.logprobs, expected)
    assert all(math.isfinite(v) for v in out.logprobs.flatten().tolist())


def test_half_precision_logits_are_sampled_in_float32() -> None:
    logits = torch.randn(4, 64).to(torch.bfloat16)
    out = sample(logits, make_md(4, temperature=0.0, max_num_logprobs=3))
    assert torch.equal(out.token_ids, logits.float().argmax(-1))
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
