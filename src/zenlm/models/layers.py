"""Building blocks of a decoder-only Transformer: norms, rotary positions, attention, MLPs.

Shape letters used in tensor names:
    B batch, T new positions in this call, S positions attended over (keys), C model width,
    H query heads, K key/value heads, D head dim, F MLP hidden width.

Each piece is a small ``nn.Module`` that does one thing; :mod:`zenlm.models.gpt` composes them into blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from zenlm.config import GPTConfig

# ``enable_gqa`` (keys/values shared by groups of query heads, without copying them) arrived in torch 2.5.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


# ---------------------------------------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): ``y = x / sqrt(mean(x**2, last dim) + eps) * weight``.

    No centring and no bias, only a learned per-channel gain ``weight`` (initialised to 1).
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., dim] -> [..., dim]"""
        # F.rms_norm computes exactly the formula in the docstring, in one fused kernel (which needs the
        # weight in x's dtype: under autocast, q and k reach the qk-norm in bf16).
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    """The norm the config asks for, over the last ``dim`` (default: the model width) channels.

    "layernorm": ``(x - mean) / sqrt(var + eps) * weight + bias`` (bias only when ``config.bias``).
    "rmsnorm":   :class:`RMSNorm`.
    """
    dim = config.n_embd if dim is None else dim
    if config.norm == "rmsnorm":
        return RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


# ------------------------------------------------------------------------------------ rotary positions


