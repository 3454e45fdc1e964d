"""A decoder-only Transformer language model (the GPT-2 and Llama families are both points in its config).

    x = tok_emb(idx) (+ pos_emb(positions))                  # [B, T, C]
    for each block:
        x = x + attn(norm_attn(x))                           # causal self-attention
        x = x + mlp(norm_mlp(x))                             # feed-forward
    logits = norm_f(x) @ W_head^T                            # [B, T, V]; W_head = tok_emb.weight if tied

Generation keeps each layer's past keys/values in a :class:`KVCache`, so every new token costs one
position of work instead of the whole context.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from zenlm.config import GPTConfig
from zenlm.errors import ConfigError
from zenlm.models.layers import CausalSelfAttention, RMSNorm, Rotary, make_mlp, make_norm, scaled_init_std

# In eval mode (generation, scoring) every call may have a new length. cuDNN's attention builds a plan per
# new shape (tens of ms each on recent GPUs), so eval uses the flash / memory-efficient / math kernels;
# training, whose shapes are fixed, keeps PyTorch's default choice.
_INFERENCE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _no_cudnn_attention() -> AbstractContextManager:
    return sdpa_kernel(_INFERENCE_ATTENTION)


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    k, v: lists of n_layer tensors; ``k[i]`` is layer i's buffer [B, n_kv_head, max_len, head_dim].
          One separate tensor per layer (not one [n_layer, ...] tensor): a compiled decode step writes the
          new key of layer i into ``k[i]`` in place, which the compiler does only for a whole input tensor,
          not for a slice of one (it would copy the layer's cache every step).
    pos:  how many positions are filled; the next forward pass writes positions ``pos .. pos+T-1``
          (and uses them as the absolute positions of its tokens), then advances ``pos`` by T.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def reset(self) -> None:
        """Forget everything (the buffers are reused, not reallocated)."""
        self.pos = 0

    def row(self, b: int) -> KVCache:
        """An empty batch-1 cache whose buffers are views of row b of this one (a forward pass through it
        writes into row b): prefill one sequence of a batch on its own."""
        view = KVCache.__new__(KVCache)
        view.k = [t[b : b + 1] for t in self.k]
        view.v = [t[b : b + 1] for t in self.v]
        view.pos = 0
        return view

    def select_rows(self, index_B: Tensor) -> None:
        """Keep rows ``index_B`` (in that order, repeats allowed) as the new batch, e.g. reordering beams."""
        self.k = [t.index_select(0, index_B) for t in self.k]
        self.v = [t.index_select(0, index_B) for t in self.v]

    def move_rows(self, src: Sequence[int], length: int) -> None:
        """Row r takes the first ``length`` positions of row ``src[r]``, for r = 0 .. len(src)-1, in place
        (batch compaction when sequences finish; the batch buffers keep their size)."""
        idx = torch.tensor(list(src), device=self.device)
        for t in self.k + self.v:
            t[: len(idx), :, :length] = t[idx, :, :length]  # the right side is a copy: no overlap


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
        attn, mlp = CausalSelfAttention(config), make_mlp(config)
        return cls(attn, mlp, make_norm(config), make_norm(config), config.dropout)

    def forward(
        self,
        x_BTC: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        kv_cache: tuple[Tensor, Tensor, int] | None = None,
        mask_TS: Tensor | None = None,
        is_causal: bool = True,
    ) -> Tensor:
        """[B, T, C] -> [B, T, C]; the other arguments: see CausalSelfAttention.forward."""
        x_BTC = x_BTC + self.drop(self.attn(self.norm_attn(x_BTC), rope, kv_cache, mask_TS, is_causal))
        x_BTC = x_BTC + self.drop(self.mlp(self.norm_mlp(x_BTC)))
        return x_BTC


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
        self.norm_f = make_norm(config)
        # Tied: the head reuses tok_emb.weight (see forward) and registers no parameter of its own.
        self.lm_head = None if config.tie_embeddings else nn.Linear(C, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise: weights ~ N(0, init_std), biases 0, norm gains 1; each residual branch's output
        projection (``attn.proj``, ``mlp.proj``) ~ N(0, init_std / sqrt(2 * n_layer)) as in GPT-2, or 0
        when ``zero_init_proj``."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.reset_parameters()
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                if self.config.zero_init_proj:
                    nn.init.zeros_(proj.weight)
                else:
                    nn.init.normal_(proj.weight, mean=0.0, std=scaled_init_std(self.config))

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

        x_BTC = self.tok_emb(idx_BT)
        if self.pos_emb is not None:
            x_BTC = x_BTC + self.pos_emb.weight[pos : pos + T]
        x_BTC = self.drop(x_BTC)
        rope = self.rotary(pos, T) if self.rotary is not None else None

        with _no_cudnn_attention() if (idx_BT.is_cuda and not self.training) else nullcontext():
            if cache is None:
                for block in self.blocks:
                    x_BTC = block(x_BTC, rope)
            else:
                # Query t (absolute position pos+t) may see keys 0..pos+t: a plain causal mask when nothing
                # is cached yet, no mask for a single new token, else an explicit [T, pos+T] mask.
                mask_TS = None
                if pos > 0 and T > 1:
                    q_pos_T1 = torch.arange(pos, pos + T, device=idx_BT.device)[:, None]
                    mask_TS = torch.arange(pos + T, device=idx_BT.device)[None, :] <= q_pos_T1
                for i, block in enumerate(self.blocks):
                    x_BTC = block(x_BTC, rope, (cache.k[i], cache.v[i], pos), mask_TS, pos == 0)
                cache.pos = pos + T

        if last_only:
            x_BTC = x_BTC[:, -1:]
        return self.head(self.norm_f(x_BTC))

    def features(self, idx_BT: Tensor) -> Tensor:
        """Final hidden states (after ``norm_f``) without the head: idx_BT [B, T] -> [B, T, C].

        Position t has seen tokens 0..t only (causal), so a right-padded batch gives each sequence the same
        features as alone up to its last real token: read sequence b at position ``len_b - 1``."""
        B, T = idx_BT.shape
        if T > self.config.block_size:
            raise ConfigError(f"sequence length {T} exceeds the model's block_size {self.config.block_size}.")
        x_BTC = self.tok_emb(idx_BT)
        if self.pos_emb is not None:
            x_BTC = x_BTC + self.pos_emb.weight[:T]
        x_BTC = self.drop(x_BTC)
        rope = self.rotary(0, T) if self.rotary is not None else None
        for block in self.blocks:
            x_BTC = block(x_BTC, rope)
        return self.norm_f(x_BTC)

    def head(self, x_BTC: Tensor) -> Tensor:
        """Normalised hidden states [B, T, C] -> logits [B, T, V] (float32), soft-capped when configured."""
        if self.lm_head is None:
            logits_BTV = F.linear(x_BTC, self.tok_emb.weight).float()  # tied: W_head = tok_emb.weight
        else:
            logits_BTV = self.lm_head(x_BTC).float()
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits_BTV = cap * torch.tanh(logits_BTV / cap)
        return logits_BTV


__all__ = ["GPT", "Block", "KVCache"]
