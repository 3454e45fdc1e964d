"""An encoder-decoder Transformer ("Attention is all you need"; the T5 and BART families are points in its
config): source ids -> encoder -> memory; target prefix + memory -> decoder -> next-token logits.

    m = enc_emb(src) (+ enc_pos)                               # [B, S, C]
    for each encoder block:                                     # bidirectional self-attention over the source
        m = m + self_attn(norm(m), key padding mask)
        m = m + mlp(norm(m))
    m = enc_norm(m)                                             # the "memory"

    x = tok_emb(tgt) (+ dec_pos)                                # [B, T, C]
    for each decoder block:
        x = x + self_attn(norm(x), causal mask)                 # the target prefix, left to right
        x = x + cross_attn(norm(x), m, key padding mask)        # queries from x, keys/values from the memory
        x = x + mlp(norm(x))
    logits = dec_norm(x) @ W_head^T                             # [B, T, V]; W_head = tok_emb.weight if tied

Self-attention, norms and MLPs are the same modules the GPT uses (:mod:`zenlm.models.layers`); only the
cross-attention is new. In generation the decoder keeps its own keys/values in a :class:`KVCache` and the
cross-attention keys/values of the memory are computed once per source (:class:`Seq2SeqCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from zenlm.config import (
    GPTConfig,
    MLPKind,
    ModelConfig,
    NormKind,
    Preset,
    _check_choice,
    _check_positive,
    config_from_preset,
)
from zenlm.errors import ConfigError
from zenlm.models.gpt import Block, KVCache
from zenlm.models.layers import CausalSelfAttention, RMSNorm, Rotary, make_mlp, make_norm

# ---------------------------------------------------------------------------------------------- config


@dataclass
class EncDecConfig(ModelConfig):
    """An encoder-decoder Transformer.

    vocab_size:       token ids the embeddings accept (one vocabulary for source and target)
    max_source_len:   longest source the encoder accepts (S)
    max_target_len:   longest target prefix the decoder accepts (T), the start token included
    n_enc_layer:      encoder blocks
    n_dec_layer:      decoder blocks
    n_head:           attention heads (self- and cross-attention); head dim D = n_embd // n_head
    n_embd:           model width C
    mlp_hidden:       MLP inner width; None: 4*C (gelu/relu2), 8/3*C rounded up to 64 (swiglu)
    pos:              "learned" absolute positions (BART) or "rope" rotary positions in self-attention
                      (cross-attention has no positions of its own: the memory already carries them)
    rope_theta:       rotary base frequency
    norm:             "layernorm" or "rmsnorm" (pre-norm everywhere, plus a final norm per stack)
    norm_eps:         epsilon inside the norms
    mlp:              "gelu", "swiglu" or "relu2"
    bias:             biases in linear layers and LayerNorms
    share_embeddings: encoder and decoder read one token-embedding table (T5, BART)
    tie_embeddings:   the output head reuses the decoder's token-embedding table
    dropout:          dropout on embeddings, attention weights and residual branches
    init_std:         standard deviation of the normal initialisation
    """

    vocab_size: int = 32768
    max_source_len: int = 512
    max_target_len: int = 128
    n_enc_layer: int = 6
    n_dec_layer: int = 6
    n_head: int = 8
    n_embd: int = 512
    mlp_hidden: int | None = None
    pos: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    mlp: MLPKind = "gelu"
    bias: bool = True
    share_embeddings: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    ARCH: ClassVar[str] = "encdec"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_source_len", "max_target_len", "n_enc_layer", "n_dec_layer", "n_head",
                     "n_embd"):
            _check_positive(name, getattr(self, name))
        _check_choice("pos", self.pos, ("learned", "rope"))
        # the per-layer settings are validated (and mlp_hidden filled in) by the GPTConfig they map onto
        self.mlp_hidden = self.layer_config().mlp_hidden

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def layer_config(self) -> GPTConfig:
        """The settings of one block, as the GPTConfig that the shared layers (attention, MLP, norm) read."""
        return GPTConfig(
            vocab_size=self.vocab_size, block_size=max(self.max_source_len, self.max_target_len),
            n_layer=self.n_enc_layer + self.n_dec_layer, n_head=self.n_head, n_embd=self.n_embd,
            mlp_hidden=self.mlp_hidden, pos=self.pos, rope_theta=self.rope_theta, norm=self.norm,
            norm_eps=self.norm_eps, mlp=self.mlp, bias=self.bias, dropout=self.dropout, init_std=self.init_std,
        )


# --------------------------------------------------------------------------------------------- presets

ENCDEC_PRESETS: dict[str, Preset] = {
    "encdec-tiny": Preset(
        "2+2 layers x 64 wide, source 128 / target 64: for tests and smoke runs.",
        dict(n_enc_layer=2, n_dec_layer=2, n_head=2, n_embd=64, max_source_len=128, max_target_len=64),
    ),
    "encdec-small": Preset(
        "3+3 layers x 256 wide, rotary, RMSNorm, source 512 / target 64: minutes of CPU fine-tuning.",
        dict(n_enc_layer=3, n_dec_layer=3, n_head=4, n_embd=256, max_source_len=512, max_target_len=64,
             pos="rope", norm="rmsnorm", mlp="gelu", bias=False, dropout=0.1),
    ),
    "t5-small": Preset(
        "T5-small's shape (6+6 layers x 512, 8 heads, MLP 2048, RMSNorm, no biases), rotary positions.",
        dict(n_enc_layer=6, n_dec_layer=6, n_head=8, n_embd=512, mlp_hidden=2048, mlp="relu2", pos="rope",
             norm="rmsnorm", bias=False, max_source_len=512, max_target_len=128, dropout=0.1,
             norm_eps=1e-6),
    ),
    "bart-base": Preset(
        "BART-base's shape (6+6 layers x 768, 12 heads, MLP 3072, GELU, LayerNorm, learned positions 1024).",
        dict(n_enc_layer=6, n_dec_layer=6, n_head=12, n_embd=768, mlp_hidden=3072, mlp="gelu", pos="learned",
             norm="layernorm", bias=True, max_source_len=1024, max_target_len=1024, dropout=0.1),
    ),
}


def get_encdec_preset(name: str, **overrides: Any) -> EncDecConfig:
    """The EncDecConfig of preset ``name`` with any fields in ``overrides`` changed."""
    return config_from_preset(EncDecConfig, ENCDEC_PRESETS, name, overrides, "encoder-decoder")


# ------------------------------------------------------------------------------------- cross-attention


class CrossAttention(nn.Module):
    """Multi-head attention from the decoder (queries) to the encoder's memory (keys and values).

        q    = x @ W_q                      # [B, H, T, D]
        k, v = split(memory @ W_kv)         # [B, H, S, D] each; computed once per source in generation
        out  = softmax(q k^T / sqrt(D) + padding mask) v @ W_proj
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.dropout = config.n_head, config.head_dim, config.dropout
        C = config.n_embd
        self.q = nn.Linear(C, C, bias=config.bias)
        self.kv = nn.Linear(C, 2 * C, bias=config.bias)
        self.proj = nn.Linear(C, C, bias=config.bias)

    def memory_kv(self, memory_BSC: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the memory: [B, S, C] -> ([B, H, S, D], [B, H, S, D])."""
        B, S, _ = memory_BSC.shape
        kv = self.kv(memory_BSC).view(B, S, 2, self.n_head, self.head_dim)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def forward(self, x_BTC: Tensor, kv: tuple[Tensor, Tensor], mask_B11S: Tensor | None) -> Tensor:
        """x_BTC [B, T, C], kv from :meth:`memory_kv`, mask_B11S boolean (True = real source token)."""
        B, T, C = x_BTC.shape
        q_BHTD = self.q(x_BTC).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k_BHSD, v_BHSD = kv
        q_BHTD = q_BHTD.to(v_BHSD.dtype)
        y_BHTD = F.scaled_dot_product_attention(
            q_BHTD, k_BHSD.to(v_BHSD.dtype), v_BHSD, attn_mask=mask_B11S,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y_BHTD.transpose(1, 2).reshape(B, T, C))


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention to the memory, MLP."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm_self = make_norm(config)
        self.self_attn = CausalSelfAttention(config)
        self.norm_cross = make_norm(config)
        self.cross_attn = CrossAttention(config)
        self.norm_mlp = make_norm(config)
        self.mlp = make_mlp(config)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(
        self,
        x_BTC: Tensor,
        memory_kv: tuple[Tensor, Tensor],
        src_mask_B11S: Tensor | None,
        rope: tuple[Tensor, Tensor] | None = None,
        kv_cache: tuple[Tensor, Tensor, int] | None = None,
        mask_TS: Tensor | None = None,
        is_causal: bool = True,
    ) -> Tensor:
        """[B, T, C] -> [B, T, C]; rope / kv_cache / mask_TS / is_causal as in CausalSelfAttention.forward."""
        x_BTC = x_BTC + self.drop(self.self_attn(self.norm_self(x_BTC), rope, kv_cache, mask_TS, is_causal))
        x_BTC = x_BTC + self.drop(self.cross_attn(self.norm_cross(x_BTC), memory_kv, src_mask_B11S))
        x_BTC = x_BTC + self.drop(self.mlp(self.norm_mlp(x_BTC)))
        return x_BTC


# ------------------------------------------------------------------------------------------------ cache


class Seq2SeqCache:
    """Everything generation keeps per source: the decoder's own keys/values (a :class:`KVCache` over
    ``n_dec_layer`` layers) and each decoder layer's cross-attention keys/values of the memory.

    self_kv:   KVCache, k/v per decoder layer [B, H, max_len, D]; ``pos`` = target positions filled
    cross_kv:  per decoder layer (k [B, H, S, D], v [B, H, S, D])
    src_mask:  [B, 1, 1, S] boolean (True = real source token) or None (no padding)
    """

    def __init__(self, self_kv: KVCache, cross_kv: list[tuple[Tensor, Tensor]], src_mask: Tensor | None) -> None:
        self.self_kv, self.cross_kv, self.src_mask = self_kv, cross_kv, src_mask

    @property
    def pos(self) -> int:
        return self.self_kv.pos

    @property
    def batch_size(self) -> int:
        return self.self_kv.batch_size

    def reorder(self, index_N: Tensor) -> None:
        """Keep rows ``index_N`` (beam search: each surviving hypothesis takes its parent's cache).

        Every row of the cross-attention cache is rebuilt too, so any permutation is allowed.
        """
        self.self_kv.select_rows(index_N)
        self.cross_kv = [(k.index_select(0, index_N), v.index_select(0, index_N)) for k, v in self.cross_kv]
        if self.src_mask is not None:
            self.src_mask = self.src_mask.index_select(0, index_N)


# ------------------------------------------------------------------------------------------------ model


def _key_mask(mask_BS: Tensor | None) -> Tensor | None:
    """[B, S] boolean (True = real token) -> [B, 1, 1, S] for attention, or None when nothing is padded."""
    if mask_BS is None or bool(mask_BS.all()):
        return None
    return mask_BS[:, None, None, :]


class EncoderDecoder(nn.Module):
    """Encoder-decoder Transformer: (source ids [B, S], target prefix [B, T]) -> next-token logits [B, T, V].

    Module names: ``tok_emb`` (decoder, and encoder when shared), ``src_emb`` (encoder, when not shared),
    ``enc_pos`` / ``dec_pos`` (learned positions), ``enc_blocks.{i}``, ``enc_norm``, ``dec_blocks.{i}``,
    ``dec_norm``, ``lm_head`` (absent when tied).
    """

    # For optimisers that treat matrices by role (zenlm.train.optim.roles_of): the output head is no hidden
    # matrix; the matrices of both stacks' blocks are. Embedding tables are recognised by their type.
    param_roles: ClassVar[dict[str, str]] = {"lm_head": "head"}

    def __init__(self, config: EncDecConfig) -> None:
        super().__init__()
        self.config = config
        lc = config.layer_config()
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.src_emb = None if config.share_embeddings else nn.Embedding(config.vocab_size, C)
        learned = config.pos == "learned"
        self.enc_pos = nn.Embedding(config.max_source_len, C) if learned else None
        self.dec_pos = nn.Embedding(config.max_target_len, C) if learned else None
        self.rotary = None if learned else Rotary(config.head_dim, lc.block_size, config.rope_theta)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.enc_blocks = nn.ModuleList([Block.from_config(lc) for _ in range(config.n_enc_layer)])
        self.enc_norm = make_norm(lc)
        self.dec_blocks = nn.ModuleList([DecoderBlock(lc) for _ in range(config.n_dec_layer)])
        self.dec_norm = make_norm(lc)
        self.lm_head = None if config.tie_embeddings else nn.Linear(C, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weights ~ N(0, init_std), biases 0, norm gains 1; every residual branch's output projection
        ~ N(0, init_std / sqrt(2 * layers)) as in GPT-2 (layers = encoder + decoder blocks)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.reset_parameters()
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        small = std / math.sqrt(2 * (self.config.n_enc_layer + self.config.n_dec_layer))
        for block in self.enc_blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=small)
        for block in self.dec_blocks:
            for proj in (block.self_attn.proj, block.cross_attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=small)

    def num_params(self) -> int:
        """Number of parameters (shared and tied tables counted once)."""
        return sum(p.numel() for p in self.parameters())

    # ---- encoder ---------------------------------------------------------------------------------------

    def encode(self, src_BS: Tensor, src_mask_BS: Tensor | None = None) -> Tensor:
        """The memory: src_BS [B, S] int64 (right-padded; src_mask_BS [B, S] True = real token) -> [B, S, C]."""
        if src_BS.dim() != 2:
            raise ConfigError(f"the encoder expects source ids of shape [batch, time], got {tuple(src_BS.shape)}.")
        B, S = src_BS.shape
        if S > self.config.max_source_len:
            raise ConfigError(f"source length {S} exceeds max_source_len {self.config.max_source_len}; "
                              "truncate the sources (zenlm.data.seq2seq does this with a warning).")
        emb = self.src_emb if self.src_emb is not None else self.tok_emb
        x_BSC = emb(src_BS)
        if self.enc_pos is not None:
            x_BSC = x_BSC + self.enc_pos.weight[:S]
        x_BSC = self.drop(x_BSC)
        rope = self.rotary(0, S) if self.rotary is not None else None
        mask = _key_mask(src_mask_BS)
        for block in self.enc_blocks:
            x_BSC = block(x_BSC, rope, None, mask, False)  # bidirectional: no causal mask
        return self.enc_norm(x_BSC)

    # ---- decoder ---------------------------------------------------------------------------------------

    def make_cache(self, memory_BSC: Tensor, src_mask_BS: Tensor | None = None,
                   max_len: int | None = None) -> Seq2SeqCache:
        """An empty decoder cache for the sources whose memory is given (cross-attention keys/values are
        computed here, once). max_len: most target positions (default max_target_len)."""
        cfg = self.config
        max_len = cfg.max_target_len if max_len is None else max_len
        if not 0 < max_len <= cfg.max_target_len:
            raise ConfigError(f"cache max_len must be in 1..{cfg.max_target_len} (max_target_len), got {max_len}.")
        B = memory_BSC.shape[0]
        self_kv = KVCache(cfg.n_dec_layer, B, cfg.n_head, max_len, cfg.head_dim, device=memory_BSC.device,
                          dtype=memory_BSC.dtype)
        cross = [block.cross_attn.memory_kv(memory_BSC) for block in self.dec_blocks]
        return Seq2SeqCache(self_kv, cross, _key_mask(src_mask_BS))

    def decode(
        self,
        tgt_BT: Tensor,
        memory_BSC: Tensor | None = None,
        src_mask_BS: Tensor | None = None,
        *,
        cache: Seq2SeqCache | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Next-token logits [B, T, V] (float32) for the target prefix tgt_BT [B, T].

        Without a cache: the prefix takes positions 0..T-1 and attends to ``memory_BSC`` (padding given by
        ``src_mask_BS``). With a cache (from :meth:`make_cache`): positions ``cache.pos ..``, the memory and
        its mask come from the cache, and ``cache.pos`` advances by T.
        """
        B, T = tgt_BT.shape
        pos = 0
        if cache is None:
            if memory_BSC is None:
                raise ConfigError("decode needs the encoder memory (or a cache made from it).")
            if T > self.config.max_target_len:
                raise ConfigError(f"target length {T} exceeds max_target_len {self.config.max_target_len}.")
            src_mask = _key_mask(src_mask_BS)
            cross = [block.cross_attn.memory_kv(memory_BSC) for block in self.dec_blocks]
        else:
            pos = cache.pos
            if pos + T > cache.self_kv.max_len:
                raise ConfigError(f"decoder cache overflow: {pos} cached + {T} new > {cache.self_kv.max_len}.")
            if B != cache.batch_size:
                raise ConfigError(f"batch size {B} does not match the cache's {cache.batch_size}.")
            src_mask, cross = cache.src_mask, cache.cross_kv

        x_BTC = self.tok_emb(tgt_BT)
        if self.dec_pos is not None:
            x_BTC = x_BTC + self.dec_pos.weight[pos : pos + T]
        x_BTC = self.drop(x_BTC)
        rope = self.rotary(pos, T) if self.rotary is not None else None
        if cache is None:
            for block, kv in zip(self.dec_blocks, cross, strict=True):
                x_BTC = block(x_BTC, kv, src_mask, rope)
        else:
            mask_TS = None  # same rule as GPT.forward: causal, none, or an explicit [T, pos+T] mask
            if pos > 0 and T > 1:
                q_pos_T1 = torch.arange(pos, pos + T, device=tgt_BT.device)[:, None]
                mask_TS = torch.arange(pos + T, device=tgt_BT.device)[None, :] <= q_pos_T1
            kvc = cache.self_kv
            for i, (block, kv) in enumerate(zip(self.dec_blocks, cross, strict=True)):
                x_BTC = block(x_BTC, kv, src_mask, rope, (kvc.k[i], kvc.v[i], pos), mask_TS, pos == 0)
            kvc.pos = pos + T
        if last_only:
            x_BTC = x_BTC[:, -1:]
        x_BTC = self.dec_norm(x_BTC)
        if self.lm_head is None:
            return F.linear(x_BTC, self.tok_emb.weight).float()
        return self.lm_head(x_BTC).float()

    def forward(self, src_BS: Tensor, tgt_BT: Tensor, src_mask_BS: Tensor | None = None) -> Tensor:
        """Teacher forcing: logits [B, T, V] for every target position given the whole source."""
        return self.decode(tgt_BT, self.encode(src_BS, src_mask_BS), src_mask_BS)


__all__ = ["EncDecConfig", "EncoderDecoder", "CrossAttention", "DecoderBlock", "Seq2SeqCache",
           "ENCDEC_PRESETS", "get_encdec_preset"]
