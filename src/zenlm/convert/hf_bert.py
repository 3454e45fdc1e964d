"""Hugging Face BERT checkpoints (BertModel, BertForMaskedLM, BertForPreTraining, sentence-transformers'
MiniLM) -> zenlm :class:`~zenlm.models.bert.Bert` and a zenlm run directory.

Weight map (theirs -> ours; ``bert.`` prefixes are dropped first)::

    embeddings.word_embeddings            tok_emb           (also the MLM decoder: tied)
    embeddings.position_embeddings        pos_emb
    embeddings.token_type_embeddings      typ_emb
    embeddings.LayerNorm                  ln_emb
    encoder.layer.i.attention.self.{query,key,value}   blocks.i.qkv      (stacked along the output dim)
    encoder.layer.i.attention.output.dense             blocks.i.proj
    encoder.layer.i.attention.output.LayerNorm         blocks.i.ln1
    encoder.layer.i.intermediate.dense                 blocks.i.fc
    encoder.layer.i.output.dense                       blocks.i.out
    encoder.layer.i.output.LayerNorm                   blocks.i.ln2
    pooler.dense                          pooler            (absent in some MLM checkpoints: initialised)
    cls.predictions.transform.dense       mlm_dense         (absent in BertModel checkpoints: initialised)
    cls.predictions.transform.LayerNorm   mlm_ln
    cls.predictions.bias                  mlm_bias
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import save_file
from torch import Tensor

from zenlm.convert.outdir import check_out_dir
from zenlm.errors import CheckpointError, DataError
from zenlm.fileio import atomic_path, atomic_write_text
from zenlm.models.bert import Bert, BertConfig
from zenlm.progress import ProgressFn, report
from zenlm.tokenizer import Tokenizer

# our optional heads -> their names; a checkpoint without them gets freshly initialised ones
_HEADS = {
    "pooler.weight": "pooler.dense.weight", "pooler.bias": "pooler.dense.bias",
    "mlm_dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_ln.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_ln.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm_bias": "cls.predictions.bias",
}
# tensors that carry nothing we need: buffers, the tied decoder copy, next-sentence prediction
_SKIP = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
         "cls.seq_relationship.weight", "cls.seq_relationship.bias")


def bert_config_from_hf(hf: dict[str, Any], where: str = "config.json") -> BertConfig:
    """Map a transformers BERT config.json to a BertConfig (CheckpointError for what we cannot compute)."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported (only 'gelu').")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{where}: position_embedding_type {hf['position_embedding_type']!r} is not "
                              "supported (only 'absolute').")
    try:
        return BertConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"],
                          n_head=hf["num_attention_heads"], d_ff=hf["intermediate_size"],
                          max_len=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                          layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                          dropout=hf.get("hidden_dropout_prob", 0.1), init_std=hf.get("initializer_range", 0.02),
                          pad_id=hf.get("pad_token_id") or 0)
    except KeyError as e:
        raise CheckpointError(f"{where} has no {e.args[0]!r}; is it a BERT config?") from None


def bert_state_from_hf(sd: dict[str, Tensor], cfg: BertConfig) -> tuple[dict[str, Tensor], list[str]]:
    """Rename (and stack q/k/v of) a transformers BERT state dict to ours.

    Returns (our tensors, names of our optional head tensors the checkpoint lacks). Unknown tensors are
    refused: they would mean the checkpoint and config.json describe different models.
    """
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in sd:
            raise CheckpointError(f"the checkpoint has no tensor {name!r}; it does not match config.json.")
        used.add(name)
        return sd[name]

    e = "embeddings."
    out = {"tok_emb.weight": take(e + "word_embeddings.weight"), "pos_emb.weight": take(e + "position_embeddings.weight"),
           "typ_emb.weight": take(e + "token_type_embeddings.weight"), "ln_emb.weight": take(e + "LayerNorm.weight"),
           "ln_emb.bias": take(e + "LayerNorm.bias")}
    for i in range(cfg.n_layer):
        p, o = f"encoder.layer.{i}.", f"blocks.{i}."
        for s in ("weight", "bias"):
            out[o + "qkv." + s] = torch.cat([take(p + f"attention.self.{n}.{s}") for n in ("query", "key", "value")])
            out[o + "proj." + s] = take(p + "attention.output.dense." + s)
            out[o + "ln1." + s] = take(p + "attention.output.LayerNorm." + s)
            out[o + "fc." + s] = take(p + "intermediate.dense." + s)
            out[o + "out." + s] = take(p + "output.dense." + s)
            out[o + "ln2." + s] = take(p + "output.LayerNorm." + s)
    missing = []
    for ours, theirs in _HEADS.items():
        if theirs in sd:
            out[ours] = take(theirs)
        else:
            missing.append(ours)
    unknown = sorted(k for k in sd if k not in used and k not in _SKIP)
    if unknown:
        raise CheckpointError(f"the checkpoint holds {unknown[0]!r} (and {len(unknown) - 1} more tensors) that a "
                              f"{cfg.n_layer}-layer BERT has no place for; it does not match config.json.")
    return out, missing


