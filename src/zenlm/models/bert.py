"""BERT: a bidirectional Transformer encoder, post-LN as in the original paper, so real BERT/MiniLM
checkpoints load unchanged.

    x = LN(tok_emb(ids) + pos_emb(0..T-1) + typ_emb(types))           # [B, T, C]
    for each block:                                                    # post-LN: the norm comes *after*
        x = LN(x + Attn(x, padding mask))                              #   each residual sum
        x = LN(x + W_out gelu(W_in x))
    hidden = x                                                         # [B, T, C]

Heads on top of the hidden states:

    mlm_logits = LN(gelu(W_t hidden)) @ tok_emb.weight^T + b           # masked-LM head, decoder tied [B, T, V]
    pooled     = tanh(W_p hidden[:, 0])                                # pooler: the first ([CLS]) position [B, C]
    embedding  = mean of hidden over real (unpadded) tokens            # sentence embedding [B, C]

Unlike a GPT, every position attends to every other one (no causal mask); padding is hidden from the
attention by an additive -inf bias on the padded keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from zenlm.config import ModelConfig, Preset, config_from_preset
from zenlm.errors import ConfigError
from zenlm.models.attention import Attention
from zenlm.models.layers import init_normal_


@dataclass
class BertConfig(ModelConfig):
    """Shape of a BERT encoder.

    vocab_size:      token ids the embedding accepts
    d_model:         width C; head dim = d_model // n_head
    n_layer:         encoder blocks
    n_head:          attention heads
    d_ff:            inner width of the feed-forward layer (4*C in BERT)
    max_len:         positions 0..max_len-1 (learned position embeddings)
    type_vocab_size: token-type (segment) ids; 2 in BERT (sentence A / B)
    layer_norm_eps:  epsilon of every LayerNorm (1e-12 in BERT)
    dropout:         on the embeddings and the residual branches while training
    attn_dropout:    on the attention weights while training. BERT used 0.1; the default 0 lets PyTorch use its
                     fused attention kernel instead of materialising and masking every [T, T] score matrix,
                     which makes a CPU fine-tuning step about 1.5x faster
    init_std:        normal initialisation of weights (0.02 in BERT)
    pad_id:          the padding token id
    """

    vocab_size: int = 30522
    d_model: int = 384
    n_layer: int = 6
    n_head: int = 12
    d_ff: int = 1536
    max_len: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attn_dropout: float = 0.0
    init_std: float = 0.02
    pad_id: int = 0
    ARCH: ClassVar[str] = "bert"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_ff", "max_len", "type_vocab_size"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}.")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}).")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}.")

    # GPTConfig-style names, so code that reports a model's shape works for both families
    @property
    def n_embd(self) -> int:
        return self.d_model

    @property
    def block_size(self) -> int:
        return self.max_len

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count from the shapes (encoder, pooler and MLM head; the MLM decoder is tied)."""
        C, F_, V = self.d_model, self.d_ff, self.vocab_size
        block = (3 * C * C + 3 * C) + (C * C + C) + (C * F_ + F_) + (F_ * C + C) + 4 * C
        emb = (V + self.max_len + self.type_vocab_size) * C + 2 * C
        heads = (C * C + C) + (C * C + C + 2 * C + V)  # pooler; MLM transform + LN + output bias
        total = self.n_layer * block + emb + heads
        return total if include_embedding else total - (V + self.max_len + self.type_vocab_size) * C


# Named shapes. The small ones follow the BERT miniatures (Turc et al., 2019); minilm-l6 is the shape of
# all-MiniLM-L6-v2.
BERT_PRESETS: dict[str, Preset] = {
    "bert-tiny": Preset("2 layers x 128 wide, 2 heads: seconds per epoch on a CPU, for tests and smoke runs.",
                        dict(n_layer=2, d_model=128, n_head=2, d_ff=512, max_len=512)),
    "bert-mini": Preset("4 layers x 256 wide, 4 heads.", dict(n_layer=4, d_model=256, n_head=4, d_ff=1024, max_len=512)),
    "bert-small": Preset("4 layers x 512 wide, 8 heads.",
                         dict(n_layer=4, d_model=512, n_head=8, d_ff=2048, max_len=512)),
    "bert-medium": Preset("8 layers x 512 wide, 8 heads.",
                          dict(n_layer=8, d_model=512, n_head=8, d_ff=2048, max_len=512)),
    "minilm-l6": Preset("6 layers x 384 wide, 12 heads (the all-MiniLM-L6-v2 shape).",
                        dict(n_layer=6, d_model=384, n_head=12, d_ff=1536, max_len=512)),
    "bert-base": Preset("BERT-base: 12 layers x 768 wide, 12 heads (110M with its 30522 vocabulary).",
                        dict(n_layer=12, d_model=768, n_head=12, d_ff=3072, max_len=512)),
}


