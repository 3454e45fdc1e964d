"""The run directory: what a training run leaves on disk, and how to read it back.

    RUN_DIR/config.yaml          model config + training settings (enough to rebuild and continue)
    RUN_DIR/tokenizer.json       the tokenizer (+ tokenizer_config.json)
    RUN_DIR/model.safetensors    final weights
    RUN_DIR/checkpoints/step-NNNNNN/   resumable checkpoints (see zenlm.train.checkpoint)
    RUN_DIR/metrics.jsonl        one JSON object per logged step
    RUN_DIR/plots/loss.png       loss curve
    RUN_DIR/tb/                  TensorBoard events

The model is rebuilt in two steps. The ``model:`` section names an architecture (``arch``), which the registry
(:mod:`zenlm.models.registry`) turns into a config and an ``nn.Module``. Then the run's own options wrap or
change that module, each in one function of :data:`RUN_OPTIONS`: a classifier run (``task: {kind: classify}``)
puts a classification head on it, a quantised run (``quantization:``) swaps its linear layers for int8 ones.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from zenlm.device import resolve_device, resolve_dtype
from zenlm.errors import CheckpointError
from zenlm.fileio import atomic_write_text
from zenlm.models.registry import Architecture, get_architecture
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import list_checkpoints, load_model_weights, read_weights, save_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.yaml`` of a run directory (CheckpointError when absent or malformed)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a zenlm run directory (no config.yaml). Check the path.")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML ({e}).") from e
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise CheckpointError(f"{path} has no 'model' section; it was not written by zenlm.")
    return cfg


def write_run_config(run_dir: str | Path, run_config: dict[str, Any]) -> None:
    """Write ``run_config`` as ``run_dir/config.yaml`` (keys in the given order, atomically)."""
    atomic_write_text(Path(run_dir) / "config.yaml",
                      yaml.safe_dump(run_config, sort_keys=False, allow_unicode=True))


def save_run(run_dir: str | Path, model: nn.Module, tokenizer: Tokenizer,
             run_config: dict[str, Any] | None = None) -> Path:
    """Write a run directory that :func:`load_run` (and ``zenlm.load``) opens: config.yaml (``model:`` from
    ``model.config.to_dict()``, then ``run_config``), the tokenizer files and model.safetensors. For models
    made in code rather than trained by a recipe (tests, benchmarks, a model built by hand)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, {"model": model.config.to_dict(), **(run_config or {})})
    tokenizer.save(run_dir)
    save_model(model, run_dir / "model.safetensors")
    return run_dir


def run_architecture(saved: dict[str, Any]) -> Architecture:
    """The registered architecture a run's config names (``model.arch``; runs written before there were
    other families have none and are GPTs)."""
    return get_architecture(saved["model"].get("arch", "gpt"))


def run_task(saved: dict[str, Any]) -> str | None:
    """What the run was fine-tuned for on top of its architecture ("classify"), or None."""
    return (saved.get("task") or {}).get("kind")


def _classifier_head(model: nn.Module, saved: dict[str, Any], run_dir: Path) -> nn.Module:
    """``task: {kind: classify}``: the backbone inside a SequenceClassifier with ``len(task.labels)`` classes."""
    task = saved.get("task") or {}
    if task.get("kind") != "classify":
        return model
    from zenlm.models.classifier import SequenceClassifier

    labels = task.get("labels")
    if not isinstance(labels, list) or len(labels) < 2:
        raise CheckpointError(f"{run_dir}/config.yaml: a classifier run needs task.labels (two or more).")
    return SequenceClassifier(model, len(labels), task.get("pooling", "mean"), task.get("dropout", 0.1))


def _int8_weights(model: nn.Module, saved: dict[str, Any], run_dir: Path) -> nn.Module:
    """``quantization: {method: int8-weight-only, ...}``: empty int8 layers that model.safetensors fills."""
    quant = saved.get("quantization") or {}
    if not quant:
        return model
    from zenlm.models.int8 import METHOD, quantize_int8

    if quant.get("method") != METHOD:
        raise CheckpointError(f"{run_dir}/config.yaml names quantization {quant.get('method')!r}; this "
                              f"version reads {METHOD!r}.")
    return quantize_int8(model, empty=True)


