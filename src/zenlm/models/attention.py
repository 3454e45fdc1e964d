"""Attention, once: the module every model uses (GPT, BERT, the encoder-decoder, decoding) and its formula.

    q, k, v = split(x @ W_qkv)                     # self-attention: H query heads, K key/value heads (K | H)
    q       = x @ W_q;  k, v = split(m @ W_kv)     # cross-attention: keys/values from the encoder's memory m
    q, k    = rmsnorm(q), rmsnorm(k)               # per head, if qk_norm
    q, k    = rotary(q), rotary(k)                 # if the model uses rotary positions (self-attention)
    k, v    = cache.update(k, v)                   # with a KV cache: append, then read every cached position
    y       = softmax(q k^T / sqrt(D) + mask) v    # each query head reads its group's key/value head
    out     = y @ W_proj

Four functions compute the line with the softmax:

- :func:`attention`: PyTorch's fused ``scaled_dot_product_attention``, with one rule of ours: on a CPU, bf16 and
  fp16 inputs are attended in fp32 (faster there, see its docstring). Everything goes through it, except:
- :func:`decode_attention`: one query per row, written out as two batched products and a softmax in fp32; what
  a compiled CPU decode step runs (faster there than the fused kernel, see its docstring).
- :func:`reference_attention`: the same formula written out with explicit matrix products; it also returns
  the attention weights ``softmax(q k^T / sqrt(D) + mask)``. Tests hold :func:`attention` to it, and it is the
  one to read when learning what attention computes (or to extract attention maps).
- :meth:`Attention.attend`: picks the masking for the call (causal, an explicit mask, or per-row key counts).

Which keys a query may see is said by one of: ``is_causal`` (query t sees keys 0..t of a square T x T score
matrix), ``mask`` (boolean, True = may attend, or additive float, broadcastable to [B, H, T, S]) or
``row_keys`` (row b sees its first ``row_keys[b]`` keys; one call per row, see :meth:`GPT.decode_step`).

Shape letters: B batch, T queries (new positions), S keys, C model width, H query heads, K key/value heads,
D head dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from zenlm.models.cache import LayerCache
from zenlm.models.layers import RMSNorm, apply_rotary

# Whether a compiled CPU decode step attends through decode_attention (True) or the fused kernel, like every
# other call (benchmarks/batched_step.py sets it to compare both; a program built with one setting is kept on disk
# under the same key as the other, so a comparison builds its programs in a directory of its own).
WRITTEN_DECODE_ATTENTION = True

# ``enable_gqa`` (keys/values shared by groups of query heads, without copying them) arrived in torch 2.5.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def attention(q: Tensor, k: Tensor, v: Tensor, **sdpa_kwargs: object) -> Tensor:
    """``F.scaled_dot_product_attention`` (softmax(q k^T / sqrt(D) + mask) v), computed in fp32 when q is
    bf16/fp16 on a CPU (the result comes back in q's dtype; the projections around it stay in bf16).

    PyTorch's CPU attention kernels are slower in bf16 than in fp32: the *backward* about 3.5x (18 ms vs 5 ms
    per call at B=32, T=64, 4 heads of 32), and a decode step's one query over 100 keys (12 heads of 64)
    about 4x (~110-180 us vs ~30-40 us; 12 such calls are ~20% of an int8 GPT-2 step). Every attention of
    the models goes through here, so training, prefill and decoding all attend the same way."""
    low = q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu"
    mask = sdpa_kwargs.get("attn_mask")
    if isinstance(mask, Tensor) and mask.is_floating_point():  # an additive mask: in the dtype attended in
        sdpa_kwargs = {**sdpa_kwargs, "attn_mask": mask.to(torch.float32 if low else q.dtype)}
    if not low:
        return F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)  # type: ignore[arg-type]
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **sdpa_kwargs)  # type: ignore[arg-type]
    return y if torch.is_autocast_enabled("cpu") else y.to(q.dtype)


def reference_attention(
    q_BHTD: Tensor, k_BKSD: Tensor, v_BKSD: Tensor, mask: Tensor | None = None, *, is_causal: bool = False
) -> tuple[Tensor, Tensor]:
    """The attention formula with explicit matrix products -> (y [B, H, T, D], weights [B, H, T, S]).

        scores  = q k^T / sqrt(D)                   # [B, H, T, S]: how well query t matches key s
        scores  = scores + mask                     # -inf where a query may not look (or a float bias)
        weights = softmax(scores over s)            # each query's weights sum to 1
        y       = weights v                         # a weighted mean of the values

    q_BHTD [B, H, T, D]; k_BKSD, v_BKSD [B, K, S, D] with K dividing H (query head h reads key/value head
    h // (H / K): grouped-query attention); mask boolean (True = may attend) or float (added), broadcastable
    to [B, H, T, S]; is_causal: query t sees keys 0..t (the mask's top-left triangle, as SDPA aligns it).
    Computed in q's dtype. Slower than :func:`attention` (it builds the whole [T, S] weight matrix) and meant
    for reading, testing and attention maps. A query that may see no key at all gets NaN weights, as SDPA.
    """
    H, K, D = q_BHTD.shape[1], k_BKSD.shape[1], q_BHTD.shape[-1]
    if K != H:  # give every query head its own copy of its group's key/value head
        k_BKSD, v_BKSD = k_BKSD.repeat_interleave(H // K, dim=1), v_BKSD.repeat_interleave(H // K, dim=1)
    scores_BHTS = q_BHTD @ k_BKSD.transpose(-2, -1) / math.sqrt(D)
    if is_causal:
        T, S = scores_BHTS.shape[-2:]
        causal_TS = torch.ones(T, S, dtype=torch.bool, device=q_BHTD.device).tril()
        scores_BHTS = scores_BHTS.masked_fill(~causal_TS, float("-inf"))
    if mask is not None:
        scores_BHTS = scores_BHTS.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else \
            scores_BHTS + mask.to(scores_BHTS.dtype)
    weights_BHTS = torch.softmax(scores_BHTS, dim=-1)
    return weights_BHTS @ v_BKSD, weights_BHTS


def decode_attention(q_BH1D: Tensor, k_BKSD: Tensor, v_BKSD: Tensor, mask: Tensor | None = None) -> Tensor:
    """Attention of one new query per row (a decode step), written out for a compiled CPU step -> [B, H, 1, D].

        scores = q k^T / sqrt(D)          # [B, K, G, S]: the G = H / K query heads of a group share its keys
        p      = exp(scores - max_s)      # masked keys (mask False) get exp(-inf) = 0
        y      = (p v) / sum_s p          # normalised after the product: D divisions instead of S

    The same formula as :func:`attention`, always in fp32 (the result comes back in q's dtype). Only the
    compiled decode step (:mod:`zenlm.compiled`) takes it, where Inductor fuses the fp32 conversion of a bf16
    cache into its reads; run eagerly it would copy the cache. On a 2-core Xeon a 16-row bf16 GPT-2 step was
    1.14x / 1.28x / 2.5x faster with it than with the fused kernel over 128 / 256 / 512 keys (the kernel's fp32
    copies of a bf16 cache cost most at large S), an fp32 step level (``benchmarks/batched_step.py``). A row's
    result does not depend on how many key slots the call reads past its own (those add exact zeros), nor on
    the other rows: tests/test_attention.py holds it to that.

    q_BH1D [B, H, 1, D]; k_BKSD, v_BKSD [B, K, S, D] with K dividing H; mask: boolean (True = may attend)
    broadcastable to [B, 1, 1, S], or None (every key).
    """
    B, H, _, D = q_BH1D.shape
    K = k_BKSD.shape[1]
    q_BKGD = q_BH1D.reshape(B, K, H // K, D).float()
    scores_BKGS = (q_BKGD @ k_BKSD.float().transpose(-1, -2)) * (1.0 / math.sqrt(D))
    if mask is not None:
        scores_BKGS = scores_BKGS.masked_fill(~mask, float("-inf"))
    p_BKGS = (scores_BKGS - scores_BKGS.amax(-1, keepdim=True)).exp()
    y_BKGD = (p_BKGS @ v_BKSD.float()) / p_BKGS.sum(-1, keepdim=True)
    return y_BKGD.reshape(B, H, 1, D).to(q_BH1D.dtype)


def cached_causal_mask(pos: int, T: int, device: torch.device) -> tuple[Tensor | None, bool]:
    """The causal masking of T new queries at positions ``pos .. pos+T-1`` over keys ``0 .. pos+T-1`` (a KV
    cache holding ``pos`` earlier positions) -> (mask_TS or None, is_causal).

    Query t (absolute position pos+t) may see keys 0..pos+t: the plain causal flag when nothing is cached yet,
    nothing for a single new token (it sees every key), else an explicit boolean [T, pos+T] mask. (SDPA's
    is_causal aligns its triangle top-left when T < S, which would hide the cached keys.)
    """
    if pos == 0:
        return None, True
    if T == 1:
        return None, False
    q_pos_T1 = torch.arange(pos, pos + T, device=device)[:, None]
    return torch.arange(pos + T, device=device)[None, :] <= q_pos_T1, False


class Attention(nn.Module):
    """Multi-head attention with optional grouped-query heads, qk-norm, rotary positions and a KV cache.

    Sizes are given explicitly: n_embd (C, the width in and out), n_head (H), n_kv_head (K, default H;
    must divide H), head_dim (D, default C // H). ``cross=True`` makes a cross-attention: queries from x,
    keys and values from a memory (the encoder's output) given as :meth:`memory_kv`.

    Parameters (their names are the state-dict keys that checkpoints and converters rely on):
        self-attention:  ``qkv`` [(H + 2K) * D, C] (q, k, v stacked along the output), ``proj`` [C, H * D]
        cross-attention: ``q`` [H * D, C], ``kv`` [2K * D, C] (k then v), ``proj`` [C, H * D]
        qk_norm:         ``q_norm``, ``k_norm`` (RMSNorm over D, shared by the heads)

    dropout applies to the attention weights while training.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        *,
        n_kv_head: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        cross: bool = False,
    ) -> None:
        super().__init__()
        self.n_head = n_head
        self.n_kv_head = n_head if n_kv_head is None else n_kv_head
        self.head_dim = n_embd // n_head if head_dim is None else head_dim
        assert self.n_head % self.n_kv_head == 0, "n_kv_head must divide n_head (configs check this)"
        self.dropout = dropout
        self.cross = cross
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        if cross:
            self.q = nn.Linear(n_embd, H * D, bias=qkv_bias)
            self.kv = nn.Linear(n_embd, 2 * K * D, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(n_embd, (H + 2 * K) * D, bias=qkv_bias)  # fused q, k, v projections
        self.proj = nn.Linear(H * D, n_embd, bias=proj_bias)
        if qk_norm:
            self.q_norm: nn.Module | None = RMSNorm(D, eps=norm_eps)
            self.k_norm: nn.Module | None = RMSNorm(D, eps=norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x_BTC: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: LayerCache | None = None,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        row_keys: Sequence[int] | None = None,
    ) -> Tensor:
        """x_BTC [B, T, C] -> [B, T, C].

        rope:      (cos, sin) for the T new positions, broadcastable to [B, H, T, D] (self-attention only)
        cache:     this layer's :class:`~zenlm.models.cache.LayerCache`: the new keys/values are written into it
                   and the queries attend over every key it then holds; None: over the T new ones only
        memory_kv: cross-attention: the memory's keys and values from :meth:`memory_kv`
        mask / is_causal / row_keys: which keys each query sees (see the module docstring)
        """
        B, T, _ = x_BTC.shape
        if self.cross:
            assert memory_kv is not None, "cross-attention needs the memory's keys and values"
            k_BKSD, v_BKSD = memory_kv
            q_BHTD = self.q(x_BTC).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        else:
            q_BHTD, k_BKSD, v_BKSD = self.heads(x_BTC, rope)
        if q_BHTD.dtype != v_BKSD.dtype or k_BKSD.dtype != v_BKSD.dtype:
            # norms may run in fp32 under autocast while v is bf16: attention wants one dtype
            q_BHTD, k_BKSD = q_BHTD.to(v_BKSD.dtype), k_BKSD.to(v_BKSD.dtype)
        if cache is not None:
            k_BKSD, v_BKSD = cache.update(k_BKSD, v_BKSD)
            if k_BKSD.dtype != q_BHTD.dtype:  # a cache kept in another precision than the activations
                k_BKSD, v_BKSD = k_BKSD.to(q_BHTD.dtype), v_BKSD.to(q_BHTD.dtype)
        y_BHTD = self.attend(q_BHTD, k_BKSD, v_BKSD, mask=mask, is_causal=is_causal, row_keys=row_keys)
        return self.proj(y_BHTD.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))

    def heads(self, x_BTC: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention's fused projection split into heads: [B, T, C] -> q [B, H, T, D], k and v
        [B, K, T, D], with the optional q/k norm and rotary positions applied."""
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

    def memory_kv(self, memory_BSC: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention's keys and values of the memory: [B, S, C] -> ([B, K, S, D], [B, K, S, D]).
        Computed once per source in generation (:class:`~zenlm.models.cache.Seq2SeqCache`)."""
        B, S, _ = memory_BSC.shape
        kv = self.kv(memory_BSC).view(B, S, 2, self.n_kv_head, self.head_dim)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def attend(
        self, q_BHTD: Tensor, k_BKSD: Tensor, v_BKSD: Tensor, *, mask: Tensor | None = None,
        is_causal: bool = False, row_keys: Sequence[int] | None = None,
    ) -> Tensor:
        """softmax(q k^T / sqrt(D) + mask) v through :func:`attention` -> [B, H, T, D].

        row_keys: one call per row b over its first ``row_keys[b]`` keys, no mask. Same formula as one masked
        call, but the kernels sum in an order that depends on the number of keys, so a row's last bits then
        do not depend on how long the other rows are (see :meth:`GPT.decode_step`).
        """
        H, K = self.n_head, self.n_kv_head
        if (WRITTEN_DECODE_ATTENTION and q_BHTD.shape[2] == 1 and row_keys is None and q_BHTD.device.type == "cpu"
                and not self.training
                and (mask is None or (mask.dtype == torch.bool and mask.shape[1] == 1))
                and (torch.compiler.is_compiling() or torch.compiler.is_exporting())):
            return decode_attention(q_BHTD, k_BKSD, v_BKSD, mask)  # a compiled CPU decode step
        gqa = K != H
        if gqa and not _SDPA_HAS_GQA:  # old torch: give every query head its own copy of its k/v head
            k_BKSD, v_BKSD = k_BKSD.repeat_interleave(H // K, 1), v_BKSD.repeat_interleave(H // K, 1)
        extra = {"enable_gqa": True} if gqa and _SDPA_HAS_GQA else {}
        if row_keys is not None:
            return torch.cat([
                attention(q_BHTD[b : b + 1], k_BKSD[b : b + 1, :, :n], v_BKSD[b : b + 1, :, :n], **extra)
                for b, n in enumerate(row_keys)
            ])
        return attention(q_BHTD, k_BKSD, v_BKSD, attn_mask=mask, is_causal=is_causal,
                         dropout_p=self.dropout if self.training else 0.0, **extra)


__all__ = ["Attention", "attention", "decode_attention", "reference_attention", "cached_causal_mask"]
