"""The model's generation config, as vLLM's ``--generation-config`` and
``--override-generation-config`` apply it: its EOS ids, and the sampling defaults of requests that
leave a field unset.

``auto`` (the default) reads the model's ``generation_config.json``; without one, the generation
config is what ``config.json`` implies (its ``eos_token_id``, int or list). ``vllm`` keeps vLLM's
neutral sampling defaults, while the EOS ids still come from the model, as in vLLM. Any other value
is a directory whose ``generation_config.json`` (else ``config.json``) is read instead. The override
(a JSON object) is laid over the sampling keys in every mode; a null in it unsets a key.

Of the file, the engine takes ``eos_token_id`` and the keys vLLM takes as defaults: temperature,
top_p, top_k, min_p, repetition_penalty and max_new_tokens (as max_tokens). The rest, do_sample
included, vLLM ignores too. A GGUF model carries its generation config in metadata: the eos, eot
and eom token ids, and llama.cpp's ``general.sampling.*`` keys.

Everything is read as plain JSON or raw GGUF header bytes: this runs in the frontend before the
engine starts, where importing transformers would cost seconds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ipc.config import GenerationDefaults
from ipc.sampling_params import SamplingParams
from workers.loaders.source import ModelSource

logger = logging.getLogger(__name__)

GENERATION_CONFIG_FILE = "generation_config.json"
MODES = ("auto", "vllm")

# HF generation-config key -> (SamplingParams field, whether it must be an integer).
_SAMPLING_KEYS: dict[str, tuple[str, bool]] = {
    "repetition_penalty": ("repetition_penalty", False),
    "temperature": ("temperature", False),
    "top_k": ("top_k", True),
    "top_p": ("top_p", False),
    "min_p": ("min_p", False),
    "max_new_tokens": ("max_tokens", True),
}

# GGUF metadata (the gguf package's Keys.Tokenizer and Keys.General names). llama.cpp ends
# generation on any of the three token ids.
_GGUF_EOS_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)
_GGUF_SAMPLING_KEYS: dict[str, str] = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
}
_GGUF_PENALTY_REPEAT = "general.sampling.penalty_repeat"
_GGUF_PENALTY_LAST_N = "general.sampling.penalty_last_n"


def parse_override(value: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """``--override-generation-config``: a JSON object, as text (the CLI's) or a mapping."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"override_generation_config is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(
            f"override_generation_config must be a JSON object, got {type(value).__name__} {value!r}"
        )
    return dict(value)


def load_generation_defaults(
    source: ModelSource,
    hf_config: Mapping[str, Any],
    vocab_size: int,
    generation_config: str = "auto",
    override: Mapping[str, Any] | None = None,
) -> GenerationDefaults:
    """The generation config of ``source`` under vLLM's ``--generation-config`` rules, validated
    (a malformed file or value is a ValueError naming it); logs the sampling defaults once."""
    override = dict(override or {})
    if generation_config in MODES:
        model_config, origin = _model_generation_config(source, hf_config)
    else:
        model_config, origin = _directory_generation_config(generation_config)
    from_file = generation_config != "vllm"
    sources = ([origin] if from_file else []) + (["override_generation_config"] if override else [])
    described = " and ".join(sources)
    sampling = _sampling_fields(model_config, origin) if from_file else {}
    for key, value in override.items():
        if key not in _SAMPLING_KEYS:
            logger.warning("override_generation_config: %r is not a sampling default; ignored", key)
        elif value is None:
            sampling.pop(_SAMPLING_KEYS[key][0], None)
    overridden = _sampling_fields(override, "override_generation_config")
    sampling.update(overridden)
    try:
        SamplingParams(**sampling)
    except ValueError as exc:
        raise ValueError(f"the generation config ({described}) is invalid: {exc}") from None
    # vLLM's override_max_tokens: what caps an OpenAI request's max_tokens.
    limit = overridden.get("max_tokens") if generation_config in MODES else sampling.get("max_tokens")
    defaults = GenerationDefaults(
        eos_token_ids=_eos_token_ids(model_config.get("eos_token_id"), origin, vocab_size),
        max_tokens_limit=int(limit) if limit is not None else None,
        **sampling,
    )
    if sampling:
        hint = "; pass --generation-config vllm for vLLM's neutral defaults" if from_file else ""
        logger.warning(
            "using the model's generation config defaults: %s (from %s)%s", sampling, described, hint
        )
    return defaults


