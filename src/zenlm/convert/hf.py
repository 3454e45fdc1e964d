"""Hugging Face <-> zenlm for decoder-only language models: GPT-2 and the Llama family.

    import_hf(DIR, RUN)   a `transformers` checkpoint (config.json, safetensors or legacy .bin,
                          tokenizer.json) -> a zenlm run directory (config.yaml, model.safetensors, tokenizer)
    export_hf(RUN, DIR)   a zenlm run directory -> config.json, model.safetensors, generation_config.json,
                          tokenizer.json, tokenizer_config.json (AutoModelForCausalLM / AutoTokenizer load it)

Every architecture is described once, and the description serves both directions:

* a *config map*: which config.json fields give which :class:`~zenlm.config.GPTConfig` fields, and back;
* a *weight map*: a list of :class:`WeightRule` (our tensor name, their tensor name(s), and how they relate:
  equal, transposed, or several of theirs stacked along dim 0 into one of ours).

The arithmetic is the same on both sides, which is what makes the numbers match:

    GPT-2   learned positions, LayerNorm, GELU (tanh approximation), biases everywhere; its ``Conv1D`` layers
            store weights as [in, out], so they are transposed into our [out, in] ``nn.Linear`` weights, and
            ``c_attn`` is already one fused [q; k; v] projection like our ``attn.qkv``.
    Llama   rotary positions (the "rotate half" layout, the same as ours, so no permutation), RMSNorm,
            SwiGLU (gate_proj/up_proj/down_proj = our gate/up/proj), grouped-query attention; q_proj, k_proj
            and v_proj are stacked into our fused ``attn.qkv``. Mistral is Llama (its sliding window is
            honoured by capping the context at the window); Qwen2 adds biases to q/k/v only; Qwen3 adds
            per-head RMSNorm on queries and keys (our ``qk_norm``).

Import never executes code from the checkpoint: tensors come from safetensors files, and a legacy
``pytorch_model.bin`` is read only through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from zenlm.config import ROPE_SCALING_KEYS, GPTConfig
from zenlm.convert.common import (
    HF_DTYPE_NAME,
    WeightRule,
    export_tokenizer_config,
    load_run_tokenizer,
    prepare_out,
    read_json,
    theirs_state,
    write_json,
)
from zenlm.convert.outdir import check_out_dir
from zenlm.device import DTYPES, resolve_dtype
from zenlm.errors import ConfigError, DataError
from zenlm.fileio import atomic_path, write_safetensors
from zenlm.progress import ProgressFn, report
from zenlm.tokenizer import Tokenizer

# zenlm architectures (the ``arch`` of config.yaml) that export_hf writes; the import side is chosen by
# config.json (SUPPORTED_ARCHITECTURES below, and BERT through zenlm.convert.hf_bert).
EXPORTABLE = ("gpt",)
# Runs that export through another module: a run's task ("classify") or its architecture -> "module:function".
HF_EXPORTERS = {"classify": "zenlm.convert.hf_bert:export_bert", "bert": "zenlm.convert.hf_bert:export_bert",
                "encdec": "zenlm.convert.hf_encdec:export_encdec"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_KIND = {"BPE": "bpe", "WordPiece": "wordpiece", "WordLevel": "char"}
# Tensors some checkpoints carry that are not weights: GPT-2's causal-mask buffers, cached rotary tables.
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias|\.rotary_emb\.inv_freq)$")


# ------------------------------------------------------------------------------------------ weight maps


def gpt2_weight_map(cfg: GPTConfig) -> list[WeightRule]:
    """GPT2LMHeadModel <-> GPT: names under ``transformer.``; Conv1D weights are transposed."""
    rules = [WeightRule("tok_emb.weight", ("transformer.wte.weight",)),
             WeightRule("pos_emb.weight", ("transformer.wpe.weight",))]
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        for theirs, ours, conv in [("ln_1", "norm_attn", False), ("attn.c_attn", "attn.qkv", True),
                                   ("attn.c_proj", "attn.proj", True), ("ln_2", "norm_mlp", False),
                                   ("mlp.c_fc", "mlp.fc", True), ("mlp.c_proj", "mlp.proj", True)]:
            rules.append(WeightRule(f"{b}{ours}.weight", (f"{h}{theirs}.weight",), transpose=conv))
            rules.append(WeightRule(f"{b}{ours}.bias", (f"{h}{theirs}.bias",)))
    rules += [WeightRule("norm_f.weight", ("transformer.ln_f.weight",)),
              WeightRule("norm_f.bias", ("transformer.ln_f.bias",))]
    if not cfg.tie_embeddings:
        rules.append(WeightRule("lm_head.weight", ("lm_head.weight",)))
    return rules


def llama_weight_map(cfg: GPTConfig) -> list[WeightRule]:
    """LlamaForCausalLM (and Mistral, Qwen2, Qwen3) <-> GPT: names under ``model.``; q/k/v stacked."""
    assert cfg.n_kv_head is not None
    qkv_sizes = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim)
    rules = [WeightRule("tok_emb.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        rules.append(WeightRule(f"{b}norm_attn.weight", (f"{h}input_layernorm.weight",)))
        kinds = ["weight"] + (["bias"] if cfg.qkv_bias else [])
        for kind in kinds:
            rules.append(WeightRule(f"{b}attn.qkv.{kind}",
                                    tuple(f"{h}self_attn.{p}_proj.{kind}" for p in "qkv"), split=qkv_sizes))
        if cfg.qk_norm:
            rules.append(WeightRule(f"{b}attn.q_norm.weight", (f"{h}self_attn.q_norm.weight",)))
            rules.append(WeightRule(f"{b}attn.k_norm.weight", (f"{h}self_attn.k_norm.weight",)))
        for kind in ["weight"] + (["bias"] if cfg.attn_proj_bias else []):
            rules.append(WeightRule(f"{b}attn.proj.{kind}", (f"{h}self_attn.o_proj.{kind}",)))
        rules.append(WeightRule(f"{b}norm_mlp.weight", (f"{h}post_attention_layernorm.weight",)))
        for ours, theirs in [("gate", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")]:
            for kind in ["weight"] + (["bias"] if cfg.mlp_bias else []):
                rules.append(WeightRule(f"{b}mlp.{ours}.{kind}", (f"{h}mlp.{theirs}.{kind}",)))
    rules.append(WeightRule("norm_f.weight", ("model.norm.weight",)))
    if not cfg.tie_embeddings:
        rules.append(WeightRule("lm_head.weight", ("lm_head.weight",)))
    return rules


# ------------------------------------------------------------------------------------------ config maps

_REQUIRED = object()


def _get(c: dict[str, Any], key: str, where: Path, default: Any = _REQUIRED) -> Any:
    value = c.get(key, default)
    if value is None and default is not None and default is not _REQUIRED:
        value = default
    if value is _REQUIRED or value is None:
        raise ConfigError(f"{where}: the field {key!r} is missing; it is needed to build the model.")
    return value


def _refuse(where: Path, key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{where}: {key}={value!r} is not supported: {why}.")


def _rope(c: dict[str, Any], where: Path, default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from ``rope_parameters`` (transformers 5) or the older top-level
    ``rope_theta`` and ``rope_scaling``. Plain, "linear" and "llama3" rotary positions are supported."""
    params = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ("default", *ROPE_SCALING_KEYS):
        raise _refuse(where, "rope_type", rope_type,
                      "zenlm's rotary positions support the plain ('default'), 'linear' and 'llama3' kinds")
    if c.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(where, "partial_rotary_factor", c["partial_rotary_factor"], "zenlm rotates whole heads")
    theta = float(params.get("rope_theta") or c.get("rope_theta") or default_theta)
    if rope_type == "default":
        return theta, None
    missing = [k for k in ROPE_SCALING_KEYS[rope_type] if params.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: rope_type {rope_type!r} needs {', '.join(missing)} in rope_parameters.")
    return theta, {"rope_type": rope_type, **{k: params[k] for k in ROPE_SCALING_KEYS[rope_type]}}


def gpt2_config(c: dict[str, Any], where: Path) -> GPTConfig:
    """GPTConfig of a GPT-2 config.json (absent fields take transformers' GPT2Config defaults)."""
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise _refuse(where, "activation_function", act, "zenlm's GPT-2 MLP uses the tanh-approximated GELU "
                      "('gelu_new')")
    for key, ok in [("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)]:
        if c.get(key, ok) != ok:
            raise _refuse(where, key, c[key], f"only {key}={ok} matches zenlm's attention")
    n_embd = int(_get(c, "n_embd", where, 768))
    return GPTConfig(
        vocab_size=int(_get(c, "vocab_size", where, 50257)),
        block_size=int(_get(c, "n_positions", where, 1024)),
        n_layer=int(_get(c, "n_layer", where, 12)), n_head=int(_get(c, "n_head", where, 12)), n_embd=n_embd,
        mlp_hidden=int(c.get("n_inner") or 4 * n_embd), pos="learned", norm="layernorm",
        norm_eps=float(_get(c, "layer_norm_epsilon", where, 1e-5)), mlp="gelu", bias=True,
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        init_std=float(c.get("initializer_range", 0.02)),
    )


def llama_config(c: dict[str, Any], where: Path) -> GPTConfig:
    """GPTConfig of a Llama, Mistral, Qwen2 or Qwen3 config.json."""
    model_type = c.get("model_type", "llama")
    hidden, n_head = int(_get(c, "hidden_size", where)), int(_get(c, "num_attention_heads", where))
    head_dim = int(c.get("head_dim") or hidden // n_head)
    if head_dim * n_head != hidden:
        raise _refuse(where, "head_dim", head_dim,
                      f"zenlm needs head_dim = hidden_size / num_attention_heads = {hidden} / {n_head}")
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise _refuse(where, "hidden_act", act, "zenlm's SwiGLU MLP uses silu")
    block_size = int(_get(c, "max_position_embeddings", where, 2048))
    theta, rope_scaling = _rope(c, where, 1e6 if model_type in ("qwen2", "qwen3") else 1e4)
    # A sliding window no shorter than the context changes nothing; a shorter one caps the context there, so
    # that every position zenlm can reach attends exactly as the original model would.
    window = c.get("sliding_window") if model_type == "mistral" or c.get("use_sliding_window") else None
    if window:
        block_size = min(block_size, int(window))
    attention_bias = bool(c.get("attention_bias", False))
    if model_type == "qwen2":
        qkv_bias, proj_bias, mlp_bias = True, False, False
    else:
        qkv_bias, proj_bias, mlp_bias = attention_bias, attention_bias, bool(c.get("mlp_bias", False))
    return GPTConfig(
        vocab_size=int(_get(c, "vocab_size", where)), block_size=block_size,
        n_layer=int(_get(c, "num_hidden_layers", where)), n_head=n_head,
        n_kv_head=int(c.get("num_key_value_heads") or n_head), n_embd=hidden,
        mlp_hidden=int(_get(c, "intermediate_size", where)), pos="rope",
        rope_theta=theta, rope_scaling=rope_scaling,
        norm="rmsnorm", norm_eps=float(_get(c, "rms_norm_eps", where, 1e-6)), mlp="swiglu", bias=False,
        qkv_bias=qkv_bias, attn_proj_bias=proj_bias, mlp_bias=mlp_bias,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)), qk_norm=model_type == "qwen3",
        init_std=float(c.get("initializer_range", 0.02)),
    )


def _gpt2_hf_config(cfg: GPTConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": cfg.mlp_hidden, "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "use_cache": True,
    }


def _llama_hf_config(cfg: GPTConfig, model_type: str, arch: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "rope_parameters": {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta},
        "attention_dropout": cfg.dropout, "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std, "use_cache": True,
    }
    if model_type == "llama":
        out.update(attention_bias=bool(cfg.qkv_bias), mlp_bias=bool(cfg.mlp_bias), pretraining_tp=1)
    else:  # qwen2 / qwen3
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
        if model_type == "qwen3":
            out["attention_bias"] = False
    return out


@dataclass(frozen=True)
class Architecture:
    """One supported `transformers` class: its config map (both ways) and its weight map."""

    name: str                                  # the class name in config.json's "architectures"
    model_type: str                            # config.json's "model_type"
    prefix: str                                # the base model's name prefix inside the checkpoint
    to_config: Callable[[dict[str, Any], Path], GPTConfig]
    weight_map: Callable[[GPTConfig], list[WeightRule]]
    to_hf_config: Callable[[GPTConfig], dict[str, Any]] | None  # None: import only


SUPPORTED_ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in [
    Architecture("GPT2LMHeadModel", "gpt2", "transformer.", gpt2_config, gpt2_weight_map, _gpt2_hf_config),
    Architecture("LlamaForCausalLM", "llama", "model.", llama_config, llama_weight_map,
                 lambda c: _llama_hf_config(c, "llama", "LlamaForCausalLM")),
    Architecture("MistralForCausalLM", "mistral", "model.", llama_config, llama_weight_map, None),
    Architecture("Qwen2ForCausalLM", "qwen2", "model.", llama_config, llama_weight_map,
                 lambda c: _llama_hf_config(c, "qwen2", "Qwen2ForCausalLM")),
    Architecture("Qwen3ForCausalLM", "qwen3", "model.", llama_config, llama_weight_map,
                 lambda c: _llama_hf_config(c, "qwen3", "Qwen3ForCausalLM")),
]}
_BY_MODEL_TYPE = {a.model_type: a for a in SUPPORTED_ARCHITECTURES.values()}


def architecture_for_hf(c: dict[str, Any], where: Path) -> Architecture:
    """The supported architecture a config.json describes (ConfigError naming it when unsupported)."""
    names = c.get("architectures") or []
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[name]
    model_type = c.get("model_type")
    if not names and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    what = f"architectures={names}" if names else f"model_type={model_type!r}"
    raise ConfigError(f"{where}: {what} is not supported; zenlm converts "
                      f"{', '.join(SUPPORTED_ARCHITECTURES)} (and BERT through its own converter).")


def architecture_for_config(cfg: GPTConfig) -> Architecture:
    """The `transformers` architecture that computes exactly what ``cfg`` computes (ConfigError naming the
    config fields that have no counterpart otherwise)."""
    common = []
    if cfg.logit_softcap is not None:
        common.append(f"logit_softcap={cfg.logit_softcap}")
    if cfg.pos == "learned" and cfg.norm == "layernorm" and cfg.mlp == "gelu":
        bad = [f"{k}={getattr(cfg, k)!r}" for k in ("bias", "qkv_bias", "attn_proj_bias", "mlp_bias")
               if not getattr(cfg, k)]
        if cfg.n_kv_head != cfg.n_head:
            bad.append(f"n_kv_head={cfg.n_kv_head}")
        if cfg.qk_norm:
            bad.append("qk_norm=True")
        arch, bad = SUPPORTED_ARCHITECTURES["GPT2LMHeadModel"], bad + common
    elif cfg.pos == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        qkv, proj, mlp = bool(cfg.qkv_bias), bool(cfg.attn_proj_bias), bool(cfg.mlp_bias)
        bad = list(common)
        if cfg.qk_norm:
            arch = SUPPORTED_ARCHITECTURES["Qwen3ForCausalLM"]
            biases = (("qkv_bias", qkv), ("attn_proj_bias", proj), ("mlp_bias", mlp))
            bad += [f"{k}=True" for k, v in biases if v]
        elif qkv and not proj and not mlp:
            arch = SUPPORTED_ARCHITECTURES["Qwen2ForCausalLM"]
        else:
            arch = SUPPORTED_ARCHITECTURES["LlamaForCausalLM"]
            if qkv != proj:
                bad.append(f"qkv_bias={qkv} with attn_proj_bias={proj} (Llama has one attention_bias)")
    else:
        raise ConfigError(
            f"a model with pos={cfg.pos!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r} has no Hugging Face "
            "counterpart; export supports GPT-2 (learned, layernorm, gelu) and Llama-family (rope, rmsnorm, "
            "swiglu) models.")
    if bad:
        raise ConfigError(f"cannot export as {arch.name}: {', '.join(bad)} has no counterpart there.")
    return arch


# --------------------------------------------------------------------------------------- reading weights


class HFWeights:
    """The tensors of a Hugging Face checkpoint directory, read lazily by name.

    Looks for model.safetensors, a sharded model.safetensors.index.json, then the legacy pytorch_model.bin
    (or its index), which is read with ``torch.load(weights_only=True)`` (plain tensors only, no code).
    Names are stored as written by the base model or the LM-head model: ``prefix`` (e.g. ``"model."``) is
    added to names that lack it so rules can use one spelling.
    """

    def __init__(self, src: Path, prefix: str) -> None:
        self.src = src
        self.prefix = prefix
        self.files: dict[str, tuple[Path, str]] = {}  # canonical name -> (file, name inside it)
        self._open: dict[Path, Any] = {}
        self._bin: dict[Path, dict[str, Tensor]] = {}
        found = next((src / f for f in WEIGHT_FILES if (src / f).is_file()), None)
        if found is None:
            raise DataError(f"{src} holds no weights: none of {', '.join(WEIGHT_FILES)} is there.")
        self.where = found
        if found.name.endswith(".index.json"):
            try:
                weight_map = json.loads(found.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise DataError(f"{found} is not a valid weight index (no weight_map: {e}).") from None
            for name, shard in weight_map.items():
                if not (src / shard).is_file():
                    raise DataError(f"{found} names the shard {shard} for {name!r}, "
                                    f"but {src / shard} is missing.")
                self._add(name, src / shard)
        else:
            for name in self._names_in(found):
                self._add(name, found)

    def _add(self, name: str, file: Path) -> None:
        canonical = name if name.startswith((self.prefix, "lm_head.")) else self.prefix + name
        self.files[canonical] = (file, name)

    def _names_in(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            return list(self._safetensors(file).keys())
        return list(self._torch_bin(file))

    def _safetensors(self, file: Path) -> Any:
        if file not in self._open:
            try:
                self._open[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise DataError(f"{file} is not a readable safetensors file ({e}).") from None
        return self._open[file]

    def _torch_bin(self, file: Path) -> dict[str, Tensor]:
        if file not in self._bin:
            try:  # weights_only: only tensors and plain containers are rebuilt; anything else is refused
                sd = torch.load(str(file), map_location="cpu", weights_only=True,
                                mmap=zipfile.is_zipfile(file))
            except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
                raise DataError(f"{file} cannot be read as plain tensors ({type(e).__name__}: {e}); "
                                "prefer a model.safetensors file.") from None
            if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
                raise DataError(f"{file} does not hold a flat name -> tensor mapping.")
            self._bin[file] = sd
        return self._bin[file]

    def get(self, name: str) -> Tensor:
        """The tensor called ``name`` (canonical spelling); DataError naming the key and file when absent."""
        if name not in self.files:
            raise DataError(f"{self.where}: tensor {name!r} is missing; the checkpoint does not match its "
                            "config.json (or was saved by another architecture).")
        file, inner = self.files[name]
        if file.suffix == ".safetensors":
            return self._safetensors(file).get_tensor(inner)
        return self._torch_bin(file)[inner]

    def file_of(self, name: str) -> Path:
        return self.files[name][0] if name in self.files else self.where


# ------------------------------------------------------------------------------------------------ import


def _our_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a run directory's model.safetensors holds (built without memory)."""
    from zenlm.models.gpt import GPT

    with torch.device("meta"):  # a tied head is no parameter of its own, so no name appears twice
        model = GPT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_rules(cfg: GPTConfig, rules: list[WeightRule]) -> dict[str, tuple[int, ...]]:
    shapes = _our_shapes(cfg)
    mapped = {r.ours for r in rules}
    assert mapped == set(shapes), f"weight map out of step with the model: {sorted(mapped ^ set(shapes))[:5]}"
    return shapes


def import_hf(
    src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, dtype: str = "auto",
    overwrite: bool = False, progress: ProgressFn | None = None,
) -> Path:
    """Convert a Hugging Face checkpoint directory into a zenlm run directory; returns ``out_dir``.

    src_dir:   holds config.json, the weights (model.safetensors, sharded safetensors, or a legacy
               pytorch_model.bin), tokenizer.json and usually tokenizer_config.json / generation_config.json
    out_dir:   the run directory to write (config.yaml, model.safetensors, tokenizer.json,
               tokenizer_config.json, generation_config.json); ``zenlm.load(out_dir)`` opens it
    dtype:     "auto" keeps each tensor's stored dtype; "fp32", "bf16" or "fp16" converts
    overwrite: replace an existing run in out_dir

    A BERT checkpoint (model_type "bert") is handed to :mod:`zenlm.convert.hf_bert`.
    """
    src, out = Path(src_dir), Path(out_dir)
    if not src.is_dir():
        raise DataError(f"{src} is not a directory; give the folder that holds config.json and the weights.")
    check_out_dir(out, writes="run", sources=[src], overwrite=overwrite)
    config_file = src / "config.json"
    c = read_json(config_file, "a Hugging Face model directory has a config.json")
    if c.get("model_type") == "bert":
        try:
            from zenlm.convert.hf_bert import import_bert
        except ImportError as e:
            raise ConfigError(f"{config_file}: model_type 'bert' needs the BERT converter, which is not "
                              f"available in this installation ({e}).") from None
        return Path(import_bert(src, out, overwrite=overwrite, progress=progress))
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose auto, fp32, bf16 or fp16.")
    arch = architecture_for_hf(c, config_file)
    cfg = arch.to_config(c, config_file)
    rules = arch.weight_map(cfg)
    shapes = _check_rules(cfg, rules)

    weights = HFWeights(src, arch.prefix)
    used: set[str] = set()
    ours: dict[str, Tensor] = {}
    for n, rule in enumerate(rules):
        tensors = []
        for name, shape in zip(rule.theirs, rule.their_shapes(shapes[rule.ours]), strict=True):
            t = weights.get(name)
            if tuple(t.shape) != shape:
                raise DataError(f"{weights.file_of(name)}: tensor {name!r} has shape {tuple(t.shape)}, but "
                                f"config.json implies {shape}.")
            tensors.append(t if dtype == "auto" else t.to(DTYPES[dtype]))
            used.add(name)
        ours[rule.ours] = rule.to_ours(tensors).contiguous()
        report(progress, "convert", done=n + 1, total=len(rules), unit="tensor")
    unexpected = sorted(k for k in weights.files if k not in used and not _IGNORED.search(k)
                        and not (k == "lm_head.weight" and cfg.tie_embeddings))
    if unexpected:
        raise DataError(f"{weights.file_of(unexpected[0])}: tensor {unexpected[0]!r} (and "
                        f"{len(unexpected) - 1} more) has no place in a {arch.name} built from config.json; "
                        "the checkpoint and config.json disagree.")

    from zenlm import __version__
    from zenlm.rundir import write_run_config

    # Everything is written into a temporary folder beside --out and swapped in at the end: a failure (a
    # tokenizer that does not fit, a full disk) leaves a previous run in --out as it was, never its old weights
    # beside the new tokenizer.
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        tok = _import_tokenizer(src, tmp, c)
        if tok.vocab_size > cfg.vocab_size:
            raise DataError(f"{src / 'tokenizer.json'} has {tok.vocab_size} tokens but the model only "
                            f"{cfg.vocab_size} embeddings (config.json vocab_size).")
        write_safetensors(ours, tmp / "model.safetensors", metadata={"format": "pt"})
        run_config = {
            "zenlm_version": __version__,
            "model": cfg.to_dict(),
            "source": {"format": "huggingface", "architecture": arch.name, "dir": str(src.resolve())},
            "objective": "causal-lm",
        }
        write_run_config(tmp, run_config)
    return out


def _import_tokenizer(src: Path, out: Path, c: dict[str, Any]) -> Tokenizer:
    """Copy tokenizer.json as is; write a tokenizer_config.json that keeps theirs and adds what zenlm needs
    (the chat template inline, the special tokens, ``zenlm_kind``); copy or derive generation_config.json."""
    tj = src / "tokenizer.json"
    if not tj.is_file():
        raise DataError(f"{tj} is missing; zenlm needs the fast-tokenizer file. With transformers installed, "
                        "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes one.")
    tok_cfg: dict[str, Any] = {}
    if (src / "tokenizer_config.json").is_file():
        tok_cfg = read_json(src / "tokenizer_config.json", "")
    if (src / "special_tokens_map.json").is_file():  # older layout: the special tokens live here
        for key, value in read_json(src / "special_tokens_map.json", "").items():
            tok_cfg.setdefault(key, value)
    for key, value in list(tok_cfg.items()):
        if key.endswith("_token") and isinstance(value, dict):  # AddedToken-like dict -> its text
            tok_cfg[key] = value.get("content")
    jinja = src / "chat_template.jinja"
    if not tok_cfg.get("chat_template") and jinja.is_file():
        tok_cfg["chat_template"] = jinja.read_text(encoding="utf-8")
    try:
        model_type = json.loads(tj.read_text(encoding="utf-8"))["model"]["type"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DataError(f"{tj} is not a valid tokenizer.json ({e}).") from None
    if model_type not in TOKENIZER_KIND:
        raise DataError(f"{tj}: the tokenizer model {model_type!r} is not supported; zenlm reads BPE, "
                        "WordPiece and WordLevel tokenizers.")
    tok_cfg["zenlm_kind"] = TOKENIZER_KIND[model_type]
    gen = src / "generation_config.json"
    ids = {k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if c.get(k) is not None}
    if gen.is_file():
        ids.update({k: v for k, v in read_json(gen, "").items() if k in ids or k.endswith("_token_id")})
    # Some repositories (GPT-2's among them) name no special tokens in tokenizer_config.json: take them from
    # the ids in config.json / generation_config.json (the first one where a list of EOS ids is given).
    vocab = tokenizers.Tokenizer.from_file(str(tj))
    for role in ("bos", "eos", "pad"):
        tid = ids.get(f"{role}_token_id")
        tid = tid[0] if isinstance(tid, list) and tid else tid
        if not tok_cfg.get(f"{role}_token") and isinstance(tid, int) and vocab.id_to_token(tid) is not None:
            tok_cfg[f"{role}_token"] = vocab.id_to_token(tid)
    shutil.copyfile(tj, out / "tokenizer.json")
    write_json(out / "tokenizer_config.json", tok_cfg)
    if gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")
    else:
        (out / "generation_config.json").write_text(json.dumps(ids, indent=2), encoding="utf-8")
    return Tokenizer.load(out)


# ------------------------------------------------------------------------------------------------ export


def export_hf(
    run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, dtype: str = "fp32",
    overwrite: bool = False, progress: ProgressFn | None = None,
) -> Path:
    """Write a zenlm run directory as a Hugging Face model directory; returns ``out_dir``.

    Files: config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json
    (special tokens, EOS, chat template). The architecture is chosen from the model config: GPT-2 for
    learned positions + LayerNorm + GELU, Llama for rotary + RMSNorm + SwiGLU (Qwen2 when only q/k/v have
    biases, Qwen3 with qk-norm). BERT runs and BERT classifiers go to :mod:`zenlm.convert.hf_bert`,
    encoder-decoder runs to :mod:`zenlm.convert.hf_encdec`. Weights come from model.safetensors, else the
    newest checkpoint. dtype: fp32, bf16 or fp16 for the written weights.
    """
    from zenlm.rundir import read_run_config, run_architecture, run_task

    run, out = Path(run_dir), Path(out_dir)
    torch_dtype = resolve_dtype(dtype)
    saved = read_run_config(run)
    if saved.get("lora"):
        raise ConfigError(f"{run} is a LoRA run: export its adapters as a PEFT adapter (zenlm convert to-hf does, "
                          "through zenlm.convert.peft.export_peft), or merge it first (zenlm merge-lora).")
    ours = run_architecture(saved)
    other = HF_EXPORTERS.get("classify" if run_task(saved) == "classify" else ours.name)
    if other is not None:  # encoders, classifiers and encoder-decoders have exporters of their own
        module, _, name = other.partition(":")
        exporter = getattr(importlib.import_module(module), name)
        return exporter(run, out, dtype=dtype, overwrite=overwrite, progress=progress)
    cfg = gpt_run_config(run, "export to Hugging Face format")
    arch = architecture_for_config(cfg)
    assert arch.to_hf_config is not None
    model, tok = load_gpt_run(run, cfg)
    rules = arch.weight_map(cfg)
    _check_rules(cfg, rules)
    prepare_out(out, "config.json", overwrite, source=run)

    save_file(theirs_state(model, rules, dtype, progress), str(out / "model.safetensors"),
              metadata={"format": "pt"})

    ids = _special_ids(run, tok)
    hf_cfg = {**arch.to_hf_config(cfg), **ids, "torch_dtype": HF_DTYPE_NAME[torch_dtype],
              "dtype": HF_DTYPE_NAME[torch_dtype]}
    write_json(out / "config.json", hf_cfg)
    gen: dict[str, Any] = {}
    if (run / "generation_config.json").is_file():  # imported runs keep the original one
        gen = read_json(run / "generation_config.json", "")
    gen.update({k: v for k, v in ids.items() if k not in gen})
    write_json(out / "generation_config.json", gen)
    shutil.copyfile(run / "tokenizer.json", out / "tokenizer.json")
    write_json(out / "tokenizer_config.json", export_tokenizer_config(run, tok, cfg.block_size))
    return out


def gpt_run_config(run: Path, what: str) -> GPTConfig:
    """The model config of a decoder-only language-model run, for an export. Runs that are something else (an
    encoder, a classifier, an int8 copy) are refused, naming ``what`` was attempted and what to do instead."""
    from zenlm.rundir import LM_TASKS, read_run_config, run_architecture, run_task

    saved = read_run_config(run)
    ours = run_architecture(saved)
    if ours.name not in EXPORTABLE:
        raise ConfigError(f"{run} holds a {ours.title} model; {what} supports decoder-only GPT runs "
                          "(GPT-2 and Llama-family layouts).")
    if run_task(saved) not in LM_TASKS:
        raise ConfigError(f"{run} is a {run_task(saved)!r} run (task.kind in config.yaml); {what} "
                          "supports language-model runs.")
    if saved.get("quantization"):
        raise ConfigError(f"{run} holds int8 weights (quantization in config.yaml); {what} needs the run it "
                          "was quantised from.")
    return ours.config_from_dict(saved["model"])


def load_gpt_run(run: Path, cfg: GPTConfig) -> tuple[torch.nn.Module, Tokenizer]:
    """The GPT of ``cfg`` with the run's weights (eval mode) and the run's tokenizer."""
    from zenlm.models.gpt import GPT
    from zenlm.rundir import load_run_weights

    model = GPT(cfg)
    load_run_weights(run, model)
    return model.eval(), load_run_tokenizer(run, cfg.vocab_size)


def _special_ids(run: Path, tok: Tokenizer) -> dict[str, Any]:
    """bos/eos/pad token ids for config.json: the original generation_config.json's when the run was
    imported (it may list several EOS ids), else the tokenizer's."""
    ids: dict[str, Any] = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    if (run / "generation_config.json").is_file():
        gen = read_json(run / "generation_config.json", "")
        ids.update({k: gen[k] for k in ids if gen.get(k) is not None})
    return ids


def download_from_hub(name: str, revision: str | None = None) -> Path:
    """Download a model repository from the Hugging Face Hub (config, tokenizer and safetensors weights;
    the legacy .bin only when there are no safetensors) and return its local directory."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError("--from-hub needs the huggingface_hub package: "
                          "pip install huggingface_hub") from None
    patterns = ["*.json", "*.jinja", "model*.safetensors"]
    path = _snapshot(snapshot_download, name, revision, patterns)
    if not any((path / f).is_file() for f in WEIGHT_FILES[:2]):
        patterns.append("pytorch_model*.bin")
        path = _snapshot(snapshot_download, name, revision, patterns)
    return path


def _snapshot(snapshot_download: Any, name: str, revision: str | None, patterns: list[str]) -> Path:
    """One ``snapshot_download``; any failure (no network, offline mode, an unknown or gated repository)
    becomes one line that says what failed and what to do offline, not the library's traceback."""
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns))
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, connection, OS errors)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"could not download {name!r} from the Hugging Face Hub ({type(e).__name__}: {reason[:200]}). "
            "--from-hub needs network access; offline, download the repository on a machine that has it "
            f"(`hf download {name} --local-dir DIR`), copy DIR here and run `zenlm convert from-hf DIR --out RUN`."
        ) from None


__all__ = [
    "WeightRule", "Architecture", "SUPPORTED_ARCHITECTURES", "gpt2_weight_map", "llama_weight_map",
    "gpt2_config", "llama_config", "architecture_for_hf", "architecture_for_config", "HFWeights",
    "import_hf", "export_hf", "download_from_hub", "gpt_run_config", "load_gpt_run", "load_run_tokenizer",
    "export_tokenizer_config", "theirs_state",
]
