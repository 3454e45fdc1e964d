"""A decoder-only Transformer language model (the GPT-2 and Llama families are both points in its config).

    x = tok_emb(idx) (+ pos_emb(positions))                  # [B, T, C]
    for each block:
        x = x + attn(norm_attn(x))                           # causal self-attention
        x = x + mlp(norm_mlp(x))                             # feed-forward
    logits = norm_f(x) @ W_head^T                            # [B, T, V]; W_head = tok_emb.weight if tied

Generation keeps each layer's past keys/values in a :class:`~zenlm.models.cache.KVCache`, so every new token
costs one position of work instead of the whole context. One loop over the blocks (:meth:`GPT._run_blocks`)
serves the three ways in: :meth:`GPT.forward` (training, scoring, prefill), :meth:`GPT.features` (hidden states)
and :meth:`GPT.decode_step` (one new token per row, each row at its own position: batched generation, the
server, and the compiled step of :mod:`zenlm.compiled`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.models.attention import Attention, cached_causal_mask
from zenlm.models.cache import KVCache, LayerCache
from zenlm.models.layers import Rotary, inference_products, init_normal_, make_mlp, make_norm, mixed_linear

# In eval mode (generation, scoring) every call may have a new length. cuDNN's attention builds a plan per
# new shape (tens of ms each on recent GPUs), so eval uses the flash / memory-efficient / math kernels;
# training, whose shapes are fixed, keeps PyTorch's default choice.
_INFERENCE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _no_cudnn_attention() -> AbstractContextManager:
    return sdpa_kernel(_INFERENCE_ATTENTION)


class Block(nn.Module):
    """One Transformer block, pre-norm: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    Built from its parts (an attention module, an MLP and two norms), so any combination the config
    describes is just a different set of parts.
    """

    def __init__(
        self, attn: nn.Module, mlp: nn.Module, norm_attn: nn.Module, norm_mlp: nn.Module, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm_attn = norm_attn
        self.attn = attn
        self.norm_mlp = norm_mlp
        self.mlp = mlp
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on each residual branch

    @classmethod
    def from_config(cls, config: GPTConfig) -> Block:
        assert config.mlp_hidden is not None  # filled in by GPTConfig.__post_init__
        attn = Attention(config.n_embd, config.n_head, n_kv_head=config.n_kv_head, head_dim=config.head_dim,
                         qkv_bias=bool(config.qkv_bias), proj_bias=bool(config.attn_proj_bias),
                         qk_norm=config.qk_norm, norm_eps=config.norm_eps, dropout=config.dropout)
        mlp = make_mlp(config.mlp, config.n_embd, config.mlp_hidden, bias=bool(config.mlp_bias))
        return cls(attn, mlp, _norm(config), _norm(config), config.dropout)

    def forward(
        self,
        x_BTC: Tensor,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: LayerCache | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        row_keys: Sequence[int] | None = None,
    ) -> Tensor:
        """[B, T, C] -> [B, T, C]; the other arguments: see :meth:`zenlm.models.attention.Attention.forward`."""
        x_BTC = x_BTC + self._dropout(self.attn(self.norm_attn(x_BTC), rope=rope, cache=cache, mask=mask,
                                                is_causal=is_causal, row_keys=row_keys))
        x_BTC = x_BTC + self._dropout(self.mlp(self.norm_mlp(x_BTC)))
        return x_BTC

    def _dropout(self, x: Tensor) -> Tensor:
        # only while training: in eval mode nn.Dropout does nothing, but it would still trace into a copy in a
        # compiled decode step
        return self.drop(x) if self.training else x


def _norm(config: GPTConfig) -> nn.Module:
    return make_norm(config.norm, config.n_embd, eps=config.norm_eps, bias=config.bias)


class GPT(nn.Module):
    """Decoder-only Transformer language model: token ids [B, T] -> next-token logits [B, T, V].

    Module names: ``tok_emb``, ``pos_emb`` (learned positions only), ``blocks.{i}.*`` (every hidden matrix),
    ``norm_f``, ``lm_head`` (absent when the embeddings are tied).
    """

    # For optimisers that treat matrices by role (zenlm.train.optim.roles_of): the output head is no hidden
    # matrix. Embedding tables and gains are recognised by their type and shape.
    param_roles: ClassVar[dict[str, str]] = {"lm_head": "head"}

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = nn.Embedding(config.block_size, C) if config.pos == "learned" else None
        self.rotary = (
            Rotary(config.head_dim, config.block_size, config.rope_theta, config.rope_scaling)
            if config.pos == "rope" else None
        )
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList([Block.from_config(config) for _ in range(config.n_layer)])
        self.norm_f = _norm(config)
        # Tied: the head reuses tok_emb.weight (see forward) and registers no parameter of its own.
        self.lm_head = None if config.tie_embeddings else nn.Linear(C, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise: weights ~ N(0, init_std), biases 0, norm gains 1; each residual branch's output
        projection (``attn.proj``, ``mlp.proj``) ~ N(0, init_std / sqrt(2 * n_layer)) as in GPT-2, or 0
        when ``zero_init_proj``."""
        std = self.config.init_std
        init_normal_(self, std)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                if self.config.zero_init_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def num_params(self, include_embedding: bool = True) -> int:
        """Number of parameters (tied weights counted once); without the token/position embedding tables
        when ``include_embedding`` is False. Equals ``config.num_params(include_embedding)``."""
        n = sum(p.numel() for p in self.parameters())
        if not include_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def make_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` (default block_size) tokens.

        device defaults to the model's; dtype to the autocast dtype when autocast is on for that device,
        else the parameters' dtype.
        """
        cfg = self.config
        max_len = cfg.block_size if max_len is None else max_len
        if not 0 < max_len <= cfg.block_size:
            raise ConfigError(
                f"cache max_len must be in 1..{cfg.block_size} (the model's block_size), got {max_len}."
            )
        if batch_size < 1:
            raise ConfigError(f"cache batch_size must be >= 1, got {batch_size}.")
        param = self.norm_f.weight  # a float parameter in every variant (quantised models included)
        device = param.device if device is None else torch.device(device)
        if dtype is None:
            autocast_on = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast_on else param.dtype
        assert cfg.n_kv_head is not None
        return KVCache(
            cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim, device=device, dtype=dtype
        )

    def forward(self, idx_BT: Tensor, *, cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        """Next-token logits for every position: idx_BT [B, T] (int64) -> logits_BTV [B, T, V] (float32).

        cache:     a :class:`KVCache` from :meth:`make_cache`: the tokens take positions
                   ``cache.pos .. cache.pos+T-1``, attend over everything cached before them, and
                   ``cache.pos`` advances by T. Without a cache the tokens take positions 0..T-1.
        last_only: return logits for the last position only, [B, 1, V] (saves the head's work in
                   generation prefill).
        """
        with self._products():
            x_BTC = self._hidden(idx_BT, cache)
            if last_only:
                x_BTC = x_BTC[:, -1:]
            return self.head(self.norm_f(x_BTC))

    def features(self, idx_BT: Tensor, *, cache: KVCache | None = None) -> Tensor:
        """Final hidden states (after ``norm_f``) without the head: idx_BT [B, T] -> [B, T, C]; ``cache`` as
        in :meth:`forward` (``head(features(x))`` is ``forward(x)``, for a caller that applies the head to a
        few positions at a time).

        Position t has seen tokens 0..t only (causal), so a right-padded batch gives each sequence the same
        features as alone up to its last real token: read sequence b at position ``len_b - 1``."""
        with self._products():
            return self.norm_f(self._hidden(idx_BT, cache))

    def inference_head(self, x_BTC: Tensor) -> Tensor:
        """:meth:`head` with its product run as :meth:`forward` runs it at inference (see :meth:`_products`), for
        a caller that applies the head to :meth:`features` itself, a few positions at a time."""
        with self._products():
            return self.head(x_BTC)

    def _products(self, step_rows: int | None = None) -> AbstractContextManager:
        """fp32 inference on a CPU: products through oneDNN (:func:`~zenlm.models.layers.inference_products`;
        ``step_rows``: the rows of a decode step). Not while a step is being compiled: :mod:`zenlm.compiled`
        chooses the products of its programs itself."""
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return nullcontext()
        w = self.norm_f.weight
        return inference_products(w.device, w.dtype, step_rows)

    def decode_step(
        self, tokens_B: Tensor, pos_B: Tensor | int, k_layers: Sequence[Tensor], v_layers: Sequence[Tensor], *,
        keys_S: Tensor | None = None, row_attention: bool = False,
    ) -> Tensor:
        """One new token for each of the first B rows of a cache, each at its own position -> logits [B, V]
        (float32). Inference only (no dropout, no checks); call it under ``torch.inference_mode()``.

        tokens_B: [B] the newest token of each row; pos_B: [B] its absolute position (= tokens already cached
        in that row), or one int when every row is at the same position (one sequence: eagerly, slices of the
        cache are cheaper than per-row writes); k_layers, v_layers: per layer [>=B, n_kv_head, max_len,
        head_dim] (a :class:`KVCache`'s ``k`` and ``v``; rows past B are left alone). Row b writes its key/value
        at ``pos_B[b]`` and attends over its own keys ``0 .. pos_B[b]`` only. The caller advances its positions.

        keys_S: ``arange(S)`` with S >= ``max(pos_B) + 1``, the key slots the call reads (made here, with S =
        ``max(pos_B) + 1``, when None). A tensor rather than an int so that a compiled step
        (:mod:`zenlm.compiled`) can treat S as a dynamic size: one program for every position instead of one per
        length. Given, it may reach past every row's position (the compiled step rounds S up to a block of
        keys, see :data:`zenlm.compiled.KEY_BLOCK`): each row's keys past its position are masked out.

        row_attention: False: one attention call for all rows over the longest row's keys, the others' extra
        keys masked out. True: one attention call per row over exactly its own keys. Same formula, but the
        attention kernels sum in an order that depends on the number of keys, so with False a row's last bits
        (visible in bf16) depend on the other rows' lengths; with True they do not, and a row gets the logits
        ``forward`` gives that sequence alone (bit for bit wherever the batched matrix products compute each
        row as they would alone, as on CPU). The projections and MLPs run batched either way; the per-row
        calls cost little at the batch sizes of generation (about what the one masked call costs at batch 8
        on CPU).
        """
        B = tokens_B.shape[0]
        x_B1C, rope = self._embed(tokens_B[:, None], pos_B)
        mask_B11S, row_keys, rows_B = None, None, None  # rows that see all S keys need no mask
        if isinstance(pos_B, int):
            S = pos_B + 1
        else:
            padded = keys_S is not None  # possibly more key slots than the longest row has
            if keys_S is None:
                keys_S = torch.arange(int(pos_B.max()) + 1, device=tokens_B.device)
            S, rows_B = keys_S.shape[0], torch.arange(B, device=tokens_B.device)
            if row_attention and B > 1:
                row_keys = (pos_B + 1).tolist()  # row b attends over its first row_keys[b] keys
            elif B > 1 or padded:
                mask_B11S = (keys_S[None, :] <= pos_B[:, None])[:, None, None]
        layers = [LayerCache(k, v, pos_B, S, rows_B) for k, v in zip(k_layers, v_layers, strict=True)]
        with self._products(B):
            x_B1C = self._run_blocks(x_B1C, rope, layers, mask=mask_B11S, row_keys=row_keys)
            return self.head(self.norm_f(x_B1C)[:, 0])

    def _hidden(self, idx_BT: Tensor, cache: KVCache | None) -> Tensor:
        """Token ids [B, T] -> hidden states after the last block [B, T, C] (before ``norm_f``), with or
        without a cache (see :meth:`forward`)."""
        if idx_BT.dim() != 2:
            raise ConfigError(f"GPT expects token ids of shape [batch, time], got {tuple(idx_BT.shape)}.")
        B, T = idx_BT.shape
        pos = 0
        if cache is None:
            if T > self.config.block_size:
                raise ConfigError(
                    f"sequence length {T} exceeds the model's block_size {self.config.block_size}; "
                    "crop the input to the last block_size tokens."
                )
        else:
            pos = cache.pos
            if pos + T > cache.max_len:
                raise ConfigError(
                    f"KV cache overflow: {pos} cached + {T} new positions > max_len {cache.max_len}; "
                    "reset() the cache and prefill a shorter context."
                )
            if B != cache.batch_size:
                raise ConfigError(f"batch size {B} does not match the KV cache's {cache.batch_size}.")

        x_BTC, rope = self._embed(idx_BT, pos)
        x_BTC = self.drop(x_BTC)
        mask_TS, is_causal = cached_causal_mask(pos, T, idx_BT.device)
        with _no_cudnn_attention() if (idx_BT.is_cuda and not self.training) else nullcontext():
            x_BTC = self._run_blocks(x_BTC, rope, None if cache is None else cache.layers(T), mask=mask_TS,
                                     is_causal=is_causal)
        if cache is not None:
            cache.pos = pos + T
        return x_BTC

    def _embed(self, idx_BT: Tensor, pos: int | Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Token (+ learned position) embeddings [B, T, C] and the rotary (cos, sin) of the positions.
        pos: an int (the tokens take positions pos .. pos+T-1) or pos_B [B] (T == 1, one position per row)."""
        # in the activations' dtype (that of the norms), also when the embedding is kept narrower (bf16 weights,
        # fp32 activations) or in int8
        x_BTC = self.tok_emb(idx_BT).to(self.norm_f.weight.dtype)
        rope = None
        if isinstance(pos, int):
            T = idx_BT.shape[1]
            if self.pos_emb is not None:
                x_BTC = x_BTC + self.pos_emb.weight[pos : pos + T]
            if self.rotary is not None:
                rope = self.rotary(pos, T)
        else:
            if self.pos_emb is not None:
                x_BTC = x_BTC + self.pos_emb(pos)[:, None]
            if self.rotary is not None:  # per-row angles, broadcast over heads: [B, 1, 1, D]
                rope = self.rotary.at(pos)
        return x_BTC, rope

    def _run_blocks(
        self, x_BTC: Tensor, rope: tuple[Tensor, Tensor] | None, layers: Sequence[LayerCache] | None, *,
        mask: Tensor | None = None, is_causal: bool = False, row_keys: Sequence[int] | None = None,
    ) -> Tensor:
        """The blocks, in order: [B, T, C] -> [B, T, C]; layers: each block's cache view (or None)."""
        for i, block in enumerate(self.blocks):
            x_BTC = block(x_BTC, rope=rope, cache=None if layers is None else layers[i], mask=mask,
                          is_causal=is_causal, row_keys=row_keys)
        return x_BTC

    def head(self, x_BTC: Tensor) -> Tensor:
        """Normalised hidden states [B, T, C] -> logits [B, T, V] (float32), soft-capped when configured."""
        if self.lm_head is None:
            logits_BTV = mixed_linear(x_BTC, self.tok_emb.weight).float()  # tied: W_head = tok_emb.weight
        else:
            logits_BTV = self.lm_head(x_BTC).float()
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits_BTV = cap * torch.tanh(logits_BTV / cap)
        return logits_BTV


__all__ = ["GPT", "Block"]
