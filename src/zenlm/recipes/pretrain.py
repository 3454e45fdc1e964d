"""Causal-LM pretraining: token shards -> GPT -> run directory.

The objective is next-token prediction. For a window of tokens ``t_0 .. t_T`` the model sees
``x = t_0 .. t_{T-1}`` and is scored on ``y = t_1 .. t_T``::

    loss = -1/(B*T) * sum_{b,t} log softmax(logits[b, t])[y[b, t]]          (nats per token)

Validation also reports perplexity ``exp(loss)`` and bits per byte
``loss / ln 2 * tokens / bytes`` (tokens and UTF-8 bytes of the validation text), which compares runs
that use different tokenizers.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from zenlm import __version__
from zenlm.config import config_from_dict
from zenlm.data.batches import CausalBatches, eval_batches
from zenlm.data.shards import TokenShards, load_index
from zenlm.device import resolve_device
from zenlm.errors import ConfigError
from zenlm.models.gpt import GPT
from zenlm.presets import get_preset
from zenlm.progress import ProgressFn, report
from zenlm.recipes.registry import RECIPES
from zenlm.rundir import TOKENIZER_FILES, read_run_config
from zenlm.train.checkpoint import atomic_write_text, list_checkpoints
from zenlm.train.loop import TrainConfig, TrainResult, config_to_dict, fit
from zenlm.train.optim import OptimConfig


def causal_lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy. batch = (x_BT, y_BT) int64; returns (loss, number of tokens)."""
    x_BT, y_BT = batch
    logits_BTV = model(x_BT)
    loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten())
    return loss, y_BT.numel()


@torch.no_grad()
def evaluate_causal_lm(
    model: nn.Module, shards: TokenShards, batch_size: int, seq_len: int, max_tokens: int | None,
    bytes_per_token: float, device: torch.device,
) -> dict[str, float]:
    """Validation loss (nats/token), perplexity and bits per byte over the first ``max_tokens`` of a split."""
    total, n = 0.0, 0
    for x_BT, y_BT in eval_batches(shards, batch_size, seq_len, max_tokens):
        x_BT, y_BT = x_BT.to(device, non_blocking=True), y_BT.to(device, non_blocking=True)
        logits_BTV = model(x_BT)
        total += F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten(), reduction="sum").item()
        n += y_BT.numel()
    loss = total / max(n, 1)
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_bpb": loss / math.log(2) / bytes_per_token,
    }


def pretrain(
    data: str | Path,
    out: str | Path,
    *,
    model: str = "demo",
    model_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    batch_size: int = 16,
    seq_len: int | None = None,
    eval_tokens: int | None = 65536,
    eval_seq_len: int | None = None,
    eval_batch_size: int | None = None,
    train: TrainConfig | None = None,
    optim: OptimConfig | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Pretrain a GPT on the token shards in ``data`` and write a run directory ``out``.

    data:            a directory made by ``zenlm prepare`` (shards, index.json, tokenizer files)
    out:             the run directory to create (or to continue with ``resume=True``)
    model:           a preset name from :mod:`zenlm.presets` (ignored on resume: the saved config is used)
    model_overrides: GPTConfig fields to change on top of the preset (e.g. {"n_layer": 6})
    batch_size:      sequences per micro-batch; tokens per step = batch_size * seq_len * grad_accum
    seq_len:         training context (None = the model's block_size)
    eval_tokens:     validation tokens per evaluation (None = the whole split)
    eval_seq_len:    window length for validation (None = seq_len); fix it to compare runs fairly
    eval_batch_size: windows per validation batch (None = batch_size)
    """
    data, out = Path(data), Path(out)
    train = train or TrainConfig()
    optim = optim or OptimConfig(**RECIPES["default"].optim)
    index = load_index(data)
    vocab_size = int(index["vocab_size"])

    if resume:
        saved = read_run_config(out)
        cfg = config_from_dict(saved["model"])
        sb = saved.get("batch", {})
        batch_size, seq_len = sb.get("batch_size", batch_size), sb.get("seq_len", seq_len)
        eval_seq_len, eval_batch_size = sb.get("eval_seq_len", eval_seq_len), sb.get("eval_batch_size",
                                                                                     eval_batch_size)
    else:
        if (out / "config.yaml").exists() or list_checkpoints(out / "checkpoints"):
            raise ConfigError(
                f"{out} already holds a run; pass --resume to continue it, or choose another --out."
            )
        cfg = get_preset(model, vocab_size=vocab_size, **(model_overrides or {}))
    if cfg.vocab_size < vocab_size:
        raise ConfigError(f"model vocab_size {cfg.vocab_size} is smaller than the data's {vocab_size}.")
    seq_len = seq_len or cfg.block_size
    if seq_len > cfg.block_size:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's block_size {cfg.block_size}.")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")

    train_shards = TokenShards.open(data, "train")
    val_shards = TokenShards.open(data, "val")
    val_info = index["splits"]["val"]
    bytes_per_token = max(val_info["bytes"], 1) / max(val_info["tokens"], 1)

    device = resolve_device(train.device)
    torch.manual_seed(train.seed)
    net = GPT(cfg).to(device)

    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        for name in TOKENIZER_FILES:
            if (data / name).exists():
                shutil.copyfile(data / name, out / name)
        run_config = {
            "zenlm_version": __version__,
            "model": cfg.to_dict(),
            "batch": {"batch_size": batch_size, "seq_len": seq_len, "eval_tokens": eval_tokens,
                      "eval_seq_len": eval_seq_len, "eval_batch_size": eval_batch_size},
            "train": config_to_dict(train),
            "optim": config_to_dict(optim),
            "data": {"dir": str(data.resolve()), "vocab_size": vocab_size, "corpus": index.get("corpus")},
            "objective": "causal-lm",
        }
        atomic_write_text(out / "config.yaml", yaml.safe_dump(run_config, sort_keys=False, allow_unicode=True))

    batches = CausalBatches(train_shards, batch_size, seq_len, seed=train.seed)

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x_BT, y_BT = batches.get(step, micro)
        return x_BT.to(device, non_blocking=True), y_BT.to(device, non_blocking=True)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_causal_lm(m, val_shards, eval_batch_size or batch_size, eval_seq_len or seq_len,
                                  eval_tokens, bytes_per_token, device)

    report(progress, "train", message=(
        f"model: {cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.num_params() / 1e6:.2f}M parameters; "
        f"{len(train_shards):,} training tokens; {batch_size}x{seq_len}x{train.grad_accum} tokens/step; "
        f"device {device}"))
    result = fit(net, get_batch, causal_lm_loss, out, train, optim, evaluate=evaluate, resume=resume,
                 progress=progress)
    try:
        from zenlm.viz import plot_loss_curve

        plot_loss_curve(out / "metrics.jsonl", out / "plots" / "loss.png")
    except ImportError:  # pragma: no cover - matplotlib is a declared dependency
        pass
    return result


__all__ = ["pretrain", "causal_lm_loss", "evaluate_causal_lm"]
