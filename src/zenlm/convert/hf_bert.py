"""Hugging Face BERT <-> zenlm :class:`~zenlm.models.bert.Bert`, both directions from one weight map.

    import_bert(DIR, RUN)   BertModel, BertForMaskedLM, BertForPreTraining, sentence-transformers' MiniLM
                            -> a zenlm run directory
    export_bert(RUN, DIR)   a BERT run -> BertForMaskedLM (or BertModel when its masked-LM head was never
                            trained); a BERT classifier run with ``--pooling cls`` -> BertForSequenceClassification

Weight map (:func:`bert_weight_map`; their names as in ``BertModel``, the ``bert.`` prefix of the task models
added or dropped around it)::

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
    classifier                            head              (classifier runs: SequenceClassifier's head)

The arithmetic matches without any reshaping: post-LN blocks, exact-erf GELU, LayerNorm eps from the config,
and BertForSequenceClassification's ``classifier(dropout(pooler_output))`` is a classifier run's
``head(dropout(tanh(W_p h[:, 0])))`` with ``pooling: cls``.
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

from zenlm.convert.common import (
    HF_DTYPE_NAME,
    WeightRule,
    export_tokenizer_config,
    load_run_tokenizer,
    prepare_out,
    theirs_state,
    write_json,
)
from zenlm.convert.outdir import check_out_dir
from zenlm.device import DTYPES
from zenlm.errors import CheckpointError, ConfigError, DataError
from zenlm.fileio import atomic_path, atomic_write_text
from zenlm.models.bert import Bert, BertConfig
from zenlm.progress import ProgressFn, report
from zenlm.tokenizer import Tokenizer

# our optional heads: a checkpoint without them gets freshly initialised ones
HEADS = {"pooler": ("pooler.weight", "pooler.bias"),
         "mlm": ("mlm_dense.weight", "mlm_dense.bias", "mlm_ln.weight", "mlm_ln.bias", "mlm_bias")}
# tensors that carry nothing we need: buffers, the tied decoder copy, next-sentence prediction
_SKIP = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
         "cls.seq_relationship.weight", "cls.seq_relationship.bias")


def bert_weight_map(cfg: BertConfig, heads: tuple[str, ...] = ("pooler", "mlm")) -> list[WeightRule]:
    """Bert <-> transformers' BERT: one :class:`~zenlm.convert.hf.WeightRule` per tensor of ours, their
    names as ``BertModel`` spells them (``cls.*`` for the masked-LM head). ``heads``: which optional heads to
    include ("pooler", "mlm")."""
    C = cfg.d_model
    e = "embeddings."
    rules = [WeightRule("tok_emb.weight", (e + "word_embeddings.weight",)),
             WeightRule("pos_emb.weight", (e + "position_embeddings.weight",)),
             WeightRule("typ_emb.weight", (e + "token_type_embeddings.weight",)),
             WeightRule("ln_emb.weight", (e + "LayerNorm.weight",)), WeightRule("ln_emb.bias", (e + "LayerNorm.bias",))]
    for i in range(cfg.n_layer):
        p, o = f"encoder.layer.{i}.", f"blocks.{i}."
        for s in ("weight", "bias"):
            rules.append(WeightRule(o + "qkv." + s, tuple(p + f"attention.self.{n}.{s}" for n in ("query", "key", "value")),
                                    split=(C, C, C)))
            for ours, theirs in [("proj", "attention.output.dense"), ("ln1", "attention.output.LayerNorm"),
                                 ("fc", "intermediate.dense"), ("out", "output.dense"), ("ln2", "output.LayerNorm")]:
                rules.append(WeightRule(f"{o}{ours}.{s}", (f"{p}{theirs}.{s}",)))
    if "pooler" in heads:
        rules += [WeightRule("pooler.weight", ("pooler.dense.weight",)), WeightRule("pooler.bias", ("pooler.dense.bias",))]
    if "mlm" in heads:
        t = "cls.predictions.transform."
        rules += [WeightRule("mlm_dense.weight", (t + "dense.weight",)), WeightRule("mlm_dense.bias", (t + "dense.bias",)),
                  WeightRule("mlm_ln.weight", (t + "LayerNorm.weight",)), WeightRule("mlm_ln.bias", (t + "LayerNorm.bias",)),
                  WeightRule("mlm_bias", ("cls.predictions.bias",))]
    return rules


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


def bert_config_to_hf(cfg: BertConfig) -> dict[str, Any]:
    """The transformers ``BertConfig`` fields of a BertConfig (the inverse of :func:`bert_config_from_hf`)."""
    return {"model_type": "bert", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "intermediate_size": cfg.d_ff,
            "max_position_embeddings": cfg.max_len, "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": "gelu", "position_embedding_type": "absolute",
            "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.attn_dropout,
            "initializer_range": cfg.init_std, "pad_token_id": cfg.pad_id, "tie_word_embeddings": True}


def bert_state_from_hf(sd: dict[str, Tensor], cfg: BertConfig) -> tuple[dict[str, Tensor], list[str]]:
    """Rename (and stack q/k/v of) a transformers BERT state dict to ours, through :func:`bert_weight_map`.

    Returns (our tensors, names of our optional head tensors the checkpoint lacks). Unknown tensors are
    refused: they would mean the checkpoint and config.json describe different models.
    """
    sd = {k.removeprefix("bert."): v for k, v in sd.items()}
    optional = {name for names in HEADS.values() for name in names}
    used: set[str] = set()
    out: dict[str, Tensor] = {}
    missing = []
    for rule in bert_weight_map(cfg):
        absent = [n for n in rule.theirs if n not in sd]
        if absent and rule.ours in optional:
            missing.append(rule.ours)
            continue
        if absent:
            raise CheckpointError(f"the checkpoint has no tensor {absent[0]!r}; it does not match config.json.")
        used.update(rule.theirs)
        out[rule.ours] = rule.to_ours([sd[n] for n in rule.theirs])
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


# ------------------------------------------------------------------------------------------------ export


def _prefixed(rules: list[WeightRule], ours: str, theirs: str) -> list[WeightRule]:
    """The rules with ``ours`` before our names and ``theirs`` before their encoder names (the masked-LM head,
    ``cls.*``, sits beside the encoder in transformers' task models, not inside it)."""
    def their(name: str) -> str:
        return name if name.startswith("cls.") else theirs + name

    return [WeightRule(ours + r.ours, tuple(their(n) for n in r.theirs), r.transpose, r.split) for r in rules]


def bert_export_plan(saved: dict[str, Any], cfg: BertConfig, where: Path) -> tuple[str, list[WeightRule]]:
    """(transformers architecture, weight map) for a BERT run or a BERT classifier run, from its config.yaml
    contents; ConfigError naming the setting that has no transformers counterpart."""
    task = saved.get("task") or {}
    if task.get("kind") == "classify":
        if saved["model"].get("arch") != "bert":
            raise ConfigError(f"{where}: a classifier on a GPT backbone has no exact transformers counterpart "
                              "(their ...ForSequenceClassification heads have no bias and pick the last token "
                              "by the padding id); fine-tune on a BERT base to export a classifier.")
        if task.get("pooling") != "cls":
            raise ConfigError(f"{where}: pooling={task.get('pooling')!r} has no transformers counterpart: "
                              "BertForSequenceClassification classifies BERT's pooled [CLS] vector. Fine-tune "
                              "with --pooling cls for a classifier that exports.")
        rules = _prefixed(bert_weight_map(cfg, heads=("pooler",)), "backbone.", "bert.")
        rules += [WeightRule("head.weight", ("classifier.weight",)), WeightRule("head.bias", ("classifier.bias",))]
        return "BertForSequenceClassification", rules
    # An imported BertModel (MiniLM, sentence encoders) never had a masked-LM head: export the encoder and its
    # pooler. Everything else exports as BertForMaskedLM; masked-LM pretraining never trains the pooler, and
    # BertForMaskedLM has none.
    initialised = set((saved.get("source") or {}).get("initialised_heads") or [])
    if "mlm_dense" in initialised:
        return "BertModel", bert_weight_map(cfg, heads=("pooler",))
    return "BertForMaskedLM", _prefixed(bert_weight_map(cfg, heads=("mlm",)), "", "bert.")


def encoder_tokenizer_json(tok: Tokenizer) -> str:
    """tokenizer.json of ``tok`` with a post-processor that adds what zenlm's encoders add to every text
    (``bos text eos``, token types 0; for a pair ``bos a eos b eos`` with the second part typed 1), so
    transformers' tokenizer gives the model the same ids as :func:`zenlm.data.classify.encode_for_model`."""
    from tokenizers import processors

    if tok.bos_id is None or tok.eos_id is None:
        raise CheckpointError("the tokenizer has no bos/eos tokens to play [CLS]/[SEP]; an encoder export needs "
                              "them.")
    hf = tokenizers.Tokenizer.from_str(tok.hf.to_str())
    cls, sep = tok.role_tokens["bos"], tok.role_tokens["eos"]
    hf.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tok.bos_id), (sep, tok.eos_id)])
    return hf.to_str(pretty=True)


