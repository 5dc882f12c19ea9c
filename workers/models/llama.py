"""The Llama family: Llama 2/3/3.1/3.2, Mistral, SmolLM2, Qwen2 (QKV bias), tied or untied heads.

The model takes flattened tokens of the whole step (no padding between sequences) and an
AttentionMetadata describing where each sequence's queries and KV blocks are. It exposes its parts
as ``workers/models/interface.py`` describes: embedding, decoder layers cut at their attention,
final norm and LM head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels import ops
from kernels.reference import build_rope_cache
from workers.attention import AttentionMetadata, paged_attention
from workers.distributed import TPGroup
from workers.models.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from workers.models.weight_loading import CheckpointLayout, StackedShard, load_checkpoint
from workers.quantization import UNQUANTIZED, QuantizationConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LlamaArgs:
    """The architecture numbers, read from an HF config dict."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaArgs:
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        scaling = rope if rope.get("rope_type", "default") != "default" else cfg.get("rope_scaling")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        is_qwen2 = arch == "Qwen2ForCausalLM" or cfg.get("model_type") == "qwen2"
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position=cfg.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 has biases on q/k/v only; Llama's attention_bias covers o_proj too.
            qkv_bias=bool(cfg.get("attention_bias", False)) or is_qwen2,
            o_proj_bias=bool(cfg.get("attention_bias", False)) and not is_qwen2,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """The RoPE table, one module shared by every layer's attention."""

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        # Computed on the CPU in fp32 (positions up to 128k need the precision), then placed on
        # the device the model is built on.
        table = build_rope_cache(args.head_dim, args.max_position, args.rope_theta, args.rope_scaling)
        self.register_buffer("cos_sin_cache", table.to(torch.get_default_device()), persistent=False)


