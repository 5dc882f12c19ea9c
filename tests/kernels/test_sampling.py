"""The one-pass Gumbel sampling kernel against its torch reference: greedy rows are exactly the
argmax (lowest index on ties), random rows follow softmax(logits / T), a row's token depends only
on its logits and seed."""

from __future__ import annotations

import pytest
import torch

from kernels.reference import sample_race_ref
from kernels.triton.sampling import sample_race

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


def test_minus_inf_tokens_are_never_sampled() -> None:
    logits = torch.zeros(40, 40)
    logits[:, ::2] = float("-inf")
    seeds = torch.arange(40, dtype=torch.int64)
    out = sample_race(logits, torch.full((40,), 2.0), seeds)
    assert (out % 2 == 1).all()


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
