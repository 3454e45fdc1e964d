"""Sequence classification: any backbone's hidden states -> one vector per text -> class logits.

    h = backbone(ids, mask)                                  # [B, T, C]  (Bert.forward or GPT.features)
    v = pool(h)                                              # [B, C]
          "cls":  tanh(W_p h[:, 0])       BERT's pooler on the first ([CLS]) position
          "mean": mean of h over real tokens              (sentence-transformers style)
          "last": h[b, len_b - 1]         the last real token (decoders: it has read the whole text)
    logits = W_c dropout(v) + b_c                            # [B, n_classes]

Trained with cross-entropy on the class index; ``softmax(logits)`` are the class probabilities.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from zenlm.errors import ConfigError

Pooling = Literal["cls", "mean", "last"]
POOLINGS = ("cls", "mean", "last")


class SequenceClassifier(nn.Module):
    """``backbone`` (a :class:`~zenlm.models.bert.Bert` or a :class:`~zenlm.models.gpt.GPT`) with a linear
    classification head. Module names: ``backbone.*`` and ``head`` (Linear(C, n_classes))."""

    # For optimisers that treat matrices by role (zenlm.train.optim.roles_of); the backbone declares its own.
    param_roles: ClassVar[dict[str, str]] = {"head": "head"}

    def __init__(self, backbone: nn.Module, n_classes: int, pooling: Pooling, dropout: float = 0.1) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling {pooling!r} is not supported; choose one of {', '.join(POOLINGS)}.")
        self.is_encoder = hasattr(backbone, "pool")  # Bert; a GPT reads its features causally
        if pooling == "cls" and not self.is_encoder:
            raise ConfigError("pooling 'cls' needs a BERT encoder; a decoder reads its text at the last token "
                              "(pooling 'last').")
        if n_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {n_classes}.")
        self.backbone = backbone
        self.pooling = pooling
        self.config = backbone.config
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(backbone.config.n_embd, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @property
    def n_classes(self) -> int:
        return self.head.out_features

    def hidden(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        """[B, T] ids and 0/1 mask (right padding) -> [B, T, C] hidden states."""
        return self.backbone(ids_BT, mask_BT) if self.is_encoder else self.backbone.features(ids_BT)

    def pool(self, h_BTC: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        """[B, T, C] hidden states -> [B, C] one vector per text (see the module docstring)."""
        if self.pooling == "cls":
            return self.backbone.pool(h_BTC)
        if self.pooling == "mean":
            m = mask_BT[..., None].to(h_BTC.dtype)
            return (h_BTC * m).sum(1) / m.sum(1).clamp(min=1.0)
        last_B = mask_BT.sum(1).long().clamp(min=1) - 1
        return h_BTC[torch.arange(h_BTC.shape[0], device=h_BTC.device), last_B]

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        """Class logits [B, n_classes] (float32)."""
        return self.head(self.drop(self.pool(self.hidden(ids_BT, mask_BT), mask_BT))).float()


__all__ = ["POOLINGS", "Pooling", "SequenceClassifier"]
