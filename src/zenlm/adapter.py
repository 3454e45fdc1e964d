"""LoRA runs on disk: a run directory that holds adapters for a base run instead of a whole model.

    RUN/config.yaml            the base's model config, the training settings, and a ``lora`` section:
                               rank, alpha, dropout, targets, qkv, modules (the adapted layers: name -> parts
                               or null), base: {run: /abs/path/of/base, fingerprint: "sha256:...",
                               quantization: null | "int8-weight-only"}
    RUN/adapter.safetensors    what the run trained: every A and B (``blocks.0.attn.qkv.lora_a.weight`` [r, in],
                               ``blocks.0.attn.qkv.lora_b.weight`` [out, r]; a split q/k/v layer has
                               ``...qkv.lora_a.q.weight`` etc.) and, for a classifier, its head
    RUN/adapter_config.json    the ``lora`` section again as JSON, with ``"format": "zenlm-lora"``
    RUN/tokenizer.json, ...    the base's tokenizer

Reading one back is :func:`zenlm.rundir.load_run`'s job (the base run's model, its fingerprint checked, LoRA
layers, the adapters, merged). This module is the writing side: the base a recipe trains adapters on
(:func:`load_base`), the ``lora`` section (:func:`lora_section`), the files at the end of training
(:func:`finish_lora_run`), a whole LoRA run at once (:func:`write_lora_run`, for imports) and ``zenlm
merge-lora`` (:func:`merge_lora_run`). The fingerprint is :func:`zenlm.models.lora.weights_fingerprint`: SHA-256
over every tensor's name, dtype, shape and bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zenlm.errors import ConfigError
from zenlm.fileio import atomic_path, atomic_write_text, write_safetensors
from zenlm.models.int8 import dequantize_int8
from zenlm.models.lora import LoRAConfig, has_lora, merge_and_unload
from zenlm.rundir import (
    ADAPTER_WEIGHTS,
    build_model_from_run,
    copy_tokenizer_files,
    load_run,
    read_run_config,
    run_task,
    weights_file,
    write_run_config,
)
from zenlm.train.checkpoint import load_model_weights, save_model

ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "zenlm-lora"


def load_base(run: str | Path, *, lora: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of run directory ``run`` and its config, to fine-tune or to carry adapters.

    An int8 run (``zenlm quantize``) comes back with its int8 layers, which only LoRA can train on
    (``lora=False`` refuses it). A LoRA run or a classifier is refused as a base for adapters."""
    run = Path(run)
    saved = read_run_config(run)
    if saved.get("lora"):
        raise ConfigError(f"{run} is a LoRA run (adapters on {saved['lora']['base']['run']}); merge it into a plain "
                          f"run first: zenlm merge-lora {run} --out MERGED, then start from MERGED.")
    if run_task(saved) == "classify":
        raise ConfigError(f"{run} is a classifier; start from the run it was fine-tuned from.")
    if saved.get("quantization") and not lora:
        raise ConfigError(f"{run} holds int8 weights, which cannot be trained; fine-tune the full-precision run, or "
                          "train LoRA adapters on this one (--lora).")
    model, _, _ = build_model_from_run(run)
    load_model_weights(model, weights_file(run))
    return model, saved


def lora_section(cfg: LoRAConfig, modules: dict[str, list[str] | None], base_run: str | Path, fingerprint: str,
                 base_saved: dict[str, Any]) -> dict[str, Any]:
    """The ``lora`` section of a LoRA run's config.yaml (also written as adapter_config.json)."""
    return {"format": FORMAT, **cfg.to_dict(), "modules": modules,
            "base": {"run": str(Path(base_run).resolve()), "fingerprint": fingerprint,
                     "quantization": (base_saved.get("quantization") or {}).get("method")}}


def _copy_run_files(src: Path, dst: Path) -> None:
    """The tokenizer files (and an imported run's generation_config.json) of run ``src`` into ``dst``."""
    copy_tokenizer_files(src, dst)
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", dst / "generation_config.json")


def finish_lora_run(out: Path, section: dict[str, Any]) -> None:
    """After training: the trained tensors (``model.safetensors``, written by the training loop) become
    ``adapter.safetensors``, and ``adapter_config.json`` describes them."""
    if (out / "model.safetensors").is_file():
        os.replace(out / "model.safetensors", out / ADAPTER_WEIGHTS)
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(section, indent=2, ensure_ascii=False) + "\n")


def write_lora_run(out: str | Path, run_config: dict[str, Any], tensors: dict[str, torch.Tensor],
                   base_run: str | Path, *, overwrite: bool = False) -> Path:
    """Write a complete LoRA run directory at once: config.yaml (with its ``lora`` section), adapter.safetensors,
    adapter_config.json and the base's tokenizer files, through a temporary directory renamed into place.
    ``out`` must not exist unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out (or pass --overwrite).")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        write_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / ADAPTER_WEIGHTS,
                          metadata={"format": "pt"})
        write_run_config(tmp, run_config)
        atomic_write_text(tmp / ADAPTER_CONFIG, json.dumps(run_config["lora"], indent=2, ensure_ascii=False) + "\n")
        _copy_run_files(Path(base_run), tmp)
    return out


def merge_lora_run(run: str | Path, out: str | Path) -> Path:
    """Write LoRA run ``run`` as a plain run directory ``out`` (which must not exist): base weights with the
    adapters merged, ``W + (alpha / r) B A``, in float32 (an int8 base is expanded: re-quantise the result with
    ``zenlm quantize`` if wanted). Returns ``out``."""
    run, out = Path(run), Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new --out for the merged run.")
    saved = read_run_config(run)
    if not saved.get("lora"):
        raise ConfigError(f"{run} is not a LoRA run (config.yaml has no lora section); nothing to merge.")
    model = load_run(run, device="cpu", dtype="fp32", merge=False).model  # merged in float32
    merge_and_unload(model)
    dequantize_int8(getattr(model, "backbone", model))  # a classifier's int8 backbone, or the model
    assert not has_lora(model)
    merged = {k: v for k, v in saved.items() if k != "lora"}
    merged["merged_from"] = {"run": str(run.resolve()), "lora": saved["lora"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_model(model, tmp / "model.safetensors")
        write_run_config(tmp, merged)
        _copy_run_files(run, tmp)
    return out


__all__ = ["ADAPTER_CONFIG", "FORMAT", "load_base", "lora_section", "finish_lora_run", "write_lora_run",
           "merge_lora_run"]
