"""PEFT LoRA adapters <-> zenlm LoRA runs, for the GPT-2 and Llama-family layouts.

    export_peft(RUN, DIR)              adapter_config.json + adapter_model.safetensors, which
                                       ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE),
                                       DIR)`` loads on the base exported by ``export_hf``
    import_peft(DIR, BASE_RUN, RUN)    a PEFT LoRA adapter for a model imported with ``import_hf`` -> a LoRA run

Where each adapter lives on the other side comes from the same weight map as the base weights
(:mod:`zenlm.convert.hf`): the rule that stacks ``q_proj``, ``k_proj`` and ``v_proj`` into our ``attn.qkv`` also
says which part of the fused layer each of PEFT's adapters belongs to::

    ours (adapter.safetensors)                  PEFT (adapter_model.safetensors, prefix base_model.model.)
    blocks.0.attn.qkv.lora_a.weight    [r, C]   transformer.h.0.attn.c_attn.lora_A.weight      GPT-2: one pair
    blocks.0.attn.qkv.lora_b.weight    [3C, r]  transformer.h.0.attn.c_attn.lora_B.weight
    blocks.0.attn.qkv.lora_a.q.weight  [r, C]   model.layers.0.self_attn.q_proj.lora_A.weight  Llama: a pair
    blocks.0.attn.qkv.lora_b.q.weight  [HD, r]  model.layers.0.self_attn.q_proj.lora_B.weight  per part
    blocks.0.mlp.proj.lora_a.weight    [r, F]   model.layers.0.mlp.down_proj.lora_A.weight

Both sides compute ``y = W x + (lora_alpha / r) * B (A x)``, so r and alpha carry over unchanged. GPT-2's
``Conv1D`` stores its weight transposed ([in, out]), but PEFT keeps lora_A as [r, in] and lora_B as [out, r]
there too and transposes only the product when it merges (``fan_in_fan_out=True``): the adapter tensors copy
across as they are. A single pair on a fused q/k/v layer exports to Llama's separate projections exactly (each
gets A and its rows of B); separate pairs cannot become GPT-2's single ``c_attn`` pair, and are refused there.
PEFT's ``use_rslora`` (scale alpha / sqrt(r)) imports as alpha' = alpha * sqrt(r); DoRA, trained biases, extra
modules and per-layer ranks are refused with the field named.

Trainable token rows (``LoRAConfig.tokens``) are PEFT's ``trainable_token_indices``. PEFT stores the rows
themselves (not a difference to the base rows) as ``trainable_tokens_delta``::

    tok_emb.rows   [n, C]   model.embed_tokens.token_adapter.trainable_tokens_delta    (transformer.wte... for GPT-2)
    lm_head.rows   [n, C]   lm_head.token_adapter.trainable_tokens_delta               (untied heads only)

A tied model lists the ids (``[1, 0]``: PEFT ties the head's rows to the embedding's); an untied one names both
layers (``{"embed_tokens": [1, 0], "lm_head": [1, 0]}``).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from zenlm import __version__
from zenlm.adapter import load_base, lora_section, write_lora_run
from zenlm.config import GPTConfig
from zenlm.convert.common import WeightRule, prepare_out, read_json, write_json
from zenlm.convert.hf import Architecture, architecture_for_config
from zenlm.errors import ConfigError, DataError
from zenlm.fileio import save_safetensors
from zenlm.models.lora import FUSED_PARTS, LoRAConfig, linear_layers, weights_fingerprint
from zenlm.rundir import LM_TASKS, read_run_config, run_architecture, run_task, weights_file

PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_TOKENS_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.token_adapter\.trainable_tokens_delta"
                         r"(?:\.[A-Za-z0-9_-]+)?$")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _linear_rules(cfg: GPTConfig, arch: Architecture) -> dict[str, tuple[WeightRule, tuple[int, int]]]:
    """Our linear layer name -> (the weight rule of its weight, its (out, in) shape), from a model built on the
    meta device (no memory)."""
    from zenlm.models.gpt import GPT

    with torch.device("meta"):
        model = GPT(cfg)
    rules = {r.ours: r for r in arch.weight_map(cfg)}
    return {name: (rules[f"{name}.weight"], (m.out_features, m.in_features))
            for name, m in linear_layers(model).items()}


def _module(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def _token_modules(cfg: GPTConfig, arch: Architecture) -> tuple[str, str]:
    """Their names of the token embedding and the output head (``model.embed_tokens``, ``lm_head``)."""
    rules = {r.ours: r for r in arch.weight_map(cfg)}
    head = rules.get("lm_head.weight")
    return _module(rules["tok_emb.weight"].theirs[0]), _module(head.theirs[0]) if head else "lm_head"


def _target_modules(adapted: list[str], every: list[str]) -> list[str]:
    """PEFT's target_modules for exactly the ``adapted`` modules among ``every`` linear module: a two-part suffix
    (``attn.c_attn``, ``self_attn.q_proj``; PEFT matches a name or the end of one) where it selects exactly the
    adapted layers, full names otherwise."""
    groups: dict[str, list[str]] = {}
    for name in adapted:
        groups.setdefault(".".join(name.split(".")[-2:]), []).append(name)
    out: list[str] = []
    for suffix, names in groups.items():
        matching = {n for n in every if n == suffix or n.endswith("." + suffix)}
        out += [suffix] if matching == set(names) else names
    return out


# ------------------------------------------------------------------------------------------------ export


def _hf_source(base_run: Path) -> str | None:
    """The Hugging Face directory a base run was imported from (``source`` in its config.yaml), if any."""
    if not (base_run / "config.yaml").is_file():
        return None
    source = read_run_config(base_run).get("source") or {}
    return source.get("dir") if source.get("format") == "huggingface" else None


def export_peft(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, base_model: str | None = None,
                dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write LoRA run ``run_dir`` as a PEFT adapter directory ``out_dir`` (adapter_config.json,
    adapter_model.safetensors); returns ``out_dir``.

    base_model: written as ``base_model_name_or_path`` (a Hub name or the directory of the base exported with
                ``zenlm convert to-hf BASE``); default: where the base run was imported from, else the base run.
    """
    run, out = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose fp32, bf16 or fp16.")
    saved = read_run_config(run)
    section = saved.get("lora")
    if not section:
        raise ConfigError(f"{run} is not a LoRA run; export a whole model with export_hf.")
    if run_task(saved) not in LM_TASKS or saved["model"].get("arch", "gpt") != "gpt":
        raise ConfigError(f"{run}: PEFT export covers LoRA runs of decoder-only language models (causal LM); merge "
                          f"this one instead: zenlm merge-lora {run} --out MERGED.")
    cfg = run_architecture(saved).config_from_dict(saved["model"])
    arch = architecture_for_config(cfg)
    linear = _linear_rules(cfg, arch)
    weights = weights_file(run)
    ours = load_file(str(weights))
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in ours:
            raise DataError(f"{weights}: tensor {name!r} is missing; config.yaml's lora.modules names its layer.")
        used.add(name)
        return ours[name].to(DTYPES[dtype]).contiguous()

    theirs: dict[str, Tensor] = {}
    adapted: list[str] = []
    fan_in_fan_out = False
    for module, parts in section["modules"].items():
        if module not in linear:
            raise ConfigError(f"{run}: the adapted layer {module} has no counterpart in {arch.name}.")
        rule, _ = linear[module]
        names = [_module(t) for t in rule.theirs]
        if parts is None:
            a, b = take(f"{module}.lora_a.weight"), take(f"{module}.lora_b.weight")
            # one pair on a layer that is several on their side: shared A, B split by rows (exact)
            bs = list(b.split(list(rule.split), dim=0)) if rule.split else [b]
            pairs = [(n, a, bp.contiguous()) for n, bp in zip(names, bs, strict=True)]
        elif rule.split is None:
            raise ConfigError(f"{run}: {module} has one LoRA pair per part ({', '.join(parts)}), but {arch.name} keeps "
                              f"it as one fused layer ({names[0]}) that PEFT adapts with a single pair. Train with "
                              "qkv='fused' (the default for this layout) to export.")
        else:
            order = FUSED_PARTS[module.rsplit(".", 1)[-1]]
            pairs = [(names[order.index(p)], take(f"{module}.lora_a.{p}.weight"), take(f"{module}.lora_b.{p}.weight"))
                     for p in parts]
        fan_in_fan_out |= rule.transpose
        for name, a, b in pairs:
            theirs[f"{PREFIX}{name}.lora_A.weight"], theirs[f"{PREFIX}{name}.lora_B.weight"] = a, b
            adapted.append(name)
    token_ids = list(LoRAConfig.from_dict(section).token_ids)
    trainable_tokens: list[int] | dict[str, list[int]] | None = None
    if token_ids:
        emb_name, head_name = _token_modules(cfg, arch)
        theirs[f"{PREFIX}{emb_name}.token_adapter.trainable_tokens_delta"] = take("tok_emb.rows")
        if cfg.tie_embeddings:
            trainable_tokens = token_ids
        else:
            theirs[f"{PREFIX}{head_name}.token_adapter.trainable_tokens_delta"] = take("lm_head.rows")
            trainable_tokens = {emb_name.rsplit(".", 1)[-1]: token_ids, head_name: token_ids}
    extra = sorted(set(ours) - used)
    if extra:
        raise ConfigError(f"{weights} also holds {extra[:3]}, which a PEFT LoRA adapter cannot carry; merge the run "
                          "instead (zenlm merge-lora).")
    every = [_module(t) for rule, _ in linear.values() for t in rule.theirs]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(section["rank"]), "lora_alpha": section["alpha"],
        "lora_dropout": section["dropout"], "target_modules": _target_modules(adapted, every),
        "base_model_name_or_path": base_model or _hf_source(Path(section["base"]["run"])) or section["base"]["run"],
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "revision": None,
        "trainable_token_indices": trainable_tokens,
    }
    prepare_out(out, PEFT_CONFIG, overwrite)
    save_safetensors(theirs, out / PEFT_WEIGHTS[0], metadata={"format": "pt"})
    write_json(out / PEFT_CONFIG, config)
    return out


