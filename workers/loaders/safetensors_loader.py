"""Read the weights of a local HF checkpoint directory, one tensor at a time."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True, slots=True)
class WeightFiles:
    """The files that hold a checkpoint's weights, and their kind."""

    kind: Literal["safetensors", "bin"]
    files: tuple[Path, ...]


def find_weight_files(directory: Path | str) -> WeightFiles:
    """The weight files of an HF checkpoint directory: safetensors first, ``.bin`` as a fallback.

    An index (``*.index.json``) decides the set when present, because directories can hold
    other weight files beside the HF shards (Mistral ships a ``consolidated.safetensors`` in its
    own naming, which would load every weight twice under wrong names).
    """
    directory = Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        return WeightFiles("safetensors", _files_from_index(directory, index))
    shards = sorted(directory.glob("*.safetensors"))
    hf_shards = [p for p in shards if not p.name.startswith("consolidated")]
    if shards:
        # Without an index, still prefer HF-named shards over a Mistral-native consolidated file.
        return WeightFiles("safetensors", tuple(hf_shards or shards))

    index = directory / BIN_INDEX
    if index.is_file():
        return WeightFiles("bin", _files_from_index(directory, index))
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        return WeightFiles("bin", tuple(bins))
    raise FileNotFoundError(
        f"no weights in {directory}: expected *.safetensors (optionally with {SAFETENSORS_INDEX}) "
        "or pytorch_model*.bin"
    )


def iter_safetensors_weights(
    directory: Path | str, *, progress: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every weight of the HF checkpoint in ``directory``.

    Tensors keep their stored dtype; the model casts them as it copies them in. Safetensors
    shards are memory-mapped and read one tensor at a time.
    """
    found = find_weight_files(directory)
    if found.kind == "bin":
        yield from _iter_bin(found.files, progress=progress)
    else:
        yield from _iter_safetensors(found.files, progress=progress)


def _iter_safetensors(files: tuple[Path, ...], *, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    # Headers only: cheap, and it gives the bar a total in tensors, which moves even when a
    # checkpoint is a single large shard.
    total = 0
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as handle:
            total += len(handle.keys())

    with tqdm(total=total, desc="Loading safetensors", unit="tensor", disable=not progress) as bar:
        for file in files:
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, handle.get_tensor(name)
                    bar.update()


def _iter_bin(files: tuple[Path, ...], *, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    logger.warning("no *.safetensors found; loading pickled pytorch_model*.bin with weights_only=True")
    for file in tqdm(files, desc="Loading .bin shards", unit="file", disable=not progress):
        state = _torch_load(file)
        if not isinstance(state, dict):
            raise ValueError(f"{file} does not hold a state dict (got {type(state).__name__})")
        # Pop as we go so a consumed tensor is not kept alive by this dict.
        for name in list(state):
            yield name, state.pop(name)


def _torch_load(file: Path) -> object:
    # weights_only refuses arbitrary pickled code; mmap avoids a second copy of each shard but
    # only works for the zip format (torch >= 1.6), so older files are read whole.
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(file, map_location="cpu", weights_only=True)


def _files_from_index(directory: Path, index: Path) -> tuple[Path, ...]:
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no weight_map")
    files = tuple(directory / name for name in sorted(set(weight_map.values())))
    missing = [str(f.name) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
    return files
