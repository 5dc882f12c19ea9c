from __future__ import annotations

import importlib.util
import inspect
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from tests.checkpoints import RANDOM_VECTORS, save_tiny_model, tiny_config, tiny_state_dict
from workers.loaders.config import load_hf_config, read_hf_config
from workers.loaders.gguf import gguf_to_hf_name, hf_to_gguf_name, iter_gguf_weights, unpermute_rope_rows
from workers.loaders.safetensors_loader import find_weight_files
from workers.loaders.source import ModelSource, resolve_model
from workers.loaders.weights import iter_weights

SMOLLM2 = "smollm2-135m-instruct"


# --------------------------------------------------------------------------- helpers


def _llama_cpp_permute(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter permutation, written from its description: per head, rows go from
    rotate-half order [x0..x{d/2-1}, y0..y{d/2-1}] to interleaved [x0, y0, x1, y1, ...]."""
    head_dim = t.shape[0] // num_heads
    out = torch.empty_like(t)
    for h in range(num_heads):
        base = h * head_dim
        for i in range(head_dim // 2):
            out[base + 2 * i] = t[base + i]
            out[base + 2 * i + 1] = t[base + head_dim // 2 + i]
    return out


def _hf_to_gguf_name(name: str) -> str:
    # Inverse of the loader's map, built independently for the synthetic round trip.
    glob = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    block = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    stem, kind = name.rsplit(".", 1)
    if stem in glob:
        return f"{glob[stem]}.{kind}"
    _, _, layer, module = stem.split(".", 3)
    return f"blk.{layer}.{block[module]}.{kind}"


def _write_gguf(
    path: Path,
    arch: str,
    tensors: dict[str, torch.Tensor],
    *,
    num_heads: int,
    num_kv_heads: int,
    f16: frozenset[str] = frozenset(),
    config: LlamaConfig | None = None,
) -> None:
    """A GGUF file of ``tensors``; with ``config``, also the metadata transformers reads a config from."""
    writer = GGUFWriter(path, arch)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    if config is not None:
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
    for name, tensor in tensors.items():
        array = tensor.numpy()
        writer.add_tensor(name, array.astype(np.float16) if name in f16 else array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _to_gguf_tensors(
    state: dict[str, torch.Tensor], arch: str, config: LlamaConfig
) -> dict[str, torch.Tensor]:
    """HF tensors under llama.cpp names, with Q and K permuted as llama.cpp's converter does for
    "llama" (weights and biases) and never for "qwen2"."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        stored = tensor
        if arch == "llama" and ".q_proj." in name:
            stored = _llama_cpp_permute(tensor, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            stored = _llama_cpp_permute(tensor, config.num_key_value_heads)
        tensors[_hf_to_gguf_name(name)] = stored
    return tensors


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --------------------------------------------------------------------------- SmolLM2 vs transformers


@pytest.fixture(scope="module")
def smollm2() -> ModelSource:
    return resolve_model(SMOLLM2)


@pytest.fixture(scope="module")
def smollm2_hf_config(smollm2: ModelSource) -> PretrainedConfig:
    # Loaded with sockets refused: reading a local model must never reach for a hub.
    with pytest.MonkeyPatch.context() as monkeypatch:
        _no_network(monkeypatch)
        return load_hf_config(smollm2)


@pytest.fixture(scope="module")
def transformers_state_dict(smollm2: ModelSource) -> dict[str, torch.Tensor]:
    """What transformers loads from the same GGUF (fp32), loaded once per module: it takes ~17 s."""
    if importlib.util.find_spec("accelerate") is not None:
        model = AutoModelForCausalLM.from_pretrained(
            str(smollm2.directory), gguf_file=smollm2.path.name, dtype=torch.float32, local_files_only=True
        )
        return model.state_dict()
    # transformers insists on accelerate for GGUF in from_pretrained; without it, run the function
    # from_pretrained calls for Llama GGUFs, then tie lm_head the way from_pretrained does.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = load_hf_config(smollm2)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(
        str(smollm2.path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32
    )["tensors"]
    if config.tie_word_embeddings:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    return tensors


@pytest.fixture(scope="module")
def smollm2_weights(smollm2: ModelSource) -> dict[str, torch.Tensor]:
    return dict(iter_weights(smollm2, progress=False))


def test_smollm2_gguf_equals_transformers_exactly(
    smollm2_weights: dict[str, torch.Tensor], transformers_state_dict: dict[str, torch.Tensor]
) -> None:
    # transformers ties lm_head to the embedding (the file has no `output` tensor); we yield no lm_head.
    assert set(transformers_state_dict) - set(smollm2_weights) == {"lm_head.weight"}
    assert set(smollm2_weights) <= set(transformers_state_dict)
    mismatched = [
        name
        for name, ours in smollm2_weights.items()
        if ours.dtype != torch.float32 or not torch.equal(ours, transformers_state_dict[name])
    ]
    assert mismatched == []
    assert torch.equal(
        transformers_state_dict["lm_head.weight"], smollm2_weights["model.embed_tokens.weight"]
    )


def test_smollm2_parameter_names_and_shapes(
    smollm2_weights: dict[str, torch.Tensor], smollm2_hf_config: PretrainedConfig
) -> None:
    cfg = smollm2_hf_config
    per_layer = {
        "self_attn.q_proj.weight": (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size),
        "self_attn.k_proj.weight": (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size),
        "self_attn.v_proj.weight": (cfg.num_key_value_heads * cfg.head_dim, cfg.hidden_size),
        "self_attn.o_proj.weight": (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim),
        "mlp.gate_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
        "mlp.up_proj.weight": (cfg.intermediate_size, cfg.hidden_size),
        "mlp.down_proj.weight": (cfg.hidden_size, cfg.intermediate_size),
        "input_layernorm.weight": (cfg.hidden_size,),
        "post_attention_layernorm.weight": (cfg.hidden_size,),
    }
    expected = {
        "model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        "model.norm.weight": (cfg.hidden_size,),
    }
    for layer in range(cfg.num_hidden_layers):
        expected.update({f"model.layers.{layer}.{leaf}": shape for leaf, shape in per_layer.items()})
    assert {name: tuple(t.shape) for name, t in smollm2_weights.items()} == expected
    assert all(t.is_contiguous() for t in smollm2_weights.values())


def test_smollm2_config_as_transformers_reads_it(smollm2_hf_config: PretrainedConfig) -> None:
    cfg = smollm2_hf_config
    assert cfg.model_type == "llama"
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    assert cfg.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings is True
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152
    assert cfg.rope_parameters["rope_theta"] == 100000.0


def test_gguf_weights_are_yielded_lazily(smollm2: ModelSource) -> None:
    weights = iter_weights(smollm2, progress=False)
    assert inspect.isgenerator(weights)
    name, tensor = next(weights)
    assert name == "model.embed_tokens.weight"
    assert tensor.shape == (49152, 576)
    weights.close()


# --------------------------------------------------------------------------- GGUF unit tests


@pytest.mark.parametrize(
    ("gguf_name", "hf_name"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.12.attn_k.bias", "model.layers.12.self_attn.k_proj.bias"),
        ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
        ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("blk.3.ffn_gate.weight", "model.layers.3.mlp.gate_proj.weight"),
        ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj.weight"),
        ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight"),
        ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight"),
        ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
        ("rope_freqs.weight", None),
        ("blk.3.attn_q_norm.weight", None),
        ("blk.x.attn_q.weight", None),
        ("token_embd.scale", None),
    ],
)
def test_gguf_to_hf_name(gguf_name: str, hf_name: str | None) -> None:
    assert gguf_to_hf_name(gguf_name) == hf_name


def test_hf_to_gguf_name_inverts_the_map() -> None:
    config = tiny_config(attention_bias=True)
    for name in tiny_state_dict(config, redraw=RANDOM_VECTORS):
        assert hf_to_gguf_name(name) == _hf_to_gguf_name(name), name
        assert gguf_to_hf_name(hf_to_gguf_name(name)) == name
    for name in (
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.x.mlp.up_proj.weight",
        "lm_head.scale",
    ):
        assert hf_to_gguf_name(name) is None


@pytest.mark.parametrize(("num_heads", "head_dim", "cols"), [(4, 16, 8), (3, 64, 5), (2, 8, None)])
def test_unpermute_inverts_llama_cpp_permutation(num_heads: int, head_dim: int, cols: int | None) -> None:
    shape = (num_heads * head_dim,) if cols is None else (num_heads * head_dim, cols)
    original = torch.randn(shape)
    restored = unpermute_rope_rows(_llama_cpp_permute(original, num_heads), num_heads)
    assert torch.equal(restored, original)


def test_unpermute_rejects_bad_head_count() -> None:
    with pytest.raises(ValueError, match="not a multiple"):
        unpermute_rope_rows(torch.zeros(10, 4), 3)


@pytest.mark.parametrize(("arch", "bias"), [("llama", False), ("llama", True), ("qwen2", True)])
def test_synthetic_gguf_round_trip(tmp_path: Path, arch: str, bias: bool) -> None:
    """HF weights -> (llama.cpp-style conversion) -> GGUF -> our loader == the HF weights."""
    config = tiny_config(attention_bias=bias)
    state = tiny_state_dict(config, redraw=RANDOM_VECTORS)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    tensors = _to_gguf_tensors(state, arch, config)
    # RoPE tables with no HF counterpart, which the config determines: must be skipped.
    tensors["rope_freqs.weight"] = torch.ones(8)
    tensors["blk.0.attn_rot_embd.weight"] = torch.ones(8)
    # One tensor stored as F16, with values that F16 holds exactly.
    f16_name = "blk.1.ffn_up.weight"
    state["model.layers.1.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"].half().float()
    tensors[f16_name] = state["model.layers.1.mlp.up_proj.weight"]
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, arch, tensors, num_heads=heads, num_kv_heads=kv_heads, f16=frozenset({f16_name}))

    loaded = dict(iter_gguf_weights(path, progress=False))
    assert set(loaded) == set(state)  # untied: lm_head comes from the `output` tensor
    for name, tensor in state.items():
        assert loaded[name].dtype == torch.float32
        assert torch.equal(loaded[name], tensor), name


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, "gpt2", {"token_embd.weight": torch.zeros(4, 4)}, num_heads=1, num_kv_heads=1)
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        next(iter_gguf_weights(path, progress=False))