# ------------------------------------------------------------------------------------------------ import


def _check_peft_config(c: dict[str, Any], where: Path) -> tuple[int, float, float]:
    """(r, alpha in our convention, dropout) of a PEFT adapter_config.json; ConfigError naming the field that
    asks for something zenlm's LoRA does not compute."""
    def refuse(field: str, why: str) -> ConfigError:
        return ConfigError(f"{where}: {field}={c.get(field)!r} is not supported: {why}.")

    if c.get("peft_type") != "LORA":
        raise refuse("peft_type", "zenlm imports LoRA adapters (peft_type 'LORA') only")
    if c.get("task_type") not in (None, "CAUSAL_LM"):
        raise refuse("task_type", "zenlm imports adapters of causal language models (CAUSAL_LM)")
    if c.get("use_dora"):
        raise refuse("use_dora", "DoRA's magnitude vectors have no counterpart in zenlm's LoRA")
    if c.get("bias", "none") != "none" or c.get("lora_bias"):
        field = "lora_bias" if c.get("lora_bias") else "bias"
        raise refuse(field, "zenlm's LoRA trains no biases")
    for field, why in [("modules_to_save", "fully trained extra modules are not part of zenlm's LoRA"),
                       ("rank_pattern", "zenlm's LoRA uses one rank for every layer"),
                       ("alpha_pattern", "zenlm's LoRA uses one alpha for every layer"),
                       ("target_parameters", "zenlm adapts linear layers (target_modules) only"),
                       ("layer_replication", "zenlm does not replicate layers"),
                       ("alora_invocation_tokens", "activated LoRA is not supported"),
                       ("use_qalora", "QA-LoRA is not supported")]:
        if c.get(field):
            raise refuse(field, why)
    r, alpha = c.get("r"), c.get("lora_alpha")
    if not isinstance(r, int) or r < 1:
        raise refuse("r", "it must be a positive integer")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise refuse("lora_alpha", "it must be a positive number")
    dropout = c.get("lora_dropout") or 0.0
    # rsLoRA scales by alpha / sqrt(r); the same update in our convention (alpha / r) needs alpha * sqrt(r)
    return r, float(alpha) * math.sqrt(r) if c.get("use_rslora") else float(alpha), float(dropout)


