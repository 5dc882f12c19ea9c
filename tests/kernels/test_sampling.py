"""The one-pass sampling kernel and its torch reference: greedy rows are exactly the argmax (lowest
index on ties), random rows follow softmax(logits / T), a row's token depends only on its logits
and seed, also when only some rows are sampled. The token-bitmask kernel against a bit-by-bit
loop."""

from __future__ import annotations

import pytest
import torch

from kernels.reference import apply_token_bitmask_ref, sample_race_ref, seed_uniform_ref
from kernels.triton.sampling import apply_token_bitmask, sample_race

LOGITS = torch.tensor([1.0, 0.0, -1.0, -2.0])
# One draw per row, and the interpreter runs ~30 ms a program: the kernel gets fewer draws.
DRAWS = {sample_race: 400, sample_race_ref: 4000}


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=len(probs)).double()
    expected = probs.double() * counts.sum()
    return (((counts - expected) ** 2) / expected).sum().item()


@pytest.mark.parametrize("impl", [sample_race, sample_race_ref])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_greedy_rows_are_the_argmax(impl, dtype: torch.dtype) -> None:
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[3, 4100] = logits[3, 10] = 50.0  # a tie across chunks: the lower index wins
    logits[4, 7] = logits[4, 9] = 50.0  # a tie inside a chunk
    temperature = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 1e-6])
    seeds = torch.arange(6, dtype=torch.int64)
    out = impl(logits, temperature, seeds)
    assert out.dtype == torch.int64 and out.shape == (6,)
    expected = logits.float().argmax(dim=-1)
    for row in (0, 2, 3, 4, 5):
        assert out[row] == expected[row]
    assert out[3] == 10 and out[4] == 7


@pytest.mark.parametrize("impl", [sample_race, sample_race_ref])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_random_rows_follow_the_softmax(impl, temperature: float) -> None:
    n = DRAWS[impl]
    logits = LOGITS.expand(n, -1).clone()
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(1))
    out = impl(logits, torch.full((n,), temperature), seeds)
    probs = (LOGITS / temperature).softmax(-1)
    # 3 degrees of freedom: p = 0.001 at 16.3. A wrong temperature lies far outside.
    assert _chi_square(out, probs) < 16.3
    assert _chi_square(out, (LOGITS / (temperature * 2.5)).softmax(-1)) > 40


@pytest.mark.parametrize("impl", [sample_race, sample_race_ref])
def test_a_row_depends_only_on_its_seed(impl) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 300, generator=gen)
    seeds = torch.randint(0, 2**62, (8,), generator=gen)
    temperature = torch.ones(8)
    full = impl(logits, temperature, seeds)
    alone = impl(logits[5:6].clone(), temperature[5:6], seeds[5:6])
    assert alone[0] == full[5]
    again = impl(logits, temperature, seeds)
    assert torch.equal(again, full)
    other = impl(logits, temperature, seeds + 1)
    assert not torch.equal(other, full)  # 8 rows over 300 tokens: a collision on all is ~impossible


@pytest.mark.parametrize("impl", [sample_race, sample_race_ref])
def test_sampling_some_rows_gives_their_tokens_of_the_whole_batch(impl) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 300, generator=gen)
    seeds = torch.randint(0, 2**62, (9,), generator=gen)
    temperature = torch.tensor([1.0, 0.0, 0.7, 1.0, 2.0, 0.0, 1.0, 0.5, 1.0])
    full = impl(logits, temperature, seeds)
    rows = torch.tensor([7, 1, 4, 2])
    assert torch.equal(impl(logits, temperature, seeds, rows), full[rows])
    assert impl(logits, temperature, seeds, rows[:0]).shape == (0,)


@pytest.mark.parametrize("impl", [sample_race, sample_race_ref])
def test_minus_inf_tokens_are_never_sampled(impl) -> None:
    logits = torch.zeros(40, 40)
    logits[:, ::2] = float("-inf")
    logits[3, 2:] = float("-inf")  # one token left
    seeds = torch.arange(40, dtype=torch.int64)
    out = impl(logits, torch.full((40,), 2.0), seeds)
    assert (out % 2 == 1).all() and out[3] == 1


