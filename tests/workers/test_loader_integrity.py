"""A defective checkpoint (a tensor missing, of the wrong shape, stray or stored twice) is refused
with a ValueError naming the tensor, for HF safetensors (single file and sharded with an index),
GGUF and tensor-parallel ranks; a sound one fills every parameter with exactly its tensor.

Models are built and loaded the way a worker does (EngineArgs -> build_model ->
load_model_weights); checkpoints are written by HF transformers, safetensors and gguf.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from core.engine_args import EngineArgs
from ipc.config import ModelConfig
from tests.checkpoints import RANDOM_VECTORS, tiny_config, tiny_state_dict
from tests.workers.test_loaders import _to_gguf_tensors, _write_gguf
from workers.distributed import TPGroup
from workers.models.registry import build_model, load_model_weights

State = dict[str, torch.Tensor]


def _model_config(path: Path) -> ModelConfig:
    return EngineArgs(model=str(path), device="cpu").create_engine_config().model


def _load(config: ModelConfig, tp: TPGroup | None = None) -> torch.nn.Module:
    model = build_model(config, tp or TPGroup(), torch.float32, torch.device("cpu"))
    load_model_weights(model, config)
    return model


def _write_hf(directory: Path, config: LlamaConfig, state: State) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def tiny() -> tuple[LlamaConfig, State]:
    config = tiny_config()
    return config, tiny_state_dict(config, redraw=RANDOM_VECTORS)


# --------------------------------------------------------------------------- defects

L1 = "model.layers.1."


def _drop(name: str) -> Callable[[State], None]:
    def apply(state: State) -> None:
        del state[name]

    return apply


def _replace(name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[State], None]:
    def apply(state: State) -> None:
        state[name] = change(state[name])

    return apply


def _add(name: str, tensor: torch.Tensor) -> Callable[[State], None]:
    return lambda state: state.__setitem__(name, tensor)


def _missing(name: str) -> str:
    return rf"checkpoint lacks 1 tensor\(s\) that LlamaForCausalLM needs: '{re.escape(name)}'"


def _bad_shape(name: str, actual: tuple[int, ...], expected: tuple[int, ...]) -> str:
    return rf"checkpoint tensor '{re.escape(name)}' has shape {re.escape(str(actual))}, expected {re.escape(str(expected))}"


def _stray(name: str) -> str:
    return rf"checkpoint tensor '{re.escape(name)}' has no place in LlamaForCausalLM"


# (defect, what the error must say). Sizes: hidden 64, 4 heads and 2 KV heads of 16, MLP 128, vocab 96.
HF_DEFECTS: dict[str, tuple[Callable[[State], None], str]] = {
    "k_proj of a fused qkv": (
        _drop(L1 + "self_attn.k_proj.weight"),
        _missing(L1 + "self_attn.k_proj.weight"),
    ),
    "up_proj of a fused gate_up": (_drop(L1 + "mlp.up_proj.weight"), _missing(L1 + "mlp.up_proj.weight")),
    "final norm": (_drop("model.norm.weight"), _missing("model.norm.weight")),
    "untied lm_head": (_drop("lm_head.weight"), _missing("lm_head.weight")),
    "transposed down_proj": (
        _replace(L1 + "mlp.down_proj.weight", lambda t: t.T),
        _bad_shape(L1 + "mlp.down_proj.weight", (128, 64), (64, 128)),
    ),
    "q_proj rows cut": (
        _replace(L1 + "self_attn.q_proj.weight", lambda t: t[:32]),
        _bad_shape(L1 + "self_attn.q_proj.weight", (32, 64), (64, 64)),
    ),
    "v_proj rows doubled": (
        _replace(L1 + "self_attn.v_proj.weight", lambda t: torch.cat([t, t])),
        _bad_shape(L1 + "self_attn.v_proj.weight", (64, 64), (32, 64)),
    ),
    # copy_ would broadcast a single value over the whole norm.
    "norm of one element": (
        _replace("model.norm.weight", lambda t: t[:1]),
        _bad_shape("model.norm.weight", (1,), (64,)),
    ),
    # narrow would keep the first rows of a longer vocabulary.
    "embedding of a larger vocabulary": (
        _replace("model.embed_tokens.weight", lambda t: torch.cat([t, t[:8]])),
        _bad_shape("model.embed_tokens.weight", (104, 64), (96, 64)),
    ),
    "stray tensor": (
        _add("model.layers.0.self_attn.q_norm.weight", torch.ones(16)),
        _stray("model.layers.0.self_attn.q_norm.weight"),
    ),
}


@pytest.mark.parametrize("defect", list(HF_DEFECTS))
def test_defective_safetensors_is_refused_by_name(
    tmp_path: Path, tiny: tuple[LlamaConfig, State], defect: str
) -> None:
    config, state = tiny
    change, message = HF_DEFECTS[defect]
    state = dict(state)
    change(state)
    with pytest.raises(ValueError, match=message):
        _load(_model_config(_write_hf(tmp_path, config, state)))


def test_every_missing_tensor_is_listed(tmp_path: Path, tiny: tuple[LlamaConfig, State]) -> None:
    config, state = tiny
    gone = [L1 + "self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight", "model.norm.weight"]
    kept = {k: v for k, v in state.items() if k not in gone}
    with pytest.raises(ValueError, match=r"lacks 3 tensor\(s\)") as info:
        _load(_model_config(_write_hf(tmp_path, config, kept)))
    assert all(f"'{name}'" in str(info.value) for name in gone)


def test_tied_checkpoint_needs_no_head(tmp_path: Path, tiny: tuple[LlamaConfig, State]) -> None:
    state = {k: v for k, v in tiny[1].items() if k != "lm_head.weight"}
    model = _load(_model_config(_write_hf(tmp_path, tiny_config(tie_word_embeddings=True), state)))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(model.embed_tokens.weight, state["model.embed_tokens.weight"])


def _write_sharded(
    directory: Path, config: LlamaConfig, shards: list[State], weight_map: dict[str, str]
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    for i, shard in enumerate(shards):
        save_file(shard, str(directory / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def _split(state: State) -> tuple[list[State], dict[str, str]]:
    names = sorted(state)
    shards = [{n: state[n] for n in names[::2]}, {n: state[n] for n in names[1::2]}]
    weight_map = {
        n: f"model-{i + 1:05d}-of-00002.safetensors" for i, shard in enumerate(shards) for n in shard
    }
    return shards, weight_map


def test_sharded_checkpoint_missing_a_shard_tensor(tmp_path: Path, tiny: tuple[LlamaConfig, State]) -> None:
    config, state = tiny
    shards, weight_map = _split(state)
    name = L1 + "self_attn.k_proj.weight"
    for shard in shards:
        shard.pop(name, None)  # the index still lists it: a shard written without it
    with pytest.raises(ValueError, match=_missing(name)):
        _load(_model_config(_write_sharded(tmp_path, config, shards, weight_map)))


def test_sharded_checkpoint_holding_a_tensor_twice(tmp_path: Path, tiny: tuple[LlamaConfig, State]) -> None:
    config, state = tiny
    shards, weight_map = _split(state)
    name = "model.layers.0.mlp.gate_proj.weight"
    other = next(s for s in shards if name not in s)
    other[name] = torch.zeros_like(state[name])  # a second, different copy in the other shard
    with pytest.raises(ValueError, match=rf"holds tensor '{re.escape(name)}' more than once"):
        _load(_model_config(_write_sharded(tmp_path, config, shards, weight_map)))


def test_sound_sharded_checkpoint_loads_exactly(tmp_path: Path, tiny: tuple[LlamaConfig, State]) -> None:
    config, state = tiny
    model = _load(_model_config(_write_sharded(tmp_path, config, *_split(state))))
    _assert_rank_holds(model, state, TPGroup())


# --------------------------------------------------------------------------- tensor parallelism


def _rank_slices(state: State, layer: int, rank: int, size: int) -> State:
    """What rank ``rank`` of ``size`` holds of layer ``layer``, cut from the HF tensors by the
    Megatron layout: q/k/v, gate/up and vocab rows split, o/down input columns split."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(size, dim=0)[rank]

    p = f"model.layers.{layer}."
    return {
        "qkv": torch.cat([rows(state[p + f"self_attn.{x}_proj.weight"]) for x in "qkv"]),
        "gate_up": torch.cat([rows(state[p + f"mlp.{x}_proj.weight"]) for x in ("gate", "up")]),
        "o": state[p + "self_attn.o_proj.weight"].chunk(size, dim=1)[rank],
        "down": state[p + "mlp.down_proj.weight"].chunk(size, dim=1)[rank],
        "embed": rows(state["model.embed_tokens.weight"]),
        "head": rows(state["lm_head.weight"]),
    }