# --------------------------------------------------------------------------- safetensors / HF dirs


def test_safetensors_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = save_tiny_model(tmp_path)
    config, state = tiny.config, tiny.state_dict()
    _no_network(monkeypatch)
    source = resolve_model(str(tmp_path))
    assert source.format == "hf"
    loaded = dict(iter_weights(source, progress=False))
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name

    hf_config = load_hf_config(source)
    assert hf_config.model_type == "llama"
    assert hf_config.to_dict()["hidden_size"] == config.hidden_size
    assert hf_config.num_key_value_heads == config.num_key_value_heads
    assert hf_config.tie_word_embeddings is False


def test_safetensors_tied_checkpoint_has_no_lm_head(tmp_path: Path) -> None:
    state = save_tiny_model(tmp_path, tiny_config(tie_word_embeddings=True)).state_dict()
    loaded = dict(iter_weights(resolve_model(str(tmp_path)), progress=False))
    assert set(state) - set(loaded) == {"lm_head.weight"}
    assert all(torch.equal(loaded[name], state[name]) for name in loaded)


def test_sharded_safetensors_honour_the_index(tmp_path: Path) -> None:
    state = save_tiny_model(tmp_path, max_shard_size="40KB").state_dict()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    # A Mistral-style consolidated file beside the shards must not be read.
    from safetensors.torch import save_file

    save_file({"tok_embeddings.weight": torch.zeros(2, 2)}, str(tmp_path / "consolidated.safetensors"))

    found = find_weight_files(tmp_path)
    assert found.kind == "safetensors"
    assert {p.name for p in found.files} == shards
    loaded = dict(iter_weights(resolve_model(str(tmp_path)), progress=False))
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[name], state[name]) for name in state)


