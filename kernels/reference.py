"""Plain-torch reference implementations of every kernel.

These are the executable specification: each Triton kernel in ``kernels/triton/`` has the same
signature (less its launch configuration) and is tested against the function here. On CPU the
engine runs these directly, except ``linear_ref``: projections run torch's GEMM on every device
(``kernels.ops.linear``), and the Triton GEMM is one that a measured plan may choose on CUDA.

KV cache layout (decided once, used everywhere):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]  (NHD, one pair per layer)
    A token's slot is ``block_id * block_size + offset``; ``slot_mapping`` holds one slot per new
    token, -1 for padding tokens that must not be written.
    block_tables: int32 [num_seqs, max_blocks_per_seq], row s lists the blocks of sequence s in order.
    seq_lens: int32 [num_seqs], the context length of each sequence *including* this step's tokens.
    query_start_loc: int32 [num_seqs + 1], cumulative query lengths (the new tokens of this step).
The query tokens of sequence s sit at absolute positions seq_len - q_len .. seq_len - 1, so a
query token at position p attends to keys 0..p (causal mask offset by the cached length).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def linear_ref(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [M, N], written when given
) -> torch.Tensor:
    """``x W^T (+ b)`` as a plain matmul in fp32, rounded once to x's dtype: the specification of
    the Triton GEMM (kernels/triton/linear.py), which accumulates in fp32 the same way. The engine
    runs torch's own GEMM (``kernels.gemm.torch_linear``, cuBLAS on CUDA), not this."""
    y = x.float() @ weight.float().t()
    if bias is not None:
        y += bias.float()
    if out is None:
        return y.to(x.dtype)
    return out.copy_(y)


def write_kv_ref(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [T], -1 = skip
) -> None:
    block_size = k_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[valid].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[valid].to(v_cache.dtype)