class LlamaAttention(nn.Module):
    def __init__(
        self, args: LlamaArgs, tp: TPGroup, quant_config: QuantizationConfig, rotary_emb: RotaryEmbedding
    ) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            args.hidden_size,
            args.head_dim,
            args.num_heads,
            args.num_kv_heads,
            args.qkv_bias,
            tp,
            quant_config,
        )
        self.o_proj = RowParallelLinear(
            args.num_heads * args.head_dim, args.hidden_size, args.o_proj_bias, tp, quant_config
        )
        self.rotary_emb = rotary_emb
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5

    def project(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        slot_mapping: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q, k, v projected (into ``out`` when given) and rotated, k and v written to the cache;
        returns the projections [T, (Hq + 2 Hkv) D], q rotated in place."""
        qkv = self.qkv_proj(x, out=out)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q = qkv[:, :q_size].reshape(-1, self.num_heads, self.head_dim)
        k = qkv[:, q_size : q_size + kv_size].reshape(-1, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size :].reshape(-1, self.num_kv_heads, self.head_dim)
        ops.rope_write_kv(
            positions, q, k, v, kv_cache[0], kv_cache[1], slot_mapping, self.rotary_emb.cos_sin_cache
        )
        return qkv

    def attend(
        self,
        qkv: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Paged attention of the projected q over the cache: [T, H * D] (into ``out`` when given)."""
        q = qkv[:, : self.qkv_proj.q_size].reshape(-1, self.num_heads, self.head_dim)
        if out is not None:
            out = out.view(-1, self.num_heads, self.head_dim)
        out = paged_attention(q, kv_cache, meta, self.scale, out)
        return out.reshape(-1, self.num_heads * self.head_dim)


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs, tp: TPGroup, quant_config: QuantizationConfig) -> None:
        super().__init__()
        size = args.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            args.hidden_size, [size, size], args.mlp_bias, tp, quant_config
        )
        self.down_proj = RowParallelLinear(size, args.hidden_size, args.mlp_bias, tp, quant_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, args: LlamaArgs, tp: TPGroup, quant_config: QuantizationConfig, rotary_emb: RotaryEmbedding
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, tp, quant_config, rotary_emb)
        self.mlp = LlamaMLP(args, tp, quant_config)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention_input_width = self.self_attn.qkv_proj.out_per_rank
        self.attention_output_width = self.self_attn.num_heads * self.self_attn.head_dim

    def pre_attention(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input norm (adding the residual) and the attention's projections: (qkv, residual)."""
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        return self.self_attn.project(positions, x, kv_cache, slot_mapping, out), residual

    def attention(
        self,
        qkv: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.self_attn.attend(qkv, kv_cache, meta, out)

    def post_attention(
        self, attn_out: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Output projection, post-attention norm and MLP: (x, residual)."""
        x, residual = self.post_attention_layernorm(self.self_attn.o_proj(attn_out), residual)
        return self.mlp(x), residual

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, residual = self.pre_attention(positions, x, residual, kv_cache, meta.slot_mapping)
        return self.post_attention(self.attention(qkv, kv_cache, meta), residual)


class LlamaForCausalLM(nn.Module):
    # HF names: the decoder under `model.`, the head beside it; q/k/v and gate/up stored apart.
    CHECKPOINT_LAYOUT = CheckpointLayout(
        prefix="model.",
        unprefixed=("lm_head.",),
        stacked=(
            StackedShard(".q_proj.", ".qkv_proj.", "q"),
            StackedShard(".k_proj.", ".qkv_proj.", "k"),
            StackedShard(".v_proj.", ".qkv_proj.", "v"),
            StackedShard(".gate_proj.", ".gate_up_proj.", 0),
            StackedShard(".up_proj.", ".gate_up_proj.", 1),
        ),
        ignored=("rotary_emb.inv_freq",),
    )

    def __init__(
        self,
        hf_config: dict[str, Any],
        tp: TPGroup | None = None,
        quant_config: QuantizationConfig = UNQUANTIZED,
    ) -> None:
        super().__init__()
        tp = tp or TPGroup()
        self.args = args = LlamaArgs.from_hf(hf_config)
        self.tp = tp
        self.hidden_size = args.hidden_size
        self.embed_tokens = VocabParallelEmbedding(args.vocab_size, args.hidden_size, tp)
        self.rotary_emb = RotaryEmbedding(args)
        self.layers = nn.ModuleList(
            [LlamaDecoderLayer(args, tp, quant_config, self.rotary_emb) for _ in range(args.num_layers)]
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = ParallelLMHead(args.vocab_size, args.hidden_size, tp)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(positions, x, residual, kv_cache, meta)
        return self.final_norm(x, residual)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def final_norm(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.norm(x, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    # ------------------------------------------------------------------ weights
    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], *, describe: Callable[[str], str] = repr
    ) -> None:
        """Fill the parameters from HF-named full tensors (see ``weight_loading.load_checkpoint``)."""
        # Tied: the embedding is the head, so a stored head has nothing to fill.
        skip = frozenset({"lm_head.weight"}) if self.args.tie_word_embeddings else frozenset()
        load_checkpoint(self, weights, self.CHECKPOINT_LAYOUT, skip=skip, describe=describe)


def dummy_checkpoint(
    hf_config: dict[str, Any], seed: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """A random checkpoint with HF tensor names (load_format='dummy'), reproducible from ``seed``
    on a given device type (generated where it is used: 70B of random numbers is minutes of CPU).

    Generated at full size and loaded through the same sharding path as a real checkpoint, so
    every tensor-parallel size sees the same model, and HF transformers can load it too.
    """
    args = LlamaArgs.from_hf(hf_config)
    h, d, inter = args.hidden_size, args.head_dim, args.intermediate_size
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (args.vocab_size, h))]
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (args.num_heads * d, h)),
            (p + "self_attn.k_proj.weight", (args.num_kv_heads * d, h)),
            (p + "self_attn.v_proj.weight", (args.num_kv_heads * d, h)),
            (p + "self_attn.o_proj.weight", (h, args.num_heads * d)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
        if args.qkv_bias:
            shapes += [
                (p + "self_attn.q_proj.bias", (args.num_heads * d,)),
                (p + "self_attn.k_proj.bias", (args.num_kv_heads * d,)),
                (p + "self_attn.v_proj.bias", (args.num_kv_heads * d,)),
            ]
        if args.o_proj_bias:
            shapes.append((p + "self_attn.o_proj.bias", (h,)))
        if args.mlp_bias:
            shapes += [
                (p + "mlp.gate_proj.bias", (inter,)),
                (p + "mlp.up_proj.bias", (inter,)),
                (p + "mlp.down_proj.bias", (h,)),
            ]
    shapes.append(("model.norm.weight", (h,)))
    if not args.tie_word_embeddings:
        shapes.append(("lm_head.weight", (args.vocab_size, h)))
    for index, (name, shape) in enumerate(shapes):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, device=device)
            continue
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
        yield (
            name,
            torch.empty(shape, device=device, dtype=torch.float32).uniform_(-0.05, 0.05, generator=gen),
        )