class Rotary(nn.Module):
    """Rotary position embedding (RoPE) tables, precomputed for positions ``0 .. max_len-1``.

    Channel pair ``(i, i + D/2)`` of a head at position ``t`` is rotated by the angle
    ``t * theta ** (-2i / D)``. This is the "rotate half" layout used by Llama and Hugging Face, so
    weights imported from there need no permutation. The tables are non-persistent buffers: they follow
    ``.to(device)`` but are not saved in the state dict.
    """

    def __init__(
        self, head_dim: int, max_len: int, theta: float = 10000.0, scaling: dict | None = None
    ) -> None:
        super().__init__()
        inv_freq_D2 = rope_frequencies(head_dim, theta, scaling)
        t_T = torch.arange(max_len, dtype=torch.float64)
        angles_TD2 = torch.outer(t_T, inv_freq_D2)
        angles_TD = torch.cat([angles_TD2, angles_TD2], dim=-1)
        self.register_buffer("cos", angles_TD.cos().float(), persistent=False)  # [max_len, D]
        self.register_buffer("sin", angles_TD.sin().float(), persistent=False)  # [max_len, D]

    def forward(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """cos and sin for absolute positions ``start .. start+length-1``, each [length, D]."""
        return self.cos[start : start + length], self.sin[start : start + length]


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> Tensor:
    """The D/2 rotation frequencies ``theta ** (-2i / D)`` (float64), optionally rescaled for longer contexts:

    "linear":  every frequency divided by ``factor`` (positions interpolated);
    "llama3":  Llama 3.1's rule: wavelengths ``2*pi/f`` longer than ``original_max_position_embeddings /
               low_freq_factor`` are divided by ``factor``, those shorter than ``... / high_freq_factor`` are
               kept, and the band in between blends the two smoothly.
    """
    inv_freq_D2 = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq_D2
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq_D2 / factor
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen_D2 = 2 * math.pi / inv_freq_D2
    scaled_D2 = torch.where(wavelen_D2 > old_len / low, inv_freq_D2 / factor, inv_freq_D2)
    smooth_D2 = (old_len / wavelen_D2 - low) / (high - low)
    blended_D2 = (1 - smooth_D2) * scaled_D2 / factor + smooth_D2 * scaled_D2
    medium_D2 = (wavelen_D2 >= old_len / high) & (wavelen_D2 <= old_len / low)
    return torch.where(medium_D2, blended_D2, scaled_D2)


def rotate_half(x: Tensor) -> Tensor:
    """[..., D] -> [..., D]: (x1, x2) -> (-x2, x1) where x1, x2 are the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x_BHTD: Tensor, cos_TD: Tensor, sin_TD: Tensor) -> Tensor:
    """Rotate queries or keys by their positions: ``x * cos + rotate_half(x) * sin``."""
    cos_TD, sin_TD = cos_TD.to(x_BHTD.dtype), sin_TD.to(x_BHTD.dtype)
    return x_BHTD * cos_TD + rotate_half(x_BHTD) * sin_TD


# ------------------------------------------------------------------------------------------ attention


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional grouped-query heads, qk-norm and rotary positions.

        q, k, v = split(x @ W_qkv)                 # H query heads, K key/value heads (K divides H)
        q, k    = rmsnorm(q), rmsnorm(k)           # per head, if qk_norm
        q, k    = rotary(q), rotary(k)             # if rope
        y       = softmax(q k^T / sqrt(D) + causal mask) v
        out     = y @ W_proj

    With a KV cache the new keys/values are written into the cache at positions ``pos .. pos+T-1`` and
    the queries attend over all cached positions ``0 .. pos+T-1``.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_kv_head is not None  # filled in by GPTConfig.__post_init__
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        qkv_out = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.qkv = nn.Linear(config.n_embd, qkv_out, bias=bool(config.qkv_bias))  # fused q, k, v projections
        self.proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=bool(config.attn_proj_bias))
        if config.qk_norm:
            self.q_norm: nn.Module | None = RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm: nn.Module | None = RMSNorm(self.head_dim, eps=config.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x_BTC: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        kv_cache: tuple[Tensor, Tensor, int] | None = None,
        mask_TS: Tensor | None = None,
        is_causal: bool = True,
    ) -> Tensor:
        """x_BTC: [B, T, C] -> [B, T, C].

        rope:      (cos_TD, sin_TD) for the T new positions, or None (no rotary positions)
        kv_cache:  (k_cache_BKSD, v_cache_BKSD, pos) preallocated buffers of this layer and the number of
                   positions already filled; None means attention over the T new positions only
        mask_TS:   boolean mask [T, S] (True = may attend), S = pos + T keys; None = no mask
        is_causal: causal mask over a square T x T score matrix (cannot be combined with mask_TS). With a
                   cache and pos > 0 use mask_TS (T > 1) or nothing (T == 1) instead: SDPA's is_causal
                   aligns the mask top-left when T < S, which would hide the cached keys.
        """
        B, T, _ = x_BTC.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q_BHTD, k_BKTD, v_BKTD = self.heads(x_BTC, rope)
        # Norms may run in fp32 under autocast while v is bf16: attention wants one dtype.
        q_BHTD, k_BKTD = q_BHTD.to(v_BKTD.dtype), k_BKTD.to(v_BKTD.dtype)

        if kv_cache is None:
            k_BKSD, v_BKSD = k_BKTD, v_BKTD
        else:
            k_cache, v_cache, pos = kv_cache
            k_cache[:, :, pos : pos + T] = k_BKTD  # write in place: no reallocation per step
            v_cache[:, :, pos : pos + T] = v_BKTD
            k_BKSD, v_BKSD = k_cache[:, :, : pos + T], v_cache[:, :, : pos + T]
            if k_BKSD.dtype != q_BHTD.dtype:  # a cache kept in another precision than the activations
                k_BKSD, v_BKSD = k_BKSD.to(q_BHTD.dtype), v_BKSD.to(q_BHTD.dtype)

        gqa = K != H
        if gqa and not _SDPA_HAS_GQA:  # old torch: give every query head its own copy of its k/v head
            k_BKSD, v_BKSD = k_BKSD.repeat_interleave(H // K, 1), v_BKSD.repeat_interleave(H // K, 1)
        extra = {"enable_gqa": True} if gqa and _SDPA_HAS_GQA else {}
        y_BHTD = attention(q_BHTD, k_BKSD, v_BKSD, attn_mask=mask_TS,
                           dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal, **extra)
        y_BTC = y_BHTD.transpose(1, 2).reshape(B, T, H * D)
        return self.proj(y_BTC)

    def heads(self, x_BTC: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The fused projection split into heads: [B, T, C] -> q [B, H, T, D], k and v [B, K, T, D], with the
        optional q/k norm and rotary positions applied (rope: cos/sin broadcastable to [B, H, T, D])."""
        B, T, _ = x_BTC.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.qkv(x_BTC).view(B, T, H + 2 * K, D)
        q_BTHD, k_BTKD, v_BTKD = qkv.split([H, K, K], dim=2)
        if self.q_norm is not None and self.k_norm is not None:
            q_BTHD, k_BTKD = self.q_norm(q_BTHD), self.k_norm(k_BTKD)
        q_BHTD, k_BKTD, v_BKTD = q_BTHD.transpose(1, 2), k_BTKD.transpose(1, 2), v_BTKD.transpose(1, 2)
        if rope is not None:
            q_BHTD, k_BKTD = apply_rotary(q_BHTD, *rope), apply_rotary(k_BKTD, *rope)
        return q_BHTD, k_BKTD, v_BKTD


def attention(q: Tensor, k: Tensor, v: Tensor, **sdpa_kwargs: object) -> Tensor:
    """``F.scaled_dot_product_attention`` (softmax(q k^T / sqrt(D) + mask) v), computed in fp32 when q is
    bf16/fp16 on a CPU (the result comes back in q's dtype; the projections around it stay in bf16).

    PyTorch's CPU attention kernels are slower in bf16 than in fp32: the *backward* about 3.5x (18 ms vs 5 ms
    per call at B=32, T=64, 4 heads of 32), and a decode step's one query over 100 keys (12 heads of 64)
    about 4x (~110-180 us vs ~30-40 us; 12 such calls are ~20% of an int8 GPT-2 step). Every attention of
    the models goes through here, so training, prefill and decoding all attend the same way."""
    low = q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu"
    if not low:
        return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)  # type: ignore[arg-type]
    mask = sdpa_kwargs.get("attn_mask")
    if isinstance(mask, Tensor) and mask.is_floating_point():
        sdpa_kwargs = {**sdpa_kwargs, "attn_mask": mask.float()}
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **sdpa_kwargs)  # type: ignore[arg-type]
    return y if torch.is_autocast_enabled("cpu") else y.to(q.dtype)


