"""The run directory: what a training run leaves on disk, and how to read it back.

    RUN_DIR/config.yaml          model config + training settings (enough to rebuild and continue)
    RUN_DIR/tokenizer.json       the tokenizer (+ tokenizer_config.json)
    RUN_DIR/model.safetensors    final weights
    RUN_DIR/checkpoints/step-NNNNNN/   resumable checkpoints (see zenlm.train.checkpoint)
    RUN_DIR/metrics.jsonl        one JSON object per logged step
    RUN_DIR/plots/loss.png       loss curve
    RUN_DIR/tb/                  TensorBoard events
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from zenlm.config import GPTConfig, config_from_dict
from zenlm.errors import CheckpointError
from zenlm.models.gpt import GPT

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


def load_run_weights(run_dir: str | Path, model: torch.nn.Module) -> None:
    """The weights of ``run_dir`` into ``model``: model.safetensors, else the newest checkpoint's (a run that was
    stopped hard); names and shapes are checked (CheckpointError naming the file)."""
    from zenlm.train.checkpoint import list_checkpoints, load_model_weights

    run_dir = Path(run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        ckpts = list_checkpoints(run_dir / "checkpoints")
        if not ckpts:
            raise CheckpointError(f"{run_dir} has neither model.safetensors nor a checkpoint; train it first.")
        weights = ckpts[-1] / "model.safetensors"
    load_model_weights(model, weights)


def build_model_from_run(run_dir: str | Path) -> tuple[GPT, GPTConfig, dict[str, Any]]:
    """The (untrained) model described by ``run_dir/config.yaml``, its config and the whole run config.

    A GPT, a BERT (arch "bert") or an encoder-decoder (arch "encdec"); a classifier run (``task.kind:
    classify``) wraps its GPT or BERT backbone in a :class:`~zenlm.models.classifier.SequenceClassifier`.
    """
    saved = read_run_config(run_dir)
    cfg = config_from_dict(saved["model"])
    arch = saved["model"].get("arch")
    if arch == "encdec":
        from zenlm.models.encdec import EncoderDecoder

        return EncoderDecoder(cfg), cfg, saved  # type: ignore[return-value,arg-type]
    if arch == "bert":
        from zenlm.models.bert import Bert

        model: Any = Bert(cfg)  # type: ignore[arg-type]
    else:
        model = GPT(cfg)
    task = saved.get("task") or {}
    if task.get("kind") == "classify":
        from zenlm.models.classifier import SequenceClassifier

        labels = task.get("labels")
        if not isinstance(labels, list) or len(labels) < 2:
            raise CheckpointError(f"{run_dir}/config.yaml: a classifier run needs task.labels (two or more).")
        model = SequenceClassifier(model, len(labels), task.get("pooling", "mean"), task.get("dropout", 0.1))
    return model, cfg, saved
