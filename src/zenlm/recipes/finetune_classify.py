"""Classification fine-tuning: a pretrained run (BERT or GPT) + labelled texts -> a classifier run.

    texts, labels  --encode-->  [CLS] text [SEP] (BERT) | text <|eos|> (GPT)
    logits = W_c pool(backbone(ids)) + b_c                 (zenlm.models.classifier.SequenceClassifier)
    loss   = cross_entropy(logits, label)                  every weight is trained, backbone included

With ``lora`` the backbone stays frozen and only LoRA adapters on its linear layers and the head are trained
(:mod:`zenlm.models.lora`); the run then saves ``adapter.safetensors`` (adapters + head) and records the base.

Validation after every half epoch reports loss, accuracy and macro-F1; the weights of the best macro-F1
are kept (``model.safetensors``) and training stops early when it has not improved for ``patience``
evaluations. The run directory also gets ``report.json`` (accuracy, macro P/R/F1, per-class report,
confusion matrix) and ``plots/confusion.png`` for those best weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from zenlm import __version__
from zenlm.adapter import finish_lora_run, load_base, lora_section
from zenlm.data.classify import ClassBatches, encode_for_model, pad_batch, read_labelled, stratified_split
from zenlm.device import resolve_device
from zenlm.errors import CheckpointError, ConfigError, DataError
from zenlm.evaluate import ClassificationReport, classification_report
from zenlm.fileio import atomic_write_text
from zenlm.models.classifier import POOLINGS, SequenceClassifier
from zenlm.models.lora import LoRAConfig, apply_lora, describe_lora, weights_fingerprint
from zenlm.progress import ProgressFn, report
from zenlm.rundir import (
    build_model_from_run,
    copy_tokenizer_files,
    read_run_config,
    refuse_foreign_out,
    run_architecture,
    run_task,
    write_run_config,
)
from zenlm.tokenizer import Tokenizer
from zenlm.train.checkpoint import load_model_weights
from zenlm.train.loop import TrainConfig, TrainResult, apply_process_settings, config_to_dict, fit
from zenlm.train.optim import OptimConfig
from zenlm.train.step import LossOutput


@dataclass
class ClassifyResult:
    run_dir: Path
    train: TrainResult
    report: ClassificationReport  # on the validation split, with the kept (best) weights
    labels: list[str]


def load_backbone(base: str | Path, *, lora: bool = False) -> tuple[nn.Module, Tokenizer]:
    """The trained backbone (GPT or BERT: an architecture that can ``classify``) of run directory ``base`` and
    its tokenizer (``lora``: an int8 base is allowed, to carry LoRA adapters)."""
    base = Path(base)
    saved = read_run_config(base)
    arch = run_architecture(saved)
    if not arch.can("classify"):
        raise ConfigError(f"{base} holds a {arch.title} model, which cannot carry a classification head; fine-tune "
                          "a BERT or GPT run for classification.")
    if run_task(saved) == "classify":
        raise ConfigError(f"{base} is already a classifier; give the run it was fine-tuned from.")
    if saved.get("quantization") and not lora:
        raise ConfigError(f"{base} holds int8 weights for inference; fine-tune the full-precision run, or train "
                          "LoRA adapters on it (--lora).")
    if not (base / "model.safetensors").is_file() and not saved.get("lora"):
        raise CheckpointError(f"{base} has no model.safetensors; finish (or convert) the run first.")
    model, _ = load_base(base, lora=lora)  # a LoRA run is refused there: merge it first
    return model, Tokenizer.load(base)


@torch.no_grad()
def predict_logits(model: SequenceClassifier, seqs: list[list[int]], pad_id: int, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """Logits [N, n_classes] for encoded texts, in their order (batched by length to save padding)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), model.n_classes)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, mask = pad_batch([seqs[i] for i in idx], pad_id)
        out[idx] = model(ids.to(device), mask.to(device)).float().cpu()
    return out


def evaluate_classifier(model: SequenceClassifier, seqs: list[list[int]], y: list[int], labels: list[str],
                        pad_id: int, batch_size: int, device: torch.device) -> tuple[dict[str, float],
                                                                                   ClassificationReport]:
    """val_loss (mean cross-entropy), val_acc and val_f1 (macro) and the full report."""
    logits = predict_logits(model, seqs, pad_id, batch_size, device)
    target = torch.as_tensor(y)
    rep = classification_report(target.tolist(), logits.argmax(-1).tolist(), labels)
    loss = F.cross_entropy(logits, target).item()
    return {"val_loss": loss, "val_acc": rep.accuracy, "val_f1": rep.macro_f1}, rep