def _splitmix64(x: int) -> int:
    """splitmix64's output function, in Python integers (the reference's int64 arithmetic wraps)."""
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_seed_uniform_is_splitmix64_top_bits() -> None:
    seeds = [0, 1, 42, 2**62 - 1, 2**63 - 1, -1, -(2**63), 1234567890123]
    got = seed_uniform_ref(torch.tensor(seeds, dtype=torch.int64)).tolist()
    assert got == [(_splitmix64(s % 2**64) >> 40) / 2**24 for s in seeds]
    u = seed_uniform_ref(torch.arange(100_000))
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean().item() - 0.5) < 0.005


def _bitmask_loop(logits: torch.Tensor, words: torch.Tensor, rows: list[int]) -> torch.Tensor:
    out = logits.clone()
    for i, row in enumerate(rows):
        for token in range(logits.shape[1]):
            if not (int(words[i, token // 32]) >> (token % 32)) & 1:
                out[row, token] = float("-inf")
    return out


@pytest.mark.parametrize("impl", [apply_token_bitmask, apply_token_bitmask_ref])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_bitmask_masks_clear_bits_of_its_rows(impl, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    vocab = 1100  # not a multiple of 32; the kernel's blocks split it
    logits = torch.randn(5, vocab, generator=gen).to(dtype)
    words = torch.randint(-(2**31), 2**31, (2, 36), generator=gen, dtype=torch.int64).to(torch.int32)
    words[1, 0] = -1  # all of its first 32 tokens allowed
    expected = _bitmask_loop(logits, words, [4, 1])
    got = logits.clone()
    impl(got, words, torch.tensor([4, 1]))
    assert torch.equal(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("vocab", [49152, 128256])
def test_gpu_real_shapes_bf16(vocab: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(256, vocab, device="cuda", generator=gen).to(torch.bfloat16)
    greedy = sample_race(logits, torch.zeros(256, device="cuda"), torch.arange(256, device="cuda"))
    assert torch.equal(greedy, logits.float().argmax(dim=-1))
    # Distribution over a 4-token row, 200k draws at once.
    n = 200_000
    small = LOGITS.cuda().expand(n, -1).to(torch.bfloat16)
    seeds = torch.randint(0, 2**62, (n,), device="cuda", generator=gen)
    out = sample_race(small, torch.full((n,), 0.7, device="cuda"), seeds)
    assert _chi_square(out.cpu(), (LOGITS.bfloat16().float() / 0.7).softmax(-1)) < 16.3
    # A row's token is its own: the same seed alone or in a batch.
    temps = torch.full((256,), 0.6, device="cuda")
    seeds = torch.randint(0, 2**62, (256,), device="cuda", generator=gen)
    full = sample_race(logits, temps, seeds)
    assert sample_race(logits[17:18], temps[17:18], seeds[17:18])[0] == full[17]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rows_and_bitmask() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(256, 128256, device="cuda", generator=gen).to(torch.bfloat16)
    temps = torch.full((256,), 0.8, device="cuda")
    temps[::7] = 0.0
    seeds = torch.randint(0, 2**62, (256,), device="cuda", generator=gen)
    rows = torch.randperm(256, device="cuda", generator=gen)[:200]
    assert torch.equal(sample_race(logits, temps, seeds, rows), sample_race(logits, temps, seeds)[rows])
    words = torch.randint(-(2**31), 2**31, (40, 4008), device="cuda", generator=gen, dtype=torch.int64)
    words = words.to(torch.int32)
    mask_rows = torch.randperm(256, device="cuda", generator=gen)[:40]
    got, expected = logits.clone(), logits.clone()
    apply_token_bitmask(got, words, mask_rows)
    apply_token_bitmask_ref(expected, words, mask_rows)
    assert torch.equal(got, expected)