def _import_token_rows(c: dict[str, Any], rows: dict[str, Tensor], net: Any, cfg: GPTConfig, arch: Architecture,
                       ours: dict[str, Tensor], where: Path, weights_file: Path) -> list[int]:
    """PEFT's ``trainable_token_indices`` and their ``trainable_tokens_delta`` tensors -> our ``tok_emb.rows`` and
    ``lm_head.rows`` (added to ``ours``); returns the ids. A layer that trained no rows keeps the base's."""
    spec = c.get("trainable_token_indices")
    if not spec:
        if rows:
            raise DataError(f"{weights_file} holds trainable token rows ({sorted(rows)[0]}), but {where} has no "
                            "trainable_token_indices saying which tokens they are.")
        return []
    emb_name, head_name = _token_modules(cfg, arch)

    def ours_of(layer: str) -> str | None:
        for name, mine in ((emb_name, "tok_emb"), (head_name, "lm_head")):
            if name == layer or name.endswith("." + layer) or layer.endswith("." + name) or \
                    arch.prefix + layer == name:
                return mine
        return None

    by_layer: dict[str, list[int]] = {}
    if isinstance(spec, list):
        by_layer["tok_emb"] = spec
    elif isinstance(spec, dict):
        for layer, ids in spec.items():
            mine = ours_of(layer)
            if mine is None:
                raise ConfigError(f"{where}: trainable_token_indices names {layer!r}, which is neither the token "
                                  f"embedding ({emb_name}) nor the output head ({head_name}) of the {arch.name} base.")
            by_layer[mine] = ids
    else:
        raise ConfigError(f"{where}: trainable_token_indices={spec!r} is neither a list of token ids nor a dict of "
                          "layer -> ids.")
    lists = list(by_layer.values())
    if any(not isinstance(ids, list) or not all(isinstance(i, int) and 0 <= i < cfg.vocab_size for i in ids)
           for ids in lists) or not lists[0]:
        raise ConfigError(f"{where}: trainable_token_indices={spec!r} must list token ids below the vocabulary size "
                          f"{cfg.vocab_size}.")
    if any(ids != lists[0] for ids in lists[1:]):
        raise ConfigError(f"{where}: trainable_token_indices={spec!r} trains different tokens in the embedding and "
                          "the head; zenlm trains one list of tokens in both.")
    ids = lists[0]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: trainable_token_indices={spec!r} lists a token twice.")
    found: dict[str, Tensor] = {}
    for layer, t in rows.items():
        mine = ours_of(layer)
        if mine is None or mine not in by_layer and not (mine == "lm_head" and cfg.tie_embeddings):
            raise DataError(f"{weights_file}: trainable token rows for {layer!r}, which trainable_token_indices does "
                            "not name.")
        if tuple(t.shape) != (len(ids), cfg.n_embd):
            raise DataError(f"{weights_file}: the trainable token rows of {layer} have shape {tuple(t.shape)}, but "
                            f"{len(ids)} tokens of the base need {(len(ids), cfg.n_embd)}.")
        found[mine] = t.float()
    index = torch.tensor(ids)
    with torch.no_grad():
        ours["tok_emb.rows"] = found.get("tok_emb", net.tok_emb(index).float())  # a float or int8 table
        if not cfg.tie_embeddings:  # an untied head that trained no rows keeps its own
            head = net.lm_head
            w = head.dequantized(torch.float32) if hasattr(head, "dequantized") else head.weight.float()
            ours["lm_head.rows"] = found.get("lm_head", w[index])
    return ids


