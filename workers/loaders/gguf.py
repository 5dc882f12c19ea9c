"""Read a GGUF file's tensors as float32 torch tensors under HF Llama parameter names.

The weights are dequantized with ``gguf.quants.dequantize`` (the same routine transformers'
GGUF loader uses) and llama.cpp's Q/K row permutation is undone, so every tensor is bit-identical
to what ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` loads from the same file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor

logger = logging.getLogger(__name__)

# GGUF `general.architecture` values whose tensors follow the Llama layout handled here.
# Mistral models convert to "llama" in llama.cpp; Qwen2 differs only by q/k/v biases.
SUPPORTED_ARCHITECTURES = frozenset({"llama", "qwen2"})

# llama.cpp's converter permutes the Q and K rows of these architectures (and no others) so that
# its interleaved-pair RoPE matches HF's rotate-half RoPE; Qwen2 is converted unpermuted.
_ROPE_PERMUTED_ARCHITECTURES = frozenset({"llama"})

# Tensors outside the repeating blocks: GGUF stem -> HF module path.
_GLOBAL_NAMES: MappingProxyType[str, str] = MappingProxyType(
    {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.norm",
        "output": "lm_head",
    }
)

# Per-block tensors: GGUF leaf in `blk.N.<leaf>` -> HF module path under `model.layers.N`.
_BLOCK_NAMES: MappingProxyType[str, str] = MappingProxyType(
    {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
)

_PARAM_KINDS = frozenset({"weight", "bias"})

# Tensors with no HF counterpart that carry nothing the model needs: precomputed RoPE tables
# (``rope_freqs`` of Llama 3.1, ``attn_rot_embd`` of old converters), which the config determines.
# Any other tensor without a counterpart is an error: dropping it would run a different model.
_DERIVED_STEMS = frozenset({"rope_freqs"})
_DERIVED_BLOCK_LEAVES = frozenset({"attn_rot_embd"})


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """The HF Llama parameter name of a llama.cpp tensor name, or None if it has none.

    >>> gguf_to_hf_name("blk.3.attn_q.weight")
    'model.layers.3.self_attn.q_proj.weight'
    """
    stem, _, kind = gguf_name.rpartition(".")
    if kind not in _PARAM_KINDS:
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.{kind}"
    return None


def hf_to_gguf_name(hf_name: str) -> str | None:
    """The llama.cpp tensor name of an HF Llama parameter name, or None if it has none.

    >>> hf_to_gguf_name("model.layers.3.self_attn.q_proj.weight")
    'blk.3.attn_q.weight'
    """
    stem, _, kind = hf_name.rpartition(".")
    if kind not in _PARAM_KINDS:
        return None
    for gguf_stem, hf_stem in _GLOBAL_NAMES.items():
        if stem == hf_stem:
            return f"{gguf_stem}.{kind}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        for leaf, hf_leaf in _BLOCK_NAMES.items():
            if parts[3] == hf_leaf:
                return f"blk.{int(parts[2])}.{leaf}.{kind}"
    return None


def describe_gguf_tensor(hf_name: str) -> str:
    """An HF parameter name for errors about a GGUF file: with the file's own name for it."""
    gguf_name = hf_to_gguf_name(hf_name)
    return repr(hf_name) if gguf_name is None else f"{hf_name!r} (GGUF {gguf_name!r})"


def _is_derived(gguf_name: str) -> bool:
    stem = gguf_name.rpartition(".")[0]
    parts = stem.split(".")
    return stem in _DERIVED_STEMS or (
        len(parts) == 3 and parts[0] == "blk" and parts[2] in _DERIVED_BLOCK_LEAVES
    )


