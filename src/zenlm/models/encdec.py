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

Self- and cross-attention are the one attention module (:class:`~zenlm.models.attention.Attention`; the
cross-attention takes its keys and values from the memory), norms and MLPs the GPT's (:mod:`zenlm.models.layers`),
and an encoder block is the GPT's :class:`~zenlm.models.gpt.Block` run without the causal mask. In generation
the decoder keeps its own keys/values in a :class:`~zenlm.models.cache.KVCache` and the cross-attention
keys/values of the memory are computed once per source (:class:`~zenlm.models.cache.Seq2SeqCache`).
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
    MLPKind,
    ModelConfig,
    NormKind,
    Preset,
    _check_choice,
    _check_positive,
    check_block_settings,
    config_from_preset,
)
from zenlm.errors import ConfigError
from zenlm.models.attention import Attention, cached_causal_mask
from zenlm.models.cache import KVCache, LayerCache, Seq2SeqCache
from zenlm.models.gpt import Block
from zenlm.models.layers import Rotary, init_normal_, make_mlp, make_norm

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
        check_block_settings(self)  # the settings of its blocks, as a GPT's (fills in mlp_hidden)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def attention(self, *, cross: bool = False) -> Attention:
        """One attention module of this shape (every self- and cross-attention of the model is one)."""
        return Attention(self.n_embd, self.n_head, qkv_bias=self.bias, proj_bias=self.bias, norm_eps=self.norm_eps,
                         dropout=self.dropout, cross=cross)

    def norm_layer(self) -> nn.Module:
        return make_norm(self.norm, self.n_embd, eps=self.norm_eps, bias=self.bias)

    def mlp_layer(self) -> nn.Module:
        assert self.mlp_hidden is not None  # filled in by __post_init__
        return make_mlp(self.mlp, self.n_embd, self.mlp_hidden, bias=self.bias)

    def encoder_block(self) -> Block:
        """A pre-norm block: bidirectional self-attention + MLP (the GPT's Block, called without a causal mask)."""
        return Block(self.attention(), self.mlp_layer(), self.norm_layer(), self.norm_layer(), self.dropout)


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


# ------------------------------------------------------------------------------------------ decoder block


class DecoderBlock(nn.Module):
    """Pre-norm decoder block: causal self-attention, cross-attention to the memory, MLP.

        x = x + self_attn(norm_self(x), causal)
        x = x + cross_attn(norm_cross(x), memory keys/values, source padding mask)
        x = x + mlp(norm_mlp(x))
    """

    def __init__(self, config: EncDecConfig) -> None:
        super().__init__()
        self.norm_self = config.norm_layer()
        self.self_attn = config.attention()
        self.norm_cross = config.norm_layer()
        self.cross_attn = config.attention(cross=True)
        self.norm_mlp = config.norm_layer()
        self.mlp = config.mlp_layer()
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(
        self,
        x_BTC: Tensor,
        memory_kv: tuple[Tensor, Tensor],
        src_mask_B11S: Tensor | None,
        *,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: LayerCache | None = None,
        mask: Tensor | None = None,
        is_causal: bool = True,
    ) -> Tensor:
        """[B, T, C] -> [B, T, C]; rope / cache / mask / is_causal of the self-attention, as in
        :meth:`zenlm.models.attention.Attention.forward`."""
        x_BTC = x_BTC + self.drop(self.self_attn(self.norm_self(x_BTC), rope=rope, cache=cache, mask=mask,
                                                 is_causal=is_causal))
        x_BTC = x_BTC + self.drop(self.cross_attn(self.norm_cross(x_BTC), memory_kv=memory_kv, mask=src_mask_B11S))
        x_BTC = x_BTC + self.drop(self.mlp(self.norm_mlp(x_BTC)))
        return x_BTC


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
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.src_emb = None if config.share_embeddings else nn.Embedding(config.vocab_size, C)
        learned = config.pos == "learned"
        self.enc_pos = nn.Embedding(config.max_source_len, C) if learned else None
        self.dec_pos = nn.Embedding(config.max_target_len, C) if learned else None
        longest = max(config.max_source_len, config.max_target_len)
        self.rotary = None if learned else Rotary(config.head_dim, longest, config.rope_theta)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.enc_blocks = nn.ModuleList([config.encoder_block() for _ in range(config.n_enc_layer)])
        self.enc_norm = config.norm_layer()
        self.dec_blocks = nn.ModuleList([DecoderBlock(config) for _ in range(config.n_dec_layer)])
        self.dec_norm = config.norm_layer()
        self.lm_head = None if config.tie_embeddings else nn.Linear(C, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Weights ~ N(0, init_std), biases 0, norm gains 1; every residual branch's output projection
        ~ N(0, init_std / sqrt(2 * layers)) as in GPT-2 (layers = encoder + decoder blocks)."""
        std = self.config.init_std
        init_normal_(self, std)
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

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one, innermost first (zenlm.train.distributed): every block, and
        before them each decoder block's cross-attention K/V projection, which :meth:`decode` calls outside the
        block's own forward."""
        return [*(block.cross_attn.kv for block in self.dec_blocks), *self.enc_blocks, *self.dec_blocks]

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
            x_BSC = block(x_BSC, rope=rope, mask=mask)  # bidirectional: no causal mask
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
        mask_TS, is_causal = cached_causal_mask(pos, T, tgt_BT.device)  # as GPT.forward
        layers = None if cache is None else cache.self_kv.layers(T)
        for i, (block, kv) in enumerate(zip(self.dec_blocks, cross, strict=True)):
            x_BTC = block(x_BTC, kv, src_mask, rope=rope, cache=None if layers is None else layers[i], mask=mask_TS,
                          is_causal=is_causal)
        if cache is not None:
            cache.self_kv.pos = pos + T
        if last_only:
            x_BTC = x_BTC[:, -1:]
        x_BTC = self.dec_norm(x_BTC)
        if self.lm_head is None:
            return F.linear(x_BTC, self.tok_emb.weight).float()
        return self.lm_head(x_BTC).float()

    def forward(self, src_BS: Tensor, tgt_BT: Tensor, src_mask_BS: Tensor | None = None) -> Tensor:
        """Teacher forcing: logits [B, T, V] for every target position given the whole source."""
        return self.decode(tgt_BT, self.encode(src_BS, src_mask_BS), src_mask_BS)


__all__ = ["EncDecConfig", "EncoderDecoder", "DecoderBlock", "ENCDEC_PRESETS", "get_encdec_preset"]