def finetune_classify(
    base: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    val: str | Path | None = None,
    val_fraction: float = 0.1,
    text_field: str = "text",
    label_field: str = "label",
    max_len: int = 128,
    pooling: Literal["auto", "cls", "mean", "last"] = "auto",
    dropout: float = 0.1,
    batch_size: int = 16,
    epochs: float = 3.0,
    lr: float | None = None,
    weight_decay: float = 0.01,
    warmup_frac: float = 0.1,
    patience: int = 2,
    evals_per_epoch: int = 2,
    train: TrainConfig | None = None,
    lora: LoRAConfig | None = None,
    progress: ProgressFn | None = None,
) -> ClassifyResult:
    """Fine-tune the BERT or GPT in run directory ``base`` to classify the texts of ``data``; writes ``out``.

    data / val:       .jsonl or .csv with a text and a label field (named by text_field / label_field); without
                      ``val`` a stratified ``val_fraction`` of ``data`` is held out (fixed by train.seed)
    max_len:          tokens per text (longer texts are cut), special tokens included
    pooling:          auto (BERT: mean of the hidden states; GPT: last token), cls (BERT's pooler), mean, last
    epochs:           passes over the training texts (``train.max_steps`` is ignored; ``train.max_seconds``
                      still caps the run)
    lr:               peak AdamW learning rate (linear warm-up over ``warmup_frac``, then linear decay to 0);
                      None = 5e-5, or 5e-4 with ``lora`` (adapters start from zero and need larger steps)
    warmup_frac:      share of the steps spent warming the learning rate up
    patience:         stop after this many evaluations without a better validation macro-F1 (0 = never)
    evals_per_epoch:  validations per pass over the training texts
    lora:             train LoRA adapters on the frozen backbone (and the head) instead of every weight; the
                      base may then be an int8 run
    """
    train = train or TrainConfig()
    world = apply_process_settings(train)  # with torchrun: joins the other processes of the run
    base, out = Path(base), Path(out)
    refuse_foreign_out(out)  # a folder of other files is never written into
    if (out / "config.yaml").exists():
        raise ConfigError(f"{out} already holds a run; choose another --out.")
    if epochs <= 0 or batch_size < 1 or evals_per_epoch < 1:
        raise ConfigError("epochs must be > 0, batch_size and evals_per_epoch >= 1.")
    lr = lr if lr is not None else (5e-4 if lora is not None else 5e-5)
    backbone, tok = load_backbone(base, lora=lora is not None)
    fingerprint = weights_fingerprint(backbone) if lora is not None else ""
    is_encoder = hasattr(backbone, "pool")
    pooling = ("mean" if is_encoder else "last") if pooling == "auto" else pooling
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling {pooling!r} is not supported; choose auto, {', '.join(POOLINGS)}.")
    max_len = min(max_len, backbone.config.block_size)

    examples = read_labelled(data, text_field, label_field)
    if val is not None:
        train_ex, val_ex = examples, read_labelled(val, text_field, label_field)
    else:
        train_ex, val_ex = stratified_split(examples, val_fraction, train.seed)
    labels = sorted({label for _, label in train_ex})
    unseen = sorted({label for _, label in val_ex} - set(labels))
    if unseen:
        raise DataError(f"the validation data has label(s) {unseen} that the training data never shows; known "
                        f"labels: {labels}.")
    if len(labels) < 2:
        raise DataError(f"the training data has only the label {labels}; a classifier needs two or more.")
    index = {label: i for i, label in enumerate(labels)}
    report(progress, "classify", message=f"{len(train_ex):,} training / {len(val_ex):,} validation texts, "
           f"{len(labels)} classes: {', '.join(labels[:10])}{' ...' if len(labels) > 10 else ''}")
    x_train = encode_for_model(tok, [t for t, _ in train_ex], max_len, encoder=is_encoder)
    x_val = encode_for_model(tok, [t for t, _ in val_ex], max_len, encoder=is_encoder)
    y_train, y_val = [index[lb] for _, lb in train_ex], [index[lb] for _, lb in val_ex]
    pad_id = tok.pad_id if tok.pad_id is not None else 0

    device = resolve_device(train.device)
    torch.manual_seed(train.seed)
    model = SequenceClassifier(backbone, len(labels), pooling, dropout).to(device)  # type: ignore[arg-type]
    lora_run = None
    if lora is not None:
        lora = lora.with_tokens(tok)
        modules = apply_lora(backbone, lora)
        lora_run = lora_section(lora, modules, base, fingerprint, read_run_config(base))
    batches = ClassBatches(x_train, y_train, batch_size, pad_id, seed=train.seed)
    steps_per_epoch = max(1, batches.steps_per_epoch // train.grad_accum)  # a step reads grad_accum batches
    max_steps = max(1, math.ceil(epochs * steps_per_epoch))
    eval_every = max(1, steps_per_epoch // evals_per_epoch)
    train = TrainConfig(**{**config_to_dict(train), "max_steps": max_steps, "eval_every": eval_every,
                           "ckpt_every": 0, "log_every": min(train.log_every, eval_every)})
    optim = OptimConfig(name="adamw", lr=lr, min_lr=0.0, warmup_steps=round(warmup_frac * max_steps),
                        schedule="linear", weight_decay=weight_decay, betas=(0.9, 0.999))

    out.mkdir(parents=True, exist_ok=True)
    world.barrier()  # every process has checked --out before process 0 writes into it
    task = {"kind": "classify", "labels": labels, "pooling": pooling, "dropout": dropout, "max_len": max_len,
            "text_field": text_field, "label_field": label_field, "base": str(base.resolve()),
            "data": str(Path(data).resolve()), "n_train": len(train_ex), "n_val": len(val_ex)}
    run_config = {"zenlm_version": __version__, "model": backbone.config.to_dict(), "task": task,
                  "train": config_to_dict(train), "optim": config_to_dict(optim), "objective": "classify"}
    if world.is_main:
        copy_tokenizer_files(base, out)
        if lora_run is not None:
            run_config["lora"] = lora_run
        write_run_config(out, run_config)

    def get_batch(step: int, micro: int) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in batches.get(step * train.grad_accum + micro))

    def loss_fn(m: nn.Module, batch: tuple[torch.Tensor, ...]) -> LossOutput:
        """Cross-entropy summed over the examples (the targets); input tokens: the real (unpadded) ones."""
        ids, mask, y = batch
        return LossOutput(F.cross_entropy(m(ids, mask), y, reduction="sum"), y.numel(), int(mask.sum()))

    def evaluate(m: nn.Module) -> dict[str, float]:
        return evaluate_classifier(m, x_val, y_val, labels, pad_id, 2 * batch_size, device)[0]

    n_params = sum(p.numel() for p in model.parameters())
    report(progress, "train", message=f"{type(backbone).__name__} backbone, {n_params / 1e6:.1f}M parameters, "
           f"pooling {pooling}; {max_steps} steps ({epochs:g} epochs of {steps_per_epoch})")
    if lora is not None:
        report(progress, "train", message=describe_lora(model) + " (LoRA adapters and the head)")
    result = fit(model, get_batch, loss_fn, out, train, optim, evaluate=evaluate, best_metric="val_f1",
                 patience=patience or None, progress=progress)
    report_dict = None
    if world.is_main:  # the kept (best) weights, on a model rebuilt from the run: the trained one may be sharded
        kept = build_model_from_run(out)[0].to(device)
        load_model_weights(kept, out / "model.safetensors")
        kept.eval()
        _, rep = evaluate_classifier(kept, x_val, y_val, labels, pad_id, 2 * batch_size, device)
        write_report(rep, out / "report.json", out / "plots" / "confusion.png",
                     extra={"best_step": result.best_step, "stopped_by": result.stopped_by})
        from zenlm.viz import plot_loss_curve

        plot_loss_curve(out / "metrics.jsonl", out / "plots" / "loss.png", per="example")
        report_dict = rep.to_dict()
        if lora_run is not None:
            finish_lora_run(out, lora_run)
    rep = ClassificationReport(**world.share(report_dict))
    return ClassifyResult(run_dir=out, train=result, report=rep, labels=labels)


def write_report(rep: ClassificationReport, json_path: Path, png_path: Path,
                 extra: dict[str, Any] | None = None) -> None:
    """The report as JSON (``rep.to_dict()`` plus ``extra``) and its confusion matrix as a PNG."""
    from zenlm.viz import plot_confusion_matrix

    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps({**rep.to_dict(), **(extra or {})}, indent=2, ensure_ascii=False) + "\n")
    plot_confusion_matrix(rep.confusion, rep.labels, png_path)


__all__ = ["ClassifyResult", "evaluate_classifier", "finetune_classify", "load_backbone", "predict_logits",
           "write_report"]
