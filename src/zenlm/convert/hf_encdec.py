"""zenlm encoder-decoder runs -> a `transformers` model that computes exactly the same thing, where one exists.

Which transformers encoder-decoder has zenlm's layout (:mod:`zenlm.models.encdec`)?

    zenlm       pre-norm blocks (x + sublayer(norm(x))) in both stacks, one final norm after each stack,
                positions added to the token embeddings (learned, from 0) or rotary, embeddings not scaled,
                attention softmax(q k^T / sqrt(D)), one token table for source and target
    BART        post-norm blocks (norm(x + sublayer(x))) and a LayerNorm right after the embeddings: no
    T5          relative-position buckets added to the attention scores, no 1/sqrt(D) scaling, no absolute
                positions: no
    Blenderbot  pre-norm blocks, a final LayerNorm per stack, learned positions from 0, no embedding norm,
                ``scale_embedding=False``, biases in every linear layer and LayerNorm (eps 1e-5): yes, for
                ``pos="learned"``, ``norm="layernorm"``, ``bias=True``, ``norm_eps=1e-5`` and a GELU (tanh)
                or squared-ReLU MLP, source and target sharing one table

So a run of that layout (the ``encdec-tiny`` and ``bart-base`` presets) is written as
``BlenderbotForConditionalGeneration``; any other is refused, naming the settings that have no counterpart.

Weight map (:func:`blenderbot_weight_map`; theirs under ``model.``)::

    tok_emb                          shared (= encoder.embed_tokens = decoder.embed_tokens)
    enc_pos / dec_pos                encoder.embed_positions / decoder.embed_positions
    enc_blocks.i.norm_attn           encoder.layers.i.self_attn_layer_norm
    enc_blocks.i.attn.qkv            encoder.layers.i.self_attn.{q,k,v}_proj      (stacked along dim 0)
    enc_blocks.i.attn.proj           encoder.layers.i.self_attn.out_proj
    enc_blocks.i.norm_mlp            encoder.layers.i.final_layer_norm
    enc_blocks.i.mlp.fc / .proj      encoder.layers.i.fc1 / fc2
    enc_norm / dec_norm              encoder.layer_norm / decoder.layer_norm
    dec_blocks.i.norm_self, self_attn.{qkv,proj}     decoder.layers.i.self_attn_layer_norm, self_attn.*
    dec_blocks.i.norm_cross          decoder.layers.i.encoder_attn_layer_norm
    dec_blocks.i.cross_attn.q / kv / proj            decoder.layers.i.encoder_attn.q_proj / {k,v}_proj / out_proj
    dec_blocks.i.norm_mlp, mlp.fc, mlp.proj          decoder.layers.i.final_layer_norm, fc1, fc2
    lm_head (untied runs only)       lm_head (outside ``model.``); an untied export also stores the
                                     table as encoder.embed_tokens and decoder.embed_tokens, which
                                     transformers then unties from ``shared``

Blenderbot has one position count for both stacks (``max_position_embeddings``); the shorter of our two
tables is padded with zero rows that zenlm never reaches (its inputs stop at max_source_len /
max_target_len, and ``generation_config.json`` stops targets there too).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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
from zenlm.device import DTYPES
from zenlm.errors import ConfigError
from zenlm.fileio import atomic_write_text
from zenlm.models.encdec import EncDecConfig
from zenlm.progress import ProgressFn

ARCHITECTURE = "BlenderbotForConditionalGeneration"
_ACTIVATION = {"gelu": "gelu_pytorch_tanh", "relu2": "relu2"}  # our MLP -> transformers' ACT2FN name
_LAYER_NORM_EPS = 1e-5  # Blenderbot's nn.LayerNorm default, not configurable


def blenderbot_mismatches(cfg: EncDecConfig) -> list[str]:
    """The settings of ``cfg`` that BlenderbotForConditionalGeneration cannot compute (empty: exportable)."""
    bad = []
    if cfg.pos != "learned":
        bad.append(f"pos={cfg.pos!r} (no transformers encoder-decoder rotates queries and keys: T5 adds "
                   "relative-position buckets to the scores, BART and Blenderbot add learned positions)")
    if cfg.norm != "layernorm":
        bad.append(f"norm={cfg.norm!r} (Blenderbot normalises with LayerNorm)")
    if not cfg.bias:
        bad.append("bias=False (Blenderbot has biases in every linear layer and LayerNorm)")
    if cfg.mlp not in _ACTIVATION:
        bad.append(f"mlp={cfg.mlp!r} (Blenderbot's MLP is not gated)")
    if cfg.norm_eps != _LAYER_NORM_EPS:
        bad.append(f"norm_eps={cfg.norm_eps} (Blenderbot's LayerNorms use {_LAYER_NORM_EPS})")
    if not cfg.share_embeddings:
        bad.append("share_embeddings=False (Blenderbot reads source and target through one table)")
    return bad


def blenderbot_weight_map(cfg: EncDecConfig) -> list[WeightRule]:
    """EncoderDecoder <-> BlenderbotForConditionalGeneration, one rule per tensor of ours."""
    C = cfg.n_embd
    m = "model."
    rules = [WeightRule("tok_emb.weight", (m + "shared.weight",)),
             WeightRule("enc_pos.weight", (m + "encoder.embed_positions.weight",)),
             WeightRule("dec_pos.weight", (m + "decoder.embed_positions.weight",))]

    def linear(ours: str, theirs: str) -> list[WeightRule]:
        return [WeightRule(f"{ours}.{k}", (f"{theirs}.{k}",)) for k in ("weight", "bias")]

    def stacked(ours: str, theirs: tuple[str, ...]) -> list[WeightRule]:
        return [WeightRule(f"{ours}.{k}", tuple(f"{t}.{k}" for t in theirs), split=(C,) * len(theirs))
                for k in ("weight", "bias")]

    for i in range(cfg.n_enc_layer):
        o, t = f"enc_blocks.{i}.", f"{m}encoder.layers.{i}."
        rules += linear(o + "norm_attn", t + "self_attn_layer_norm")
        rules += stacked(o + "attn.qkv", tuple(f"{t}self_attn.{p}_proj" for p in "qkv"))
        rules += linear(o + "attn.proj", t + "self_attn.out_proj")
        rules += linear(o + "norm_mlp", t + "final_layer_norm")
        rules += linear(o + "mlp.fc", t + "fc1") + linear(o + "mlp.proj", t + "fc2")
    rules += linear("enc_norm", m + "encoder.layer_norm")
    for i in range(cfg.n_dec_layer):
        o, t = f"dec_blocks.{i}.", f"{m}decoder.layers.{i}."
        rules += linear(o + "norm_self", t + "self_attn_layer_norm")
        rules += stacked(o + "self_attn.qkv", tuple(f"{t}self_attn.{p}_proj" for p in "qkv"))
        rules += linear(o + "self_attn.proj", t + "self_attn.out_proj")
        rules += linear(o + "norm_cross", t + "encoder_attn_layer_norm")
        rules += linear(o + "cross_attn.q", t + "encoder_attn.q_proj")
        rules += stacked(o + "cross_attn.kv", (t + "encoder_attn.k_proj", t + "encoder_attn.v_proj"))
        rules += linear(o + "cross_attn.proj", t + "encoder_attn.out_proj")
        rules += linear(o + "norm_mlp", t + "final_layer_norm")
        rules += linear(o + "mlp.fc", t + "fc1") + linear(o + "mlp.proj", t + "fc2")
    rules += linear("dec_norm", m + "decoder.layer_norm")
    if not cfg.tie_embeddings:
        rules.append(WeightRule("lm_head.weight", ("lm_head.weight",)))
    return rules


def blenderbot_config(cfg: EncDecConfig, ids: dict[str, int]) -> dict[str, Any]:
    """config.json of the export (ids: bos/eos/pad token ids; bos starts every target)."""
    return {
        "architectures": [ARCHITECTURE], "model_type": "blenderbot", "is_encoder_decoder": True,
        "vocab_size": cfg.vocab_size, "d_model": cfg.n_embd, "max_position_embeddings": _n_positions(cfg),
        "encoder_layers": cfg.n_enc_layer, "decoder_layers": cfg.n_dec_layer,
        "encoder_attention_heads": cfg.n_head, "decoder_attention_heads": cfg.n_head,
        "encoder_ffn_dim": cfg.mlp_hidden, "decoder_ffn_dim": cfg.mlp_hidden,
        "activation_function": _ACTIVATION[cfg.mlp], "scale_embedding": False,
        "dropout": cfg.dropout, "attention_dropout": cfg.dropout, "activation_dropout": 0.0,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "init_std": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
        "decoder_start_token_id": ids["bos"], "forced_eos_token_id": None, "encoder_no_repeat_ngram_size": 0,
    }


def _n_positions(cfg: EncDecConfig) -> int:
    return max(cfg.max_source_len, cfg.max_target_len)


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]) if t.shape[0] < rows else t


def export_encdec(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, dtype: str = "fp32",
                  overwrite: bool = False, progress: ProgressFn | None = None) -> Path:
    """Write an encoder-decoder run as a transformers BlenderbotForConditionalGeneration directory (config.json,
    model.safetensors, generation_config.json, tokenizer.json adding the end token to every source as zenlm
    does, tokenizer_config.json); ConfigError naming the settings when the run's layout has no counterpart."""
    from zenlm.rundir import build_model_from_run, load_run_weights

    run, out = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose fp32, bf16 or fp16.")
    model, cfg, saved = build_model_from_run(run)
    assert isinstance(cfg, EncDecConfig)
    bad = blenderbot_mismatches(cfg)
    if bad:
        raise ConfigError(f"{run}: this encoder-decoder has no exact transformers counterpart: "
                          f"{'; '.join(bad)}. Exportable runs use --model encdec-tiny or bart-base (learned "
                          "positions, LayerNorm, biases), which are written as BlenderbotForConditionalGeneration.")
    settings = saved.get("seq2seq") or {}
    load_run_weights(run, model)
    tok = load_run_tokenizer(run, cfg.vocab_size)
    ids = {role: int(settings.get(f"{role}_id", getattr(tok, f"{role}_id"))) for role in ("bos", "eos", "pad")}
    prepare_out(out, "config.json", overwrite, source=run)

    theirs = theirs_state(model, blenderbot_weight_map(cfg), dtype, progress)
    for stack in ("encoder", "decoder"):  # one position count for both stacks: pad the shorter table
        name = f"model.{stack}.embed_positions.weight"
        theirs[name] = _pad_rows(theirs[name], _n_positions(cfg))
    if not cfg.tie_embeddings:  # transformers unties encoder and decoder tables from `shared` as well then
        for stack in ("encoder", "decoder"):
            theirs[f"model.{stack}.embed_tokens.weight"] = theirs["model.shared.weight"].clone()
    save_file(theirs, str(out / "model.safetensors"), metadata={"format": "pt"})
    name = HF_DTYPE_NAME[DTYPES[dtype]]
    write_json(out / "config.json", {**blenderbot_config(cfg, ids), "torch_dtype": name, "dtype": name})
    max_target = int(settings.get("max_target_tokens", cfg.max_target_len - 1))
    write_json(out / "generation_config.json", {
        "decoder_start_token_id": ids["bos"], "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"], "max_length": min(max_target + 2, cfg.max_target_len),
        "forced_eos_token_id": None, "encoder_no_repeat_ngram_size": 0, "no_repeat_ngram_size": 0,
        "num_beams": 1})

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors

    hf = HFTokenizer.from_str(tok.hf.to_str())  # sources end with the end token, as zenlm reads them
    eos_text = tok.id_to_token(ids["eos"])
    hf.post_processor = processors.TemplateProcessing(single=f"$A:0 {eos_text}:0", pair=f"$A:0 $B:1 {eos_text}:1",
                                                      special_tokens=[(eos_text, ids["eos"])])
    atomic_write_text(out / "tokenizer.json", hf.to_str(pretty=True))
    tok_cfg = export_tokenizer_config(run, tok, cfg.max_source_len)
    tok_cfg.pop("chat_template", None)
    write_json(out / "tokenizer_config.json", tok_cfg)
    return out


__all__ = ["ARCHITECTURE", "blenderbot_mismatches", "blenderbot_weight_map", "blenderbot_config", "export_encdec"]