class BertBlock(Attention):
    """One post-LN encoder block: ``x = LN(x + attn(x)); x = LN(x + mlp(x))``.

    The block *is* its self-attention (:class:`~zenlm.models.attention.Attention`, which it extends with the
    norms and the MLP) so that the attention's parameters sit on the block itself, where BERT checkpoints and
    our converter put them: ``blocks.i.qkv`` (q, k, v stacked along the output dim) and ``blocks.i.proj``.
    """

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__(cfg.d_model, cfg.n_head, dropout=cfg.attn_dropout)
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x_BTC: torch.Tensor, bias_B11T: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """x_BTC [B, T, C], bias_B11T additive attention bias (0 for real keys, -inf for padding) -> [B, T, C]."""
        # softmax(q k^T / sqrt(D) + bias) v, every position attending to every (real) position
        x_BTC = self.ln1(x_BTC + self.drop(super().forward(x_BTC, mask=bias_B11T)))
        return self.ln2(x_BTC + self.drop(self.out(F.gelu(self.fc(x_BTC)))))


class Bert(nn.Module):
    """BERT encoder with its pooler and masked-LM head.

    Module names: ``tok_emb``, ``pos_emb``, ``typ_emb``, ``ln_emb``, ``blocks.{i}.*``, ``pooler``, ``mlm_dense``,
    ``mlm_ln``, ``mlm_bias`` (the MLM decoder is ``tok_emb``).
    """

    # For optimisers that treat matrices by role (zenlm.train.optim.roles_of): the pooler and the MLM head
    # read out of the encoder; every matrix of the blocks is a hidden matrix.
    param_roles: ClassVar[dict[str, str]] = {"pooler": "head", "mlm_dense": "head"}

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        C = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.pos_emb = nn.Embedding(cfg.max_len, C)
        self.typ_emb = nn.Embedding(cfg.type_vocab_size, C)
        self.ln_emb = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(BertBlock(cfg) for _ in range(cfg.n_layer))
        self.pooler = nn.Linear(C, C)
        self.mlm_dense = nn.Linear(C, C)
        self.mlm_ln = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BERT's initialisation: weights ~ N(0, init_std), biases 0, LayerNorm gains 1."""
        init_normal_(self, self.config.init_std)
        nn.init.zeros_(self.mlm_bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor | None = None,
                types_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Last hidden states: ids_BT [B, T] int64, mask_BT [B, T] (1 = real token, 0 = padding; None = all
        real), types_BT [B, T] segment ids (None = all 0) -> [B, T, C]."""
        if ids_BT.dim() != 2:
            raise ConfigError(f"Bert expects token ids of shape [batch, time], got {tuple(ids_BT.shape)}.")
        B, T = ids_BT.shape
        if T > self.config.max_len:
            raise ConfigError(f"sequence length {T} exceeds the model's max_len {self.config.max_len}; "
                              "truncate the input.")
        if types_BT is None:
            types_BT = torch.zeros_like(ids_BT)
        x = self.tok_emb(ids_BT) + self.pos_emb.weight[:T] + self.typ_emb(types_BT)
        x = self.drop(self.ln_emb(x))
        bias_B11T = torch.zeros(B, 1, 1, T, dtype=x.dtype, device=x.device)
        if mask_BT is not None:
            bias_B11T = bias_B11T.masked_fill(mask_BT[:, None, None, :] == 0, -math.inf)
        for block in self.blocks:
            x = block(x, bias_B11T)
        return x

    def mlm_logits(self, h_NC: torch.Tensor) -> torch.Tensor:
        """Masked-LM logits for hidden states [..., C] -> [..., V] (float32); the decoder is ``tok_emb``."""
        h = self.mlm_ln(F.gelu(self.mlm_dense(h_NC)))
        return (F.linear(h, self.tok_emb.weight) + self.mlm_bias).float()

    def pool(self, h_BTC: torch.Tensor) -> torch.Tensor:
        """BERT's pooled output: tanh(W_p h[:, 0] + b_p), [B, T, C] -> [B, C]."""
        return torch.tanh(self.pooler(h_BTC[:, 0]))

    def embed(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Sentence embeddings: the mean of the last hidden states over real tokens, [B, T] -> [B, C];
        L2-normalised when ``normalize`` (cosine similarity is then a dot product)."""
        h = self.forward(ids_BT, mask_BT)
        m = mask_BT[..., None].to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(e, dim=-1) if normalize else e


def get_bert_preset(name: str, **overrides: Any) -> BertConfig:
    """The BertConfig of preset ``name`` with any BertConfig fields in ``overrides`` changed."""
    return config_from_preset(BertConfig, BERT_PRESETS, name, overrides, "BERT")


__all__ = ["BERT_PRESETS", "Bert", "BertBlock", "BertConfig", "get_bert_preset"]