def _read_peft_weights(src: Path) -> tuple[dict[str, Tensor], Path]:
    for name in PEFT_WEIGHTS:
        path = src / name
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                return load_file(str(path)), path
            sd = torch.load(str(path), map_location="cpu", weights_only=True)  # plain tensors only, no code
        except (SafetensorError, OSError, RuntimeError) as e:
            raise DataError(f"{path} cannot be read ({e}).") from None
        except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
            raise DataError(f"{path} cannot be read as plain tensors ({type(e).__name__}: {e}).") from None
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise DataError(f"{path} does not hold a flat name -> tensor mapping.")
        return sd, path
    raise DataError(f"{src} holds no adapter weights: none of {', '.join(PEFT_WEIGHTS)} is there.")


def is_peft_adapter(path: str | os.PathLike[str]) -> bool:
    """Does ``path`` look like a PEFT adapter directory (adapter_config.json with a peft_type, no config.json)?"""
    p = Path(path)
    if not (p / PEFT_CONFIG).is_file() or (p / "config.json").is_file() or (p / "config.yaml").is_file():
        return False
    try:
        return "peft_type" in json.loads((p / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return True  # it claims to be one; import_peft says what is wrong with it


def import_peft(src_dir: str | os.PathLike[str], base_run: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                *, overwrite: bool = False) -> Path:
    """Convert a PEFT LoRA adapter directory into a zenlm LoRA run on ``base_run`` (a GPT-2 or Llama-family run,
    e.g. imported with ``import_hf``); returns ``out_dir``. ``zenlm.load(out_dir)`` then gives the adapted model.

    Every tensor is checked against the base: a layer the base does not have, or a shape that does not fit, is
    refused by name, and nothing is written.
    """
    src, base, out = Path(src_dir), Path(base_run), Path(out_dir)
    where = src / PEFT_CONFIG
    c = read_json(where, "a PEFT adapter directory has an adapter_config.json")
    rank, alpha, dropout = _check_peft_config(c, where)
    tensors, weights_file = _read_peft_weights(src)
    net, base_saved = load_base(base)
    if base_saved["model"].get("arch", "gpt") != "gpt":
        raise ConfigError(f"{base} holds a {base_saved['model'].get('arch')!r} model; PEFT adapters import onto "
                          "decoder-only GPT-2 / Llama-family runs.")
    cfg = run_architecture(base_saved).config_from_dict(base_saved["model"])
    arch = architecture_for_config(cfg)
    linear = _linear_rules(cfg, arch)
    where_theirs: dict[str, tuple[str, int]] = {}  # their module -> (our module, index among the rule's names)
    for ours_name, (rule, _) in linear.items():
        for i, t in enumerate(rule.theirs):
            where_theirs[_module(t)] = (ours_name, i)

    pairs: dict[str, dict[str, Tensor]] = {}
    token_rows: dict[str, Tensor] = {}  # their module -> its trained rows
    for key, t in tensors.items():
        tm = _TOKENS_KEY.match(key)
        if tm is not None:
            token_rows[tm["module"]] = t
            continue
        m = _KEY.match(key)
        if m is None:
            raise DataError(f"{weights_file}: tensor {key!r} is not a LoRA A or B matrix of a linear layer or a "
                            "trainable token row; zenlm imports LoRA adapters with trainable tokens (no embedding "
                            "adapters, DoRA vectors or biases).")
        module = m["module"]
        if module not in where_theirs and arch.prefix + module in where_theirs:  # saved from the base model class
            module = arch.prefix + module
        if module not in where_theirs:
            raise DataError(f"{weights_file}: tensor {key!r} adapts {module}, which the {arch.name} base {base} has "
                            "no linear layer for.")
        pairs.setdefault(module, {})[m["ab"]] = t
    if not pairs:
        raise DataError(f"{weights_file} holds no LoRA tensors.")

    ours: dict[str, Tensor] = {}
    modules: dict[str, list[str] | None] = {}
    for module, ab in pairs.items():
        name, i = where_theirs[module]
        rule, (n_out, n_in) = linear[name]
        missing = [x for x in "AB" if x not in ab]
        if missing:
            raise DataError(f"{weights_file}: {module} has no lora_{missing[0]} matrix.")
        rows = rule.split[i] if rule.split else n_out
        for x, shape in (("A", (rank, n_in)), ("B", (rows, rank))):
            if tuple(ab[x].shape) != shape:
                raise DataError(f"{weights_file}: tensor {PREFIX}{module}.lora_{x}.weight has shape "
                                f"{tuple(ab[x].shape)}, but the base {base} with r={rank} needs {shape}.")
        if rule.split:  # one of the parts stacked in our fused layer: its own pair
            part = FUSED_PARTS[name.rsplit(".", 1)[-1]][i]
            modules.setdefault(name, []).append(part)  # type: ignore[union-attr]
            suffix = f".{part}.weight"
        else:
            modules[name] = None
            suffix = ".weight"
        ours[f"{name}.lora_a{suffix}"], ours[f"{name}.lora_b{suffix}"] = ab["A"].float(), ab["B"].float()
    order = list(linear)
    modules = {n: (sorted(p, key=FUSED_PARTS[n.rsplit(".", 1)[-1]].index) if p is not None else None)
               for n, p in sorted(modules.items(), key=lambda kv: order.index(kv[0]))}
    token_ids = _import_token_rows(c, token_rows, net, cfg, arch, ours, where, weights_file)
    qkv = "split" if any(r.split for r, _ in linear.values()) else "fused"  # the reference layout's own
    lora = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(modules), qkv=qkv,
                      tokens=tuple(token_ids) or ("none",))
    section = lora_section(lora, modules, base, weights_fingerprint(net), base_saved)
    section["source"] = {"format": "peft", "dir": str(src.resolve()), "target_modules": c.get("target_modules"),
                         "lora_alpha": c.get("lora_alpha"), "use_rslora": bool(c.get("use_rslora"))}
    run_config = {"zenlm_version": __version__, "model": base_saved["model"], "objective": "causal-lm",
                  "source": {"format": "peft", "dir": str(src.resolve()),
                             "base_model_name_or_path": c.get("base_model_name_or_path")},
                  "lora": section}
    return write_lora_run(out, run_config, ours, base, overwrite=overwrite)


__all__ = ["export_peft", "import_peft", "is_peft_adapter"]
