"""Fill a model's parameters from ``(checkpoint_name, full_tensor)`` pairs, refusing a defective
checkpoint by name.

A parameter is filled from one or more checkpoint tensors, its *shards* (q, k and v of a fused
QKV projection; gate and up of a fused MLP; one unnamed shard for any other parameter). Each
parameter's :class:`ParamLoader` knows the full checkpoint shape of every shard it takes, checks
it before slicing (``copy_`` would broadcast a wrong shape silently, and ``narrow`` would cut a
too-long tensor), and copies this rank's slice. :func:`load_checkpoint` maps the names, records
which shards each parameter received, and after the last tensor names every shard never written:
a parameter is never left holding uninitialised memory. Then each module that processes its
parameters after loading (a linear layer's method: repacking, transposing) does so, once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

# The shard id of a parameter filled from a single checkpoint tensor.
WHOLE: Hashable = None

# How many missing names an error lists before it gives a count of the rest.
_LISTED = 10


@dataclass(frozen=True, slots=True)
class ParamLoader:
    """How one parameter is filled: ``shapes`` gives the full checkpoint shape of each shard it takes
    (before any tensor-parallel slicing); ``copy(data, full, shard)`` writes this rank's slice of a
    full tensor of that shape into ``data``."""

    shapes: Mapping[Hashable, tuple[int, ...]]
    copy: Callable[[torch.Tensor, torch.Tensor, Hashable], None]

    def __call__(self, param: nn.Parameter, loaded: torch.Tensor, shard: Hashable = WHOLE) -> None:
        if shard not in self.shapes:
            taken = ", ".join(map(repr, self.shapes))
            raise ValueError(f"is shard {shard!r}, which the parameter does not take (it takes {taken})")
        expected = self.shapes[shard]
        if tuple(loaded.shape) != expected:
            raise ValueError(f"has shape {tuple(loaded.shape)}, expected {expected}")
        self.copy(param.data, loaded, shard)


@runtime_checkable
class ProcessedAfterLoading(Protocol):
    """A module whose parameters take a last step once every checkpoint tensor is in."""

    def process_after_loading(self) -> None: ...


def set_loader(param: nn.Parameter, loader: ParamLoader) -> nn.Parameter:
    """Attach ``loader`` to ``param`` (as its ``weight_loader``) and return ``param``."""
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


def param_loader(param: nn.Parameter) -> ParamLoader:
    """The parameter's loader; a parameter without one is replicated and loaded whole."""
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        return ParamLoader({WHOLE: tuple(param.shape)}, _copy_whole)
    return loader


def _copy_whole(data: torch.Tensor, full: torch.Tensor, shard: Hashable) -> None:
    data.copy_(full)


@dataclass(frozen=True, slots=True)
class StackedShard:
    """A checkpoint tensor that is one shard of a fused parameter: names holding ``fragment``
    (e.g. ``".k_proj."``) belong to the parameter named with ``fused`` in its place, as ``shard``."""

    fragment: str
    fused: str
    shard: Hashable


@dataclass(frozen=True, slots=True)
class CheckpointLayout:
    """How a model's checkpoint names relate to its parameter names.

    ``prefix`` is dropped from checkpoint names (``model.`` of HF's decoder); ``unprefixed`` are
    the parameter-name starts that the checkpoint stores without it (``lm_head.``); ``stacked``
    maps shards of fused parameters; checkpoint names holding any of ``ignored`` carry nothing
    the model needs (precomputed RoPE tables).
    """

    prefix: str
    unprefixed: tuple[str, ...]
    stacked: tuple[StackedShard, ...]
    ignored: tuple[str, ...] = ()

    def to_param(self, ckpt_name: str) -> tuple[str, Hashable]:
        name = ckpt_name.removeprefix(self.prefix)
        for entry in self.stacked:
            if entry.fragment in name:
                return name.replace(entry.fragment, entry.fused), entry.shard
        return name, WHOLE

    def to_checkpoint(self, param_name: str, shard: Hashable) -> str:
        name = param_name
        for entry in self.stacked:
            if entry.fused in name and entry.shard == shard:
                name = name.replace(entry.fused, entry.fragment)
                break
        return name if name.startswith(self.unprefixed) else self.prefix + name


def load_checkpoint(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    layout: CheckpointLayout,
    *,
    skip: frozenset[str] = frozenset(),
    describe: Callable[[str], str] = repr,
) -> None:
    """Copy every tensor of ``weights`` into ``model``'s parameters; ValueError, naming the tensor,
    for one with no place in the model, a wrong shape, or a second copy, and after the last one,
    naming them all, for the tensors the checkpoint lacks. A complete model then has each
    ``ProcessedAfterLoading`` module process its parameters. ``skip`` lists checkpoint names to
    pass over (a tied head); ``describe`` labels a checkpoint name in errors (its name in the
    source file's own scheme, where that differs)."""
    model_name = type(model).__name__
    # remove_duplicate: a tied head is the embedding's parameter under a second name.
    params = dict(model.named_parameters())
    written: dict[str, set[Hashable]] = {name: set() for name in params}
    for ckpt_name, tensor in weights:
        if ckpt_name in skip or any(part in ckpt_name for part in layout.ignored):
            continue
        name, shard = layout.to_param(ckpt_name)
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint tensor {describe(ckpt_name)} has no place in {model_name}")
        loader = param_loader(param)
        if shard in written[name]:
            raise ValueError(f"checkpoint holds tensor {describe(ckpt_name)} more than once")
        try:
            with torch.no_grad():
                loader(param, tensor, shard)
        except ValueError as err:
            raise ValueError(f"checkpoint tensor {describe(ckpt_name)} {err} ({model_name}.{name})") from err
        written[name].add(shard)

    missing = [
        describe(layout.to_checkpoint(name, shard))
        for name, param in params.items()
        for shard in param_loader(param).shapes
        if shard not in written[name]
    ]
    if missing:
        listed = ", ".join(missing[:_LISTED])
        more = f" and {len(missing) - _LISTED} more" if len(missing) > _LISTED else ""
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) that {model_name} needs: {listed}{more}")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ProcessedAfterLoading):
                module.process_after_loading()