def test_pytorch_bin_fallback(tmp_path: Path) -> None:
    state = save_tiny_model(tmp_path).state_dict()
    for file in tmp_path.glob("*.safetensors"):
        file.unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert find_weight_files(tmp_path).kind == "bin"
    loaded = dict(iter_weights(resolve_model(str(tmp_path)), progress=False))
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[name], state[name]) for name in state)


def test_hf_directory_without_weights(tmp_path: Path) -> None:
    tiny_config().save_pretrained(tmp_path)
    source = resolve_model(str(tmp_path))
    assert source.format == "hf"
    assert load_hf_config(source).hidden_size == 64  # enough for a dummy load
    with pytest.raises(FileNotFoundError, match="no weights"):
        next(iter_weights(source, progress=False))


# --------------------------------------------------------------------------- config without transformers

PRESETS = Path(__file__).resolve().parents[2] / "benchmarks" / "presets"


def _engine_view(hf: dict) -> tuple:
    """What the engine takes from a config: the architecture numbers and EngineArgs' reads."""
    from workers.models.llama import LlamaArgs

    return (
        LlamaArgs.from_hf(hf),
        (hf.get("architectures") or [None])[0],
        hf.get("max_position_embeddings"),
        hf.get("sliding_window"),
        hf.get("dtype") or hf.get("torch_dtype"),
        hf.get("eos_token_id"),
        hf.get("bos_token_id"),
    )


@pytest.mark.parametrize("preset", ["llama3-8b", "llama3.2-1b", "smollm2-135m", "llama3-70b"])
def test_llama_config_json_reads_as_transformers_does(preset: str) -> None:
    source = resolve_model(str(PRESETS / preset))
    raw = read_hf_config(source)
    assert raw == json.loads((PRESETS / preset / "config.json").read_text())  # the JSON fast path
    assert _engine_view(raw) == _engine_view(load_hf_config(source).to_dict())


def test_sparse_or_foreign_configs_go_through_transformers(tmp_path: Path) -> None:
    tiny_config().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rms_norm_eps"]  # an omitted key with a default: the fast path still applies
    del config["max_position_embeddings"]  # a required size missing: transformers fills it in
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = read_hf_config(resolve_model(str(tmp_path)))
    assert hf["max_position_embeddings"] == LlamaConfig().max_position_embeddings
    assert hf["rms_norm_eps"] == LlamaConfig().rms_norm_eps