def _assert_rank_holds(model: torch.nn.Module, state: State, tp: TPGroup) -> None:
    for layer_index, layer in enumerate(model.layers):
        want = _rank_slices(state, layer_index, tp.rank, tp.size)
        p = f"model.layers.{layer_index}."
        assert torch.equal(layer.self_attn.qkv_proj.weight, want["qkv"])
        assert torch.equal(layer.mlp.gate_up_proj.weight, want["gate_up"])
        assert torch.equal(layer.self_attn.o_proj.weight, want["o"])
        assert torch.equal(layer.mlp.down_proj.weight, want["down"])
        assert torch.equal(layer.input_layernorm.weight, state[p + "input_layernorm.weight"])
        assert torch.equal(
            layer.post_attention_layernorm.weight, state[p + "post_attention_layernorm.weight"]
        )
    assert torch.equal(model.embed_tokens.weight, want["embed"])
    assert torch.equal(model.lm_head.weight, want["head"])
    assert torch.equal(model.norm.weight, state["model.norm.weight"])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory, tiny: tuple[LlamaConfig, State]) -> Path:
    config, state = tiny
    return _write_hf(tmp_path_factory.mktemp("tiny"), config, state)


@pytest.mark.parametrize("rank", [0, 1])
def test_sound_checkpoint_fills_each_tp_rank_with_its_slice(
    hf_dir: Path, tiny: tuple[LlamaConfig, State], rank: int
) -> None:
    # A rank's model is built and loaded in-process: construction and loading run no collective.
    tp = TPGroup(rank=rank, size=2)
    _assert_rank_holds(_load(_model_config(hf_dir), tp), tiny[1], tp)