def paged_attention_ref(
    query: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # int32 [S, max_blocks]
    seq_lens: torch.Tensor,  # int32 [S]
    query_start_loc: torch.Tensor,  # int32 [S + 1]
    scale: float,
    out: torch.Tensor | None = None,  # [T, Hq, D]
) -> torch.Tensor:
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    if out is None:
        out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[s], starts[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        blocks = block_tables[s, : math.ceil(seq_len / block_size)].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)
        q = query[q_start:q_end].transpose(0, 1)  # [Hq, q_len, D]
        # Query i sits at position seq_len - q_len + i and sees keys 0 .. that position.
        mask = None
        if q_len > 1:
            q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
            mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
        attn = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=mask, scale=scale, enable_gqa=num_heads != num_kv_heads
        )
        out[q_start:q_end] = attn.transpose(0, 1).to(out.dtype)
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, cast back, then scale."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual <- x + residual; x <- rms_norm(residual). Returns (x, residual)."""
    residual.add_(x)
    x.copy_(rms_norm_ref(residual, weight, eps))
    return x, residual


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: [M, 2I] holding gate || up; returns silu(gate) * up, [M, I]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies, with the llama3 scaling when ``scaling['rope_type'] == 'llama3'``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported")
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_rope_cache(
    head_dim: int, max_position: int, theta: float, scaling: dict | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[max_position, head_dim] fp32: cos in the first half of each row, sin in the second."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling).to(device)
    positions = torch.arange(max_position, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope_ref(
    positions: torch.Tensor,  # int64 [T]
    query: torch.Tensor,  # [T, Hq, D]
    key: torch.Tensor,  # [T, Hkv, D]
    cos_sin_cache: torch.Tensor,  # [max_position, D] fp32
) -> None:
    """NeoX-style (rotate halves, as HF Llama) rotary embedding, applied to q and k in place."""
    half = query.shape[-1] // 2
    cos_sin = cos_sin_cache[positions]
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    for x in (query, key):
        x32 = x.float()
        x1, x2 = x32[..., :half], x32[..., half:]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        x.copy_(rotated.to(x.dtype))


def rope_write_kv_ref(
    positions: torch.Tensor,  # int64 [T]
    query: torch.Tensor,  # [T, Hq, D], rotated in place
    key: torch.Tensor,  # [T, Hkv, D], left as it is
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # int64 [T], -1 = skip
    cos_sin_cache: torch.Tensor,  # [max_position, D] fp32
) -> None:
    """apply_rope_ref then write_kv_ref, except that key itself is not rotated: only its cache copy is."""
    rotated_key = key.clone()
    apply_rope_ref(positions, query, rotated_key, cos_sin_cache)
    write_kv_ref(rotated_key, value, k_cache, v_cache, slot_mapping)


# splitmix64 constants (Steele, Lea, Flood), as signed int64: torch integer arithmetic wraps.
_SPLITMIX_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
_SPLITMIX_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_SPLITMIX_M2 = 0x94D049BB133111EB - (1 << 64)


def _logical_shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x >> bits`` on the 64-bit pattern (int64 ``>>`` is arithmetic: clear the copied sign bits)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def seed_uniform_ref(seeds: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) per int64 seed: splitmix64 of the seed, top 24 bits. fp32 [B].

    A counter-based draw: a function of the seed alone, computed for the whole batch at once (no
    generator object, no state)."""
    z = seeds.to(torch.int64) + _SPLITMIX_GAMMA
    z = (z ^ _logical_shift(z, 30)) * _SPLITMIX_M1
    z = (z ^ _logical_shift(z, 27)) * _SPLITMIX_M2
    z = z ^ _logical_shift(z, 31)
    return _logical_shift(z, 40).to(torch.float32) * 2.0**-24


def sample_race_ref(
    logits: torch.Tensor,  # [B, V], any float dtype
    temperature: torch.Tensor,  # fp32 [B]; < 1e-5 = greedy
    seeds: torch.Tensor,  # int64 [B]
    rows: torch.Tensor | None = None,  # int64 [R]: sample only these rows (None: every row)
    scratch: bool = False,  # the caller is done with fp32 ``logits``: they may be overwritten
) -> torch.Tensor:
    """A token from ``softmax(logits / T)`` per row (greedy rows: the argmax, lowest index on
    ties); int64 [B], or [R] for the rows ``rows`` names. ``logits`` is not modified unless
    ``scratch`` allows it.

    A row's token depends only on its logits and its seed. The Triton kernel samples the same
    distribution as ``argmax(logits / T + Gumbel)`` with Philox noise per token; this reference
    inverts the row's cumulative distribution at one uniform drawn from the seed
    (``seed_uniform_ref``), which needs one random number per row instead of one per token: the
    same distribution and the same determinism, not the same bits.
    """
    if rows is not None:
        temperature, seeds = temperature[rows], seeds[rows]
    greedy = temperature < 1e-5
    if bool(greedy.all()):
        return (logits if rows is None else logits.index_select(0, rows)).argmax(dim=-1)
    if rows is not None:
        x = logits.index_select(0, rows).float()  # a copy already: worked on in place below
    else:
        x = logits.float() if scratch else logits.to(torch.float32, copy=True)
    argmax = x.argmax(dim=-1) if bool(greedy.any()) else None
    # exp2 of (x - max) * log2(e) / T: torch's exp2 keeps its fast path for -inf (masked
    # tokens), where exp takes a slow one.
    top = x.amax(dim=-1, keepdim=True)
    x -= torch.where(top.isfinite(), top, 0.0)  # an all -inf row has no mass, not NaNs
    x *= (math.log2(math.e) / torch.where(greedy, 1.0, temperature))[:, None]
    cdf = x.exp2_().cumsum_(dim=-1)
    # u <= 1 - 2^-24 keeps u * total below total in fp32, so some cdf entry exceeds it; the first
    # one that does has positive mass (a zero-mass token repeats its predecessor's cdf value).
    target = seed_uniform_ref(seeds)[:, None] * cdf[:, -1:]
    sampled = torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=x.shape[1] - 1)
    return sampled if argmax is None else torch.where(greedy, argmax, sampled)


def apply_token_bitmask_ref(
    logits: torch.Tensor,  # [B, V], modified in place
    bitmask: torch.Tensor,  # int32 [R, W], W >= ceil(V / 32); bit j of word w allows token 32 w + j
    rows: torch.Tensor,  # int64 [R]: the rows of ``logits`` the bitmask rows apply to
) -> None:
    """Set to -inf every token of the named rows whose bit is clear (the structured-output mask,
    packed as xgrammar and vLLM pack it)."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