def _read_weights(src: Path) -> dict[str, Tensor]:
    st, binf = src / "model.safetensors", src / "pytorch_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if binf.is_file():
        return torch.load(str(binf), map_location="cpu", weights_only=True)
    raise CheckpointError(f"{src} has neither model.safetensors nor pytorch_model.bin.")


def load_hf_bert(src_dir: str | os.PathLike[str]) -> Bert:
    """A :class:`Bert` (eval mode) straight from a Hugging Face BERT directory, without writing a run."""
    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json; give a Hugging Face BERT model directory.")
    cfg = bert_config_from_hf(json.loads((src / "config.json").read_text(encoding="utf-8")), str(src / "config.json"))
    model = Bert(cfg)
    state, _ = bert_state_from_hf(_read_weights(src), cfg)
    model.load_state_dict(state, strict=False)  # missing optional heads keep their initialisation
    return model.eval()


def _bert_tokenizer(src: Path, out: Path) -> Tokenizer:
    """tokenizer.json (or one built from vocab.txt) without fixed padding/truncation, and a tokenizer_config.json
    in which [CLS] and [SEP] play the bos/eos roles zenlm's encoders use."""
    cfg: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (src / name).is_file():
            try:
                cfg.update(json.loads((src / name).read_text(encoding="utf-8")))
            except json.JSONDecodeError as e:
                raise DataError(f"{src / name} is not valid JSON ({e}).") from None
    cfg = {k: (v.get("content") if isinstance(v, dict) and k.endswith("_token") else v) for k, v in cfg.items()}
    if (src / "tokenizer.json").is_file():
        hf = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    elif (src / "vocab.txt").is_file():
        from tokenizers.implementations import BertWordPieceTokenizer

        hf = BertWordPieceTokenizer(str(src / "vocab.txt"), lowercase=bool(cfg.get("do_lower_case", True)))._tokenizer
    else:
        raise DataError(f"{src} has neither tokenizer.json nor vocab.txt; the BERT tokenizer is needed.")
    hf.no_padding()  # zenlm pads per batch; a fixed 128-token padding (as some repositories ship) is dropped
    hf.no_truncation()
    roles = {"bos_token": cfg.get("cls_token", "[CLS]"), "eos_token": cfg.get("sep_token", "[SEP]"),
             "pad_token": cfg.get("pad_token", "[PAD]"), "unk_token": cfg.get("unk_token", "[UNK]"),
             "mask_token": cfg.get("mask_token", "[MASK]")}
    for role, token in roles.items():
        if hf.token_to_id(token) is None:
            raise DataError(f"{src}: the {role.removesuffix('_token')} token {token!r} is not in the vocabulary.")
    tok_cfg = {"tokenizer_class": "BertTokenizerFast", **{k: v for k, v in cfg.items() if k.endswith("_token")},
               **roles, "cls_token": roles["bos_token"], "sep_token": roles["eos_token"],
               "do_lower_case": cfg.get("do_lower_case", True), "model_max_length": cfg.get("model_max_length", 512),
               "zenlm_kind": "wordpiece"}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", hf.to_str(pretty=True))
    atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    return Tokenizer.load(out)


def import_bert(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, overwrite: bool = False,
                progress: ProgressFn | None = None) -> Path:
    """Write a zenlm run directory (config.yaml with arch "bert", model.safetensors, tokenizer files) from a
    Hugging Face BERT directory; ``zenlm.load(out_dir)`` then gives an encoder with embed()/fill_mask().

    The run is written into a temporary folder beside ``out_dir`` and renamed (zenlm.fileio.atomic_path), so a
    failure leaves nothing.
    """
    from zenlm import __version__
    from zenlm.rundir import write_run_config

    src, out = Path(src_dir), Path(out_dir)
    check_out_dir(out, writes="run", sources=[src], overwrite=overwrite)
    cfg_file = src / "config.json"
    cfg = bert_config_from_hf(json.loads(cfg_file.read_text(encoding="utf-8")), str(cfg_file))
    report(progress, "convert", message=f"BERT: {cfg.n_layer} layers x {cfg.d_model} wide, vocab {cfg.vocab_size}")
    state, missing = bert_state_from_hf(_read_weights(src), cfg)
    model = Bert(cfg)
    model.load_state_dict(state, strict=False)
    with atomic_path(out) as tmp:
        tok = _bert_tokenizer(src, tmp)
        if tok.vocab_size > cfg.vocab_size:
            raise DataError(f"{src}: the tokenizer has {tok.vocab_size} tokens but the model {cfg.vocab_size} "
                            "embeddings.")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        write_run_config(tmp, {"zenlm_version": __version__, "model": cfg.to_dict(), "objective": "mlm",
                               "source": {"format": "huggingface", "architecture": "bert", "dir": str(src.resolve()),
                                          "initialised_heads": sorted({m.split(".")[0] for m in missing})}})
    return out


__all__ = ["bert_config_from_hf", "bert_state_from_hf", "import_bert", "load_hf_bert"]
