"""Hugging Face BERT weights -> zenlm.models.bert.Bert."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from zenlm.errors import CheckpointError
from zenlm.models.bert import Bert, BertConfig


def bert_config_from_hf(hf: dict) -> BertConfig:
    """Map a transformers BertConfig dict to a BertConfig."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"hidden_act {hf.get('hidden_act')!r} is not supported (only 'gelu')")
    return BertConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
                      n_head=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
                      max_len=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                      layer_norm_eps=hf.get("layer_norm_eps", 1e-12), pad_id=hf.get("pad_token_id", 0))


def bert_state_from_hf(sd: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """Rename (and fuse q/k/v of) a transformers BertModel state dict to ours."""
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    e = "embeddings."
    out = {"tok.weight": sd[e + "word_embeddings.weight"], "pos.weight": sd[e + "position_embeddings.weight"],
           "typ.weight": sd[e + "token_type_embeddings.weight"], "ln.weight": sd[e + "LayerNorm.weight"],
           "ln.bias": sd[e + "LayerNorm.bias"]}
    for i in range(n_layer):
        p, o = f"encoder.layer.{i}.", f"layers.{i}."
        for s in ("weight", "bias"):
            out[o + "qkv." + s] = torch.cat([sd[p + f"attention.self.{n}.{s}"] for n in ("query", "key", "value")])
            out[o + "proj." + s] = sd[p + "attention.output.dense." + s]
            out[o + "ln1." + s] = sd[p + "attention.output.LayerNorm." + s]
            out[o + "fc." + s] = sd[p + "intermediate.dense." + s]
            out[o + "out." + s] = sd[p + "output.dense." + s]
            out[o + "ln2." + s] = sd[p + "output.LayerNorm." + s]
    return out


def load_hf_bert(src_dir: str | Path) -> Bert:
    """Build a Bert from a Hugging Face BERT directory (config.json + model.safetensors)."""
    src = Path(src_dir)
    if not (src / "config.json").is_file() or not (src / "model.safetensors").is_file():
        raise CheckpointError(f"{src} needs config.json and model.safetensors")
    cfg = bert_config_from_hf(json.loads((src / "config.json").read_text()))
    model = Bert(cfg)
    model.load_state_dict(bert_state_from_hf(load_file(str(src / "model.safetensors")), cfg.n_layer))
    return model.eval()