# ------------------------------------------------------------------------------------------------ MLPs


def matvec(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w^T`` for one row, written as a multiply-and-sum: x [..., K] (one row in all), w [N, K] of any
    dtype (int8 too) -> [..., N] in x's dtype, summed in fp32.

    Eagerly this is slower than ``F.linear`` (it builds the whole [N, K] product); it exists for
    ``torch.compile``, which fuses it into one loop that streams each row of w once and widens it to fp32 in
    registers: a matrix-vector product at memory speed (see :mod:`zenlm.compiled`).
    """
    return (x.float().unsqueeze(-2) * w.float()).sum(-1).to(x.dtype)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (GPT-2's ``gelu_new``)."""
    return F.gelu(x, approximate="tanh")


def relu_squared(x: Tensor) -> Tensor:
    """relu(x)**2 (squared ReLU, Primer)."""
    return F.relu(x).square()


class MLP(nn.Module):
    """Two-layer feed-forward: ``proj(act(fc(x)))``, C -> F -> C."""

    def __init__(self, n_embd: int, hidden: int, bias: bool, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.act = act
        self.proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x_BTC: Tensor) -> Tensor:
        """[B, T, C] -> [B, T, C]"""
        return self.proj(self.act(self.fc(x_BTC)))


class SwiGLU(nn.Module):
    """Gated feed-forward (Llama): ``proj(silu(gate(x)) * up(x))``, C -> F -> C.

    ``gate`` and ``up`` are two separate matrices (not one fused matrix) so that each is a plain
    [F, C] weight: this maps one-to-one onto Llama's gate_proj / up_proj and lets matrix-wise
    optimisers treat them as the two independent matrices they are.
    """

    def __init__(self, n_embd: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(n_embd, hidden, bias=bias)
        self.up = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x_BTC: Tensor) -> Tensor:
        """[B, T, C] -> [B, T, C]"""
        return self.proj(F.silu(self.gate(x_BTC)) * self.up(x_BTC))


def make_mlp(config: GPTConfig) -> nn.Module:
    """The feed-forward the config asks for: "gelu" (GPT-2), "relu2" or "swiglu" (Llama).

    Every variant names its output matrix ``proj`` (the GPT-2-style scaled initialisation finds it there).
    """
    assert config.mlp_hidden is not None  # filled in by GPTConfig.__post_init__
    bias = bool(config.mlp_bias)
    if config.mlp == "swiglu":
        return SwiGLU(config.n_embd, config.mlp_hidden, bias)
    act = gelu_tanh if config.mlp == "gelu" else relu_squared
    return MLP(config.n_embd, config.mlp_hidden, bias, act)


def scaled_init_std(config: GPTConfig) -> float:
    """GPT-2's std for the output projections of each residual branch: init_std / sqrt(2 * n_layer)."""
    return config.init_std / math.sqrt(2 * config.n_layer)


__all__ = [
    "RMSNorm",
    "make_norm",
    "Rotary",
    "rope_frequencies",
    "rotate_half",
    "apply_rotary",
    "CausalSelfAttention",
    "MLP",
    "SwiGLU",
    "make_mlp",
    "gelu_tanh",
    "relu_squared",
    "scaled_init_std",
]
