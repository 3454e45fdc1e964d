"""Models that read a text and answer with vectors or labels instead of continuing it.

``zenlm.load(RUN)`` returns an :class:`EncoderLM` for a BERT run (pretrained with ``--objective mlm`` or
imported with ``zenlm convert from-hf``) and for any classifier made by ``zenlm finetune classify``::

    lm = zenlm.load("runs/minilm")
    vecs = lm.embed(["A cat.", "Un chat."])           # [2, C], L2-normalised mean of the hidden states
    lm.fill_mask("Paris is the [MASK] of France.")    # BERT runs: the likeliest tokens for each mask
    clf = zenlm.load("runs/bbc-classifier")
    clf.classify(["Shares fell sharply ..."])         # [{"label": "business", "prob": 0.97, "probs": {...}}]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zenlm.data.classify import encode_for_model, pad_batch
from zenlm.device import model_device
from zenlm.errors import ConfigError
from zenlm.tokenizer import Tokenizer


class EncoderLM:
    """A BERT encoder, or a classifier (on a BERT or GPT backbone), with its tokenizer.

    model:   a :class:`~zenlm.models.bert.Bert` or a :class:`~zenlm.models.classifier.SequenceClassifier`
    labels:  the class names, index-aligned with the classifier's outputs (None for a plain encoder)
    max_len: texts are cut to this many tokens (special tokens included)
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, run_dir: Path | None = None, *,
                 labels: Sequence[str] | None = None, max_len: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.run_dir = run_dir
        self.labels = list(labels) if labels is not None else None
        self.is_classifier = self.labels is not None
        self.is_encoder = hasattr(self.backbone, "pool")
        self.max_len = min(max_len or self.config.block_size, self.config.block_size)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone if hasattr(self.model, "backbone") else self.model

    @property
    def config(self) -> Any:
        return self.backbone.config

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def _batches(self, texts: str | Sequence[str], batch_size: int) -> Any:
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ConfigError("give at least one text.")
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        # longest first within the call: batches of similar lengths waste less work on padding
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            seqs = encode_for_model(self.tokenizer, [texts[i] for i in idx], self.max_len, encoder=self.is_encoder)
            ids, mask = pad_batch(seqs, pad)
            yield idx, ids.to(self.device), mask.to(self.device)

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        return b(ids, mask) if self.is_encoder else b.features(ids)

    @torch.inference_mode()
    def embed(self, texts: str | Sequence[str], *, normalize: bool = True, batch_size: int = 32) -> torch.Tensor:
        """Sentence embeddings [N, C] (float32): the mean of the last hidden states over each text's tokens,
        L2-normalised when ``normalize`` (then ``a @ b.T`` is the cosine similarity)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.empty(len(texts), self.config.n_embd)
        for idx, ids, mask in self._batches(texts, batch_size):
            h = self._hidden(ids, mask).float()
            m = mask[..., None].to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            out[idx] = (F.normalize(e, dim=-1) if normalize else e).cpu()
        return out

    @torch.inference_mode()
    def predict_proba(self, texts: str | Sequence[str], *, batch_size: int = 32) -> torch.Tensor:
        """Class probabilities [N, n_classes] (softmax of the classifier's logits)."""
        if not self.is_classifier:
            raise ConfigError("this run is not a classifier; make one with `zenlm finetune classify --base RUN`.")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.empty(len(texts), len(self.labels or []))
        for idx, ids, mask in self._batches(texts, batch_size):
            out[idx] = self.model(ids, mask).float().softmax(-1).cpu()
        return out

    def classify(self, texts: str | Sequence[str], *, batch_size: int = 32) -> list[dict[str, Any]]:
        """For each text: {"label": best class, "prob": its probability, "probs": {class: probability}}."""
        probs = self.predict_proba(texts, batch_size=batch_size)
        labels = self.labels or []
        return [{"label": labels[int(p.argmax())], "prob": float(p.max()),
                 "probs": {c: float(v) for c, v in zip(labels, p.tolist(), strict=True)}} for p in probs]

    @torch.inference_mode()
    def fill_mask(self, text: str, *, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """For each mask token in ``text`` (the tokenizer's mask token, e.g. "[MASK]" or "<|mask|>"): the
        ``top_k`` likeliest tokens with their probabilities (BERT runs with an MLM head)."""
        if not self.is_encoder or self.is_classifier:
            raise ConfigError("fill_mask needs a BERT run with its masked-LM head (not a classifier or a GPT).")
        tok = self.tokenizer
        if tok.mask_id is None:
            raise ConfigError("this tokenizer has no mask token.")
        ids = tok.encode(text, allow_special=True)[: self.max_len - 2]
        seq = [tok.bos_id] + ids + [tok.eos_id] if tok.bos_id is not None and tok.eos_id is not None else ids
        where = [i for i, t in enumerate(seq) if t == tok.mask_id]
        if not where:
            raise ConfigError(f"the text has no mask token; write {tok.id_to_token(tok.mask_id)!r} where a word "
                              "is missing.")
        x = torch.tensor([seq], device=self.device)
        h = self.model(x, torch.ones_like(x))[0, where]
        probs = self.model.mlm_logits(h).softmax(-1)
        top = probs.topk(top_k, dim=-1)
        return [[(tok.id_to_token(int(i)) or "", float(p)) for p, i in zip(ps.tolist(), ix.tolist(), strict=True)]
                for ps, ix in zip(top.values, top.indices, strict=True)]


__all__ = ["EncoderLM"]