def export_bert(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, dtype: str = "fp32",
                overwrite: bool = False, progress: ProgressFn | None = None) -> Path:
    """Write a BERT run as a transformers BertForMaskedLM (or BertModel) directory, or a BERT classifier run
    (``pooling: cls``) as BertForSequenceClassification with its labels; returns ``out_dir``.

    Files: config.json, model.safetensors, tokenizer.json (adding ``[CLS] text [SEP]`` like zenlm's encoders),
    tokenizer_config.json. ``AutoModel`` / ``AutoModelForMaskedLM`` / ``AutoModelForSequenceClassification``
    and ``AutoTokenizer`` load it.
    """
    from zenlm.rundir import build_model_from_run, load_run_weights

    run, out = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose fp32, bf16 or fp16.")
    model, cfg, saved = build_model_from_run(run)
    arch, rules = bert_export_plan(saved, cfg, run)  # type: ignore[arg-type]
    load_run_weights(run, model)
    tok = load_run_tokenizer(run, cfg.vocab_size)
    tokenizer_json = encoder_tokenizer_json(tok)
    prepare_out(out, "config.json", overwrite, source=run)

    save_file(theirs_state(model, rules, dtype, progress), str(out / "model.safetensors"),
              metadata={"format": "pt"})

    hf_cfg: dict[str, Any] = {"architectures": [arch], **bert_config_to_hf(cfg),  # type: ignore[arg-type]
                              "torch_dtype": HF_DTYPE_NAME[DTYPES[dtype]], "dtype": HF_DTYPE_NAME[DTYPES[dtype]]}
    task = saved.get("task") or {}
    if arch == "BertForSequenceClassification":
        labels = list(task["labels"])
        hf_cfg.update({"id2label": dict(enumerate(labels)), "label2id": {name: i for i, name in enumerate(labels)},
                       "num_labels": len(labels), "problem_type": "single_label_classification",
                       "classifier_dropout": task.get("dropout", 0.1)})
    write_json(out / "config.json", hf_cfg)
    atomic_write_text(out / "tokenizer.json", tokenizer_json)
    tok_cfg = export_tokenizer_config(run, tok, cfg.max_len)  # type: ignore[attr-defined]
    tok_cfg.update({"cls_token": tok.role_tokens["bos"], "sep_token": tok.role_tokens["eos"],
                    "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]})
    tok_cfg.pop("chat_template", None)  # an encoder does not chat
    write_json(out / "tokenizer_config.json", tok_cfg)
    return out


__all__ = ["HEADS", "bert_weight_map", "bert_config_from_hf", "bert_config_to_hf", "bert_state_from_hf",
           "bert_export_plan", "encoder_tokenizer_json", "import_bert", "load_hf_bert", "export_bert"]
