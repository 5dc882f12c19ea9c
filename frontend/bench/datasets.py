"""The benchmarks' workloads: seeded token-id prompts and the output length of each.

``--dataset-name`` picks one of two:

* ``random``, vLLM's random dataset: input lengths uniform in [floor(L(1-r)), ceil(L(1+r))] for
  L = ``--random-input-len`` (or ``--input-len``) and r = ``--random-range-ratio``, output lengths
  likewise from ``--random-output-len`` (or ``--output-len``);
* ``shared``, the shared workload of ../shared/bench (256 requests, U[100,1024] in and out) that
  the peers' numbers were measured on; ``--shared-input-len-range`` / ``--shared-output-len-range``
  narrow it (for quick runs).

Both draw with the shared workload's generator, in its order: numpy's ``default_rng(seed)``
draws the input lengths, then the output lengths, then each prompt's token ids, uniform below
PROMPT_VOCAB (or the model's vocabulary size where that is smaller, as in tiny test models). Ids
below that are valid in every real vocabulary, and token-id prompts need no tokenizer (the
random-weight presets have none).
"""

from __future__ import annotations

import argparse
import math

import numpy as np

PROMPT_VOCAB = 10000
SHARED_LENS = (100, 1024)
NUM_PROMPTS = {"random": 1000, "shared": 256}  # vLLM's default; the shared workload's size
DATASETS = tuple(NUM_PROMPTS)


def make_workload(
    n: int = NUM_PROMPTS["shared"],
    lin: tuple[int, int] = SHARED_LENS,
    lout: tuple[int, int] = SHARED_LENS,
    vocab: int = PROMPT_VOCAB,
    seed: int = 0,
) -> tuple[list[list[int]], list[int]]:
    """Token-id prompts of U[lin] lengths and output lengths of U[lout] (both bounds included):
    with the defaults, exactly the shared workload of ../shared/bench/workload.py."""
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(lin[0], lin[1] + 1, size=n)
    out_lens = rng.integers(lout[0], lout[1] + 1, size=n)
    prompts = [rng.integers(0, vocab, size=int(length)).tolist() for length in in_lens]
    return prompts, [int(x) for x in out_lens]


def random_range(length: int, ratio: float) -> tuple[int, int]:
    """vLLM's random-dataset bounds for a length and a range ratio (at least one token)."""
    return max(1, math.floor(length * (1 - ratio))), math.ceil(length * (1 + ratio))


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dataset")
    group.add_argument("--dataset-name", default="random", choices=DATASETS,
                       help="random: vLLM's random token-id dataset; shared: the shared workload "
                       "of ../shared/bench (U[100,1024] in and out).")  # fmt: skip
    group.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help=f"Number of requests. Default: {NUM_PROMPTS['random']} (random), {NUM_PROMPTS['shared']} (shared).",
    )
    group.add_argument("--input-len", type=int, default=None, help="Same as --random-input-len.")
    group.add_argument("--output-len", type=int, default=None, help="Same as --random-output-len.")
    group.add_argument(
        "--random-input-len", type=int, default=1024, help="Input tokens per request (random)."
    )
    group.add_argument(
        "--random-output-len", type=int, default=128, help="Output tokens per request (random)."
    )
    group.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="Lengths are drawn uniformly within this ratio around the lengths above, in [0, 1) (random).",
    )
    for kind in ("input", "output"):
        group.add_argument(f"--shared-{kind}-len-range", type=int, nargs=2, default=SHARED_LENS,
                           metavar=("MIN", "MAX"), help=f"Bounds of the {kind} lengths (shared).")  # fmt: skip


def check_dataset_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse values no workload can be drawn from (argparse's error: exit code 2)."""
    if args.num_prompts is not None and args.num_prompts < 1:
        parser.error(f"--num-prompts must be at least 1, got {args.num_prompts}")
    if args.dataset_name == "shared":
        for flag, value in (("--input-len", args.input_len), ("--output-len", args.output_len)):
            if value is not None:
                parser.error(f"{flag} applies to the random dataset; use --shared-*-len-range for shared")
        for kind in ("input", "output"):
            low, high = getattr(args, f"shared_{kind}_len_range")
            if not 1 <= low <= high:
                parser.error(f"--shared-{kind}-len-range needs 1 <= MIN <= MAX, got {low} {high}")
        return
    for flag, value in (("--random-input-len", _input_len(args)), ("--random-output-len", _output_len(args))):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if not 0.0 <= args.random_range_ratio < 1.0:
        parser.error(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")


def _input_len(args: argparse.Namespace) -> int:
    return args.random_input_len if args.input_len is None else args.input_len


def _output_len(args: argparse.Namespace) -> int:
    return args.random_output_len if args.output_len is None else args.output_len


def sample_workload(args: argparse.Namespace, vocab: int = PROMPT_VOCAB) -> tuple[list[list[int]], list[int]]:
    """The prompts and output lengths that the dataset flags (checked) and --seed describe, with
    token ids below ``vocab`` (where a model's vocabulary is smaller than PROMPT_VOCAB)."""
    n = args.num_prompts or NUM_PROMPTS[args.dataset_name]
    if args.dataset_name == "shared":
        lin, lout = tuple(args.shared_input_len_range), tuple(args.shared_output_len_range)
    else:
        lin = random_range(_input_len(args), args.random_range_ratio)
        lout = random_range(_output_len(args), args.random_range_ratio)
    return make_workload(n=n, lin=lin, lout=lout, vocab=min(vocab, PROMPT_VOCAB), seed=args.seed)