# Defects that one rank's slice would fit: rank 0 would have read the first half silently.
TP_DEFECTS = (
    "q_proj rows cut",
    "v_proj rows doubled",
    "embedding of a larger vocabulary",
    "transposed down_proj",
)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("defect", TP_DEFECTS)
def test_tp_rank_checks_the_full_shape_before_slicing(
    tmp_path: Path, tiny: tuple[LlamaConfig, State], defect: str, rank: int
) -> None:
    config, state = tiny
    change, message = HF_DEFECTS[defect]
    state = dict(state)
    change(state)
    with pytest.raises(ValueError, match=message):
        _load(_model_config(_write_hf(tmp_path, config, state)), TPGroup(rank=rank, size=2))


# --------------------------------------------------------------------------- GGUF


def _gguf_label(hf_name: str, gguf_name: str) -> str:
    return re.escape(f"'{hf_name}' (GGUF '{gguf_name}')")


# (change to the llama.cpp-named tensors, what the error must say)
GGUF_DEFECTS: dict[str, tuple[Callable[[State], None], str]] = {
    "attn_k of a fused qkv": (
        _drop("blk.1.attn_k.weight"),
        "lacks 1 tensor.*" + _gguf_label(L1 + "self_attn.k_proj.weight", "blk.1.attn_k.weight"),
    ),
    "ffn_up of a fused gate_up": (
        _drop("blk.1.ffn_up.weight"),
        "lacks 1 tensor.*" + _gguf_label(L1 + "mlp.up_proj.weight", "blk.1.ffn_up.weight"),
    ),
    "output_norm": (
        _drop("output_norm.weight"),
        "lacks 1 tensor.*" + _gguf_label("model.norm.weight", "output_norm.weight"),
    ),
    "transposed ffn_down": (
        _replace("blk.1.ffn_down.weight", lambda t: t.T.contiguous()),
        _gguf_label(L1 + "mlp.down_proj.weight", "blk.1.ffn_down.weight")
        + re.escape(" has shape (128, 64), expected (64, 128)"),
    ),
    "attn_q rows cut": (
        _replace("blk.1.attn_q.weight", lambda t: t[:32].contiguous()),
        _gguf_label(L1 + "self_attn.q_proj.weight", "blk.1.attn_q.weight")
        + re.escape(" has shape (32, 64), expected (64, 64)"),
    ),
    # Named in llama.cpp's scheme but with no parameter here.
    "stray output_norm bias": (
        _add("output_norm.bias", torch.ones(64)),
        _gguf_label("model.norm.bias", "output_norm.bias") + " has no place in LlamaForCausalLM",
    ),
    # Not even a name the loader maps: refused before any tensor is read.
    "stray q_norm": (
        _add("blk.0.attn_q_norm.weight", torch.ones(16)),
        r"GGUF tensor\(s\) with no place in a 'llama' model: \['blk\.0\.attn_q_norm\.weight'\]",
    ),
}


def _gguf_model_config(path: Path, config: LlamaConfig, tensors: State) -> ModelConfig:
    _write_gguf(
        path,
        "llama",
        tensors,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        config=config,
    )
    return _model_config(path)


@pytest.mark.parametrize("defect", list(GGUF_DEFECTS))
def test_defective_gguf_is_refused_by_name(
    tmp_path: Path, tiny: tuple[LlamaConfig, State], defect: str
) -> None:
    config, state = tiny
    tensors = _to_gguf_tensors(state, "llama", config)
    change, message = GGUF_DEFECTS[defect]
    change(tensors)
    model_config = _gguf_model_config(tmp_path / "tiny.gguf", config, tensors)
    with pytest.raises(ValueError, match=message):
        _load(model_config)


def test_sound_gguf_loads_exactly(tmp_path: Path, tiny: tuple[LlamaConfig, State]) -> None:
    config, state = tiny
    tensors = _to_gguf_tensors(state, "llama", config)
    tensors["rope_freqs.weight"] = torch.ones(8)  # a RoPE table the config determines: skipped
    model_config = _gguf_model_config(tmp_path / "tiny.gguf", config, tensors)
    _assert_rank_holds(_load(model_config), state, TPGroup())


def test_gguf_and_hf_configs_agree(tmp_path: Path, hf_dir: Path, tiny: tuple[LlamaConfig, State]) -> None:
    # The GGUF tests above rely on transformers reading the same architecture from the metadata.
    config, state = tiny
    gguf = _gguf_model_config(tmp_path / "tiny.gguf", config, _to_gguf_tensors(state, "llama", config))
    hf = _model_config(hf_dir)
    keys = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size")
    assert {k: getattr(gguf, k) for k in keys} == {k: getattr(hf, k) for k in keys}
