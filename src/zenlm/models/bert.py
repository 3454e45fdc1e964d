"""BERT encoder (post-LN, as in the original paper) so that real BERT/MiniLM checkpoints load unchanged.

Forward: embeddings (token + position + token type) -> LayerNorm -> N x [x = LN(x + Attn(x)); x = LN(x + MLP(x))].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zenlm.errors import ConfigError


@dataclass
class BertConfig:
    """Shape of a BERT encoder."""

    vocab_size: int = 30522
    d_model: int = 384
    n_layer: int = 6
    n_head: int = 12
    d_ff: int = 1536
    max_len: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")


class BertLayer(nn.Module):
    """One post-LN encoder layer."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, x_BTC: torch.Tensor, bias_B11T: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BTC.shape
        q, k, v = self.qkv(x_BTC).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        att_BHTD = F.scaled_dot_product_attention(q, k, v, attn_mask=bias_B11T)
        x_BTC = self.ln1(x_BTC + self.proj(att_BHTD.transpose(1, 2).reshape(B, T, C)))
        return self.ln2(x_BTC + self.out(F.gelu(self.fc(x_BTC))))


class Bert(nn.Module):
    """Token ids (B, T) -> last hidden states (B, T, d_model)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        self.typ = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.n_layer))

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor | None = None,
                types_BT: torch.Tensor | None = None) -> torch.Tensor:
        B, T = ids_BT.shape
        if types_BT is None:
            types_BT = torch.zeros_like(ids_BT)
        if mask_BT is None:
            mask_BT = torch.ones_like(ids_BT)
        x = self.ln(self.tok(ids_BT) + self.pos(torch.arange(T, device=ids_BT.device)) + self.typ(types_BT))
        bias_B11T = torch.zeros(B, 1, 1, T, dtype=x.dtype, device=x.device)
        bias_B11T = bias_B11T.masked_fill(mask_BT[:, None, None, :] == 0, -math.inf)
        for layer in self.layers:
            x = layer(x, bias_B11T)
        return x

    def embed(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Mean of the last hidden states over real tokens: (B, T) -> (B, d_model)."""
        h = self.forward(ids_BT, mask_BT)
        m = mask_BT[..., None].to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(e, dim=-1) if normalize else e