def _model_generation_config(source: ModelSource, hf_config: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if source.format == "gguf":
        return _gguf_generation_config(source.path), f"the GGUF metadata of {source.path}"
    path = source.path / GENERATION_CONFIG_FILE
    if path.is_file():
        return _read_json_object(path), str(path)
    return {"eos_token_id": hf_config.get("eos_token_id")}, str(source.path / "config.json")


def _directory_generation_config(value: str) -> tuple[dict[str, Any], str]:
    directory = Path(value)
    if not directory.is_dir():
        raise ValueError(
            f"generation_config must be 'auto', 'vllm' or a directory holding {GENERATION_CONFIG_FILE}; "
            f"{value!r} is none of these"
        )
    for name in (GENERATION_CONFIG_FILE, "config.json"):
        path = directory / name
        if path.is_file():
            raw = _read_json_object(path)
            return (
                raw if name == GENERATION_CONFIG_FILE else {"eos_token_id": raw.get("eos_token_id")}
            ), str(path)
    raise ValueError(
        f"generation_config directory {value!r} holds neither {GENERATION_CONFIG_FILE} nor config.json"
    )


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _gguf_generation_config(path: Path) -> dict[str, Any]:
    """The GGUF metadata in HF generation-config terms."""
    from workers.loaders.gguf_metadata import read_gguf_scalars

    keys = (*_GGUF_EOS_KEYS, *_GGUF_SAMPLING_KEYS, _GGUF_PENALTY_REPEAT, _GGUF_PENALTY_LAST_N)
    meta = read_gguf_scalars(path, keys)
    config: dict[str, Any] = {
        "eos_token_id": [meta[key] for key in _GGUF_EOS_KEYS if key in meta],
        **{name: meta[key] for key, name in _GGUF_SAMPLING_KEYS.items() if key in meta},
    }
    penalty = meta.get(_GGUF_PENALTY_REPEAT)
    if penalty is not None and penalty != 1.0:
        # llama.cpp penalises the last penalty_last_n tokens (-1: the whole context, 0: none;
        # absent: its own default window). repetition_penalty covers the whole sequence, so only
        # the whole-context setting means the same.
        last_n = meta.get(_GGUF_PENALTY_LAST_N)
        if last_n == -1:
            config["repetition_penalty"] = penalty
        elif last_n != 0:
            logger.warning(
                "%s: %s=%s over a window of recent tokens (%s=%s) is not applied: "
                "repetition_penalty covers the whole sequence",
                path,
                _GGUF_PENALTY_REPEAT,
                penalty,
                _GGUF_PENALTY_LAST_N,
                last_n,
            )
    return config


def _sampling_fields(config: Mapping[str, Any], origin: str) -> dict[str, float | int]:
    """The sampling keys ``config`` sets (not null), by SamplingParams name, type-checked."""
    fields: dict[str, float | int] = {}
    for key, (name, integral) in _SAMPLING_KEYS.items():
        value = config.get(key)
        if value is None:
            continue
        wanted = (int,) if integral else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            kind = "an integer" if integral else "a number"
            raise ValueError(f"{origin}: {key} must be {kind}, got {value!r}")
        fields[name] = value if integral else float(value)
    return fields


def _eos_token_ids(value: Any, origin: str, vocab_size: int) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{origin}: eos_token_id must be a token id or a list of them, got {value!r}")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{origin}: eos_token_id {bad} is outside the vocabulary [0, {vocab_size})")
    return tuple(dict.fromkeys(ids))