def unpermute_rope_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation along dim 0 (weights and biases alike).

    For each head, llama.cpp reorders the rows from HF's two halves ``[x0..x{d/2-1}, y0..y{d/2-1}]``
    into interleaved pairs ``[x0, y0, x1, y1, ...]``. Reading the rows as (head, pair, 2) and
    swapping the last two axes brings the halves back together.
    """
    rows = tensor.shape[0]
    if rows % (2 * num_heads) != 0:
        raise ValueError(f"cannot un-permute {rows} rows over {num_heads} heads: not a multiple of 2*heads")
    half_head_dim = rows // num_heads // 2
    rest = tensor.shape[1:]
    return tensor.reshape(num_heads, half_head_dim, 2, *rest).transpose(1, 2).reshape(tensor.shape)


def iter_gguf_weights(path: Path | str, *, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` for each tensor of the GGUF file at ``path``.

    Lazy: the file is memory-mapped and one tensor is dequantized per step, so peak memory is the
    file plus one float32 tensor beyond what the caller keeps. A file without an ``output``
    tensor yields nothing for ``lm_head`` (the model ties it to the embedding). Precomputed RoPE
    tables (e.g. Llama 3.1's ``rope_freqs``, which transformers also ignores because the config
    carries the rope scaling) are skipped with a log line; any other tensor with no HF counterpart
    is a ValueError naming it, raised before a tensor is read.
    """
    from gguf import GGUFReader  # imported lazily: only GGUF loads pay for it

    path = Path(path)
    reader = GGUFReader(path)
    arch = _read_str(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )

    q_heads = k_heads = 0
    if arch in _ROPE_PERMUTED_ARCHITECTURES:
        q_heads = _read_int(reader, f"{arch}.attention.head_count")
        # An absent head_count_kv means MHA, as in llama.cpp. (transformers then skips the
        # un-permute altogether, which garbles Q/K; every current converter writes the key.)
        k_heads = _read_int(reader, f"{arch}.attention.head_count_kv", default=q_heads)

    names = {tensor.name: gguf_to_hf_name(tensor.name) for tensor in reader.tensors}
    unknown = [name for name, hf_name in names.items() if hf_name is None and not _is_derived(name)]
    if unknown:
        raise ValueError(
            f"{path}: GGUF tensor(s) with no place in a {arch!r} model: {unknown}; "
            f"this file is not a plain {arch} model"
        )
    skipped = [name for name, hf_name in names.items() if hf_name is None]
    for tensor in tqdm(reader.tensors, desc=f"Loading {path.name}", unit="tensor", disable=not progress):
        hf_name = names[tensor.name]
        if hf_name is None:
            continue
        weight = _dequantize(tensor)
        if q_heads:
            if ".self_attn.q_proj." in hf_name:
                weight = unpermute_rope_rows(weight, q_heads)
            elif ".self_attn.k_proj." in hf_name:
                weight = unpermute_rope_rows(weight, k_heads)
        yield hf_name, weight

    if skipped:
        logger.info("%s: skipped %d tensors with no HF counterpart: %s", path.name, len(skipped), skipped)


def _dequantize(tensor: ReaderTensor) -> torch.Tensor:
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.tensor_type)
    # F32 comes back as a read-only view of the memory map; copy it so the tensor owns writable
    # memory and the mapping can be closed. Quantized types already return a fresh array.
    if not values.flags.writeable or not values.flags.c_contiguous:
        values = np.array(values, dtype=np.float32, order="C", copy=True)
    elif values.dtype != np.float32:
        values = values.astype(np.float32)
    # GGUF lists dimensions innermost first (ne0 = row length); torch wants them outermost first.
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return torch.from_numpy(values).reshape(shape)


def _field_value(reader: GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _read_str(reader: GGUFReader, key: str) -> str:
    value = _field_value(reader, key)
    if not isinstance(value, str):
        raise ValueError(f"GGUF metadata {key!r} is missing or not a string: {value!r}")
    return value


def _read_int(reader: GGUFReader, key: str, default: int | None = None) -> int:
    value = _field_value(reader, key)
    if value is None and default is not None:
        return default
    # Some architectures store per-layer head counts as arrays; the Llama family never does.
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"GGUF metadata {key!r} is missing or not a single integer: {value!r}")
    return int(value)