# What a run directory can add on top of its architecture, applied in this order to the built model.
RUN_OPTIONS: tuple[Callable[[nn.Module, dict[str, Any], Path], nn.Module], ...] = (_classifier_head, _int8_weights)


def build_model_from_run(run_dir: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The (untrained) model described by ``run_dir/config.yaml``, its config and the whole run config.

    The architecture comes from the registry (``model.arch``); then :data:`RUN_OPTIONS` are applied (a
    classifier run wraps its GPT or BERT backbone in a :class:`~zenlm.models.classifier.SequenceClassifier`).
    """
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    arch = run_architecture(saved)
    cfg = arch.config_from_dict(saved["model"])
    model = arch.build(cfg)
    for option in RUN_OPTIONS:
        model = option(model, saved, run_dir)
    return model, cfg, saved


def weights_file(run_dir: str | Path) -> Path:
    """``run_dir/model.safetensors``, else the newest checkpoint's weights (a run that was stopped hard)."""
    run_dir = Path(run_dir)
    weights = run_dir / "model.safetensors"
    if weights.is_file():
        return weights
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if not ckpts:
        raise CheckpointError(f"{run_dir} has neither model.safetensors nor a checkpoint; train it first.")
    return ckpts[-1] / "model.safetensors"


def load_run_weights(run_dir: str | Path, model: nn.Module) -> None:
    """The weights of ``run_dir`` (:func:`weights_file`) into ``model``; names, shapes, dtypes and values are
    checked (CheckpointError naming the file)."""
    load_model_weights(model, weights_file(run_dir))


def load_run_tokenizer(run_dir: str | Path) -> Tokenizer:
    """The tokenizer saved in ``run_dir`` (CheckpointError when it is missing)."""
    if not (Path(run_dir) / "tokenizer.json").is_file():
        raise CheckpointError(f"{run_dir} has no tokenizer.json; copy the tokenizer of its data directory there.")
    return Tokenizer.load(run_dir)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy the tokenizer files of ``src`` (a data or run directory) into ``dst`` as they are."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


@dataclass
class LoadedRun:
    """A run directory read back: its config, architecture, model (weights loaded, in eval mode) and tokenizer."""

    run_dir: Path
    saved: dict[str, Any]
    arch: Architecture
    model: nn.Module
    tokenizer: Tokenizer

    @property
    def task(self) -> str | None:
        return run_task(self.saved)


def load_run(run_dir: str | Path, *, device: str = "auto", dtype: str = "fp32") -> LoadedRun:
    """Build the model of ``run_dir``, load its weights (:func:`weights_file`) and tokenizer, and move it to
    ``device`` with weights in ``dtype`` (fp32 | bf16 | fp16)."""
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    if run_architecture(saved).from_tensors is not None:
        return _load_from_tensors(run_dir, saved, device)
    torch_dtype: torch.dtype = resolve_dtype(dtype)
    model, _, saved = build_model_from_run(run_dir)
    load_run_weights(run_dir, model)
    tokenizer = load_run_tokenizer(run_dir)
    model = model.to(resolve_device(device), dtype=torch_dtype).eval()
    return LoadedRun(run_dir, saved, run_architecture(saved), model, tokenizer)


def _load_from_tensors(run_dir: Path, saved: dict[str, Any], device: str) -> LoadedRun:
    """A family whose tensor shapes come from the data (the n-gram model's count tables) is built from the
    tensors of its weights file (``Architecture.from_tensors``, which checks them), in the dtypes they are
    stored in."""
    arch = run_architecture(saved)
    assert arch.from_tensors is not None
    model = arch.from_tensors(arch.config_from_dict(saved["model"]), read_weights(weights_file(run_dir)))
    return LoadedRun(run_dir, saved, arch, model.to(resolve_device(device)).eval(), load_run_tokenizer(run_dir))


__all__ = ["RUN_OPTIONS", "TOKENIZER_FILES", "LoadedRun", "build_model_from_run", "copy_tokenizer_files",
           "load_run", "load_run_tokenizer", "load_run_weights", "read_run_config", "run_architecture", "run_task",
           "save_run", "weights_file", "write_run_config"]
