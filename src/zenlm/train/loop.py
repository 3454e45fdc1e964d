"""The one training loop. Pretraining and every fine-tuning recipe call :func:`fit`.

A recipe supplies three things:

* ``model``          an ``nn.Module``
* ``get_batch``      ``(step, micro) -> batch``; a pure function of its arguments, so the data position
                     of a resumed run is simply its step number
* ``loss_fn``        ``(model, batch) -> (loss, n_tokens)``: the objective, a scalar mean loss
* ``evaluate``       optional ``(model) -> {"val_loss": ..., ...}``: run under ``torch.no_grad``

One optimiser step is::

    for micro in range(grad_accum):            # gradient accumulation
        loss = loss_fn(model, get_batch(step, micro)) / grad_accum
        loss.backward()
    check loss is finite                       # before the weights are touched
    clip_grad_norm_(params, grad_clip)
    lr = peak_lr * lr_factor(step, progress)
    optimizer.step(); optimizer.zero_grad()

Everything else here is bookkeeping: timing, logging to ``metrics.jsonl`` and TensorBoard, periodic
evaluation and checkpoints, exact resume, and a clean stop on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from torch import nn

from zenlm.device import HardwareChoices, autocast, hardware_choices, resolve_device, synchronize
from zenlm.errors import ConfigError, TrainingError
from zenlm.progress import ProgressFn, report
from zenlm.train.checkpoint import (
    atomic_write_text,
    load_latest_checkpoint,
    save_checkpoint,
    save_model,
)
from zenlm.train.optim import OptimConfig, build_optimizers, lr_factor, set_lr

log = logging.getLogger(__name__)

Batch = Any
LossFn = Callable[[nn.Module, Batch], "tuple[torch.Tensor, int]"]


@dataclass
class TrainConfig:
    """Settings of the loop itself (the optimiser has its own :class:`OptimConfig`).

    max_steps:      optimiser steps to run in all (a resumed run continues up to this number)
    max_seconds:    stop after this much wall time in this invocation (None = no limit); the learning-rate
                    schedule then decays over whichever budget runs out first
    decay_steps:    steps over which the schedule decays (None = max_steps)
    grad_accum:     micro-batches per optimiser step
    eval_every:     evaluate every N steps (0 = only at the end)
    log_every:      write a metrics line every N steps
    ckpt_every:     save a checkpoint every N steps (0 = only at the end / on interrupt)
    keep_checkpoints: how many checkpoints to keep on disk
    seed:           seeds weight init, dropout and the data order
    device:         auto | cpu | cuda | cuda:N | mps
    precision:      auto | fp32 | bf16 | fp16 (autocast for the forward pass; weights stay fp32)
    compile:        run the model through ``torch.compile``
    threads:        CPU threads for PyTorch (None = PyTorch's default)
    tensorboard:    also write TensorBoard event files under RUN_DIR/tb
    """

    max_steps: int = 1000
    max_seconds: float | None = None
    decay_steps: int | None = None
    grad_accum: int = 1
    eval_every: int = 250
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    threads: int | None = None
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}.")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"max_seconds must be > 0, got {self.max_seconds}.")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum must be >= 1, got {self.grad_accum}.")
        for name in ("eval_every", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.log_every < 1:
            raise ConfigError(f"log_every must be >= 1, got {self.log_every}.")


@dataclass
class TrainResult:
    """What :func:`fit` did."""

    step: int
    elapsed_s: float
    tokens: int
    stopped_by: str  # "max_steps" | "max_seconds" | "signal" | "early_stop"
    train_loss: float | None
    val: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    train_s: float = 0.0  # elapsed_s minus the time spent in evaluation
    best_step: int | None = None  # with ``best_metric``: the step whose weights were kept


class _StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class _MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (and TensorBoard, when enabled)."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            keep = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.fh = self.path.open("a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # pragma: no cover - tensorboard is a declared dependency
                log.warning("tensorboard is not installed; writing metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def _best_step_of(path: Path) -> int | None:
    """The step recorded in a best-weights file's metadata (None: no such file or no such record)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            step = (f.metadata() or {}).get("best_step")
    except (SafetensorError, OSError):
        return None
    return int(step) if step is not None and step.isdigit() else None


def _record_resolved(run_dir: Path, choices: HardwareChoices) -> None:
    """Save what this invocation resolved from the hardware under ``resolved:`` in the run's config.yaml (when
    the recipe wrote one), so the run can be reproduced and a slow one explained."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return  # not ours to repair here; loading the run reports it
    if not isinstance(saved, dict):
        return
    saved["resolved"] = choices.to_dict()
    atomic_write_text(path, yaml.safe_dump(saved, sort_keys=False, allow_unicode=True))


def fit(
    model: nn.Module,
    get_batch: Callable[[int, int], Batch],
    loss_fn: LossFn,
    run_dir: Path,
    cfg: TrainConfig,
    optim: OptimConfig,
    *,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    resume: bool = False,
    trainer_extra: dict[str, Any] | None = None,
    best_metric: str | None = None,
    patience: int | None = None,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train ``model`` in place and write weights, checkpoints and metrics into ``run_dir``.

    The model must already be on the device given by ``cfg.device`` (use :func:`zenlm.device.resolve_device`).
    With ``resume=True`` the newest checkpoint in ``run_dir/checkpoints`` is restored first (weights,
    optimiser, RNG, step, elapsed time), so the run continues exactly where it stopped.

    best_metric: a key of ``evaluate``'s result where higher is better (e.g. "val_f1"): the weights of the
                 best evaluation are kept in ``run_dir/best.safetensors`` and become ``model.safetensors``
                 at the end (``result.val`` is then that evaluation's).
    patience:    with ``best_metric``, stop early after this many evaluations in a row without improvement.
    """
    run_dir = Path(run_dir)
    device = next(model.parameters()).device
    want = resolve_device(cfg.device)
    if device.type != want.type or (want.index is not None and device.index != want.index):
        raise ConfigError(f"model is on {device} but the config asks for {cfg.device}; move it first.")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    choices = hardware_choices(device, cfg.precision)  # "auto" -> what this hardware runs fastest
    precision = choices.precision
    report(progress, "train", message=choices.line())
    _record_resolved(run_dir, choices)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    optimizers = build_optimizers(model, optim, device.type)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    step, elapsed_before, train_before = 0, 0.0, 0.0
    resume_step: int | None = None
    resumed_best: dict[str, Any] | None = None
    if resume:
        ckpt, state = load_latest_checkpoint(run_dir / "checkpoints", model, optimizers,
                                             warn=lambda m: report(progress, "train", message=m))
        step, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
        train_before = float(state.get("train_s", elapsed_before))
        resume_step = step
        resumed_best = state.get("best")
        report(progress, "train", message=f"resumed from {ckpt.name} (step {step})")

    forward = torch.compile(model) if cfg.compile else model  # used for evaluation
    # For training, compile the model *and* the objective as one graph: the compiler then fuses the
    # output head, the float32 upcast and the cross-entropy instead of materialising fp32 logits.
    train_loss_fn = torch.compile(functools.partial(loss_fn, model)) if cfg.compile else functools.partial(
        loss_fn, model)
    params = [p for p in model.parameters() if p.requires_grad]
    metrics = _MetricsLog(run_dir, resume_step, cfg.tensorboard)
    decay_steps = cfg.decay_steps or cfg.max_steps
    extra = dict(trainer_extra or {})

    def checkpoint(at_step: int, elapsed: float) -> None:
        train_s = train_before + elapsed - elapsed_before - eval_s[0]
        # with best_metric, the best evaluation so far (its weights are run_dir/best.safetensors) goes along
        state = {"elapsed_s": elapsed, "train_s": train_s, **extra}
        if best_metric is not None and best["step"] is not None:
            state["best"] = {**best, "metric": best_metric}
        save_checkpoint(run_dir / "checkpoints", at_step, model, optimizers, state,
                        keep=cfg.keep_checkpoints or None)

    eval_s = [0.0]  # time spent evaluating in this invocation (excluded from train_s)
    best: dict[str, Any] = {"value": None, "step": None, "val": {}, "bad": 0}
    if resumed_best and best_metric is not None and resumed_best.get("metric") == best_metric:
        # a resumed run keeps its best-so-far: its weights are best.safetensors, or model.safetensors when the
        # previous invocation ended normally (it moved them there); the file's metadata names their step
        for name in ("best.safetensors", "model.safetensors"):
            if _best_step_of(run_dir / name) == resumed_best["step"]:
                if name != "best.safetensors":
                    shutil.copyfile(run_dir / name, run_dir / "best.safetensors")
                best.update({k: resumed_best[k] for k in ("value", "step", "val", "bad")})
                break

    def track_best(at_step: int, result: dict[str, float]) -> bool:
        """Remember the best evaluation (saving its weights); True when patience has run out."""
        if best_metric is None:
            return False
        if best_metric not in result:
            raise ConfigError(f"best_metric {best_metric!r} is not among the evaluation's results {sorted(result)}.")
        if best["value"] is None or result[best_metric] > best["value"]:
            best.update(value=result[best_metric], step=at_step, val=dict(result), bad=0)
            save_model(model, run_dir / "best.safetensors", metadata={"format": "pt", "best_step": str(at_step)})
            return False
        best["bad"] += 1
        return bool(patience) and best["bad"] >= patience

    def run_eval() -> dict[str, float]:
        if evaluate is None:
            return {}
        synchronize(device)
        t_eval = time.perf_counter()
        model.eval()
        with torch.no_grad(), autocast(device, precision):
            out = evaluate(forward)
        model.train()
        synchronize(device)
        eval_s[0] += time.perf_counter() - t_eval
        return out

    t0 = time.perf_counter()
    last_log_t, last_log_tokens, tokens = t0, 0, 0
    train_loss: float | None = None
    val: dict[str, float] = {}
    stopped_by = "max_steps"
    tokens_per_s = 0.0
    model.train()
    with _StopFlag() as stop:
        try:
            while step < cfg.max_steps:
                if cfg.max_seconds is not None and time.perf_counter() - t0 >= cfg.max_seconds:
                    stopped_by = "max_seconds"
                    break
                if stop.signum is not None:
                    stopped_by = "signal"
                    break
                # ---- one optimiser step -------------------------------------------------------------
                progress_frac = step / decay_steps
                if cfg.max_seconds is not None:
                    progress_frac = max(progress_frac, (time.perf_counter() - t0) / cfg.max_seconds)
                lr = set_lr(optimizers, lr_factor(optim, step, progress_frac))
                loss_sum = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    batch = get_batch(step, micro)
                    with autocast(device, precision):
                        loss, n_tok = train_loss_fn(batch)
                    tokens += n_tok
                    loss = loss / cfg.grad_accum
                    if scaler is not None:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                    loss_sum += loss.detach()
                train_loss = float(loss_sum)  # one sync per step: needed to refuse a non-finite loss
                if not math.isfinite(train_loss):
                    raise TrainingError(
                        f"the training loss became {train_loss} at step {step + 1}; the weights were not "
                        "updated. Lower the learning rate (--lr), enable gradient clipping (--grad-clip) or "
                        "use --precision fp32 / bf16, then resume from the last checkpoint with --resume."
                    )
                if scaler is not None:
                    for opt in optimizers:
                        scaler.unscale_(opt)
                if optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
                for opt in optimizers:
                    if scaler is not None:
                        scaler.step(opt)
                    else:
                        opt.step()
                if scaler is not None:
                    scaler.update()
                for opt in optimizers:
                    opt.zero_grad(set_to_none=True)
                step += 1
                # ---- bookkeeping ----------------------------------------------------------------------
                is_last = step == cfg.max_steps
                do_eval = evaluate is not None and (
                    is_last or (cfg.eval_every and step % cfg.eval_every == 0)
                )
                if step % cfg.log_every == 0 or do_eval or is_last:
                    synchronize(device)
                    now = time.perf_counter()
                    tokens_per_s = (tokens - last_log_tokens) / max(now - last_log_t, 1e-9)
                    elapsed = elapsed_before + now - t0
                    record: dict[str, Any] = {
                        "step": step, "elapsed_s": round(elapsed, 3), "lr": lr,
                        "train_loss": train_loss, "tokens_per_s": round(tokens_per_s, 1), "tokens": tokens,
                    }
                    record["train_s"] = round(train_before + now - t0 - eval_s[0], 3)
                    early = False
                    if do_eval:
                        val = run_eval()
                        record.update(val)
                        early = track_best(step, val)
                    metrics.write(record)
                    info = {"step": step, "loss": train_loss, "tok/s": tokens_per_s, "lr": lr, **val}
                    frac = step / cfg.max_steps
                    if cfg.max_seconds is not None:
                        frac = max(frac, (time.perf_counter() - t0) / cfg.max_seconds)
                    # progress in percent of whichever budget (steps or seconds) runs out first
                    report(progress, "train", done=round(100 * min(frac, 1.0), 2), total=100, unit="%",
                           info=info)
                    last_log_t, last_log_tokens = time.perf_counter(), tokens
                    if early:
                        stopped_by = "early_stop"
                        report(progress, "train", message=f"early stop at step {step}: {best_metric} has not "
                               f"improved for {patience} evaluations (best {best['value']:.4f} at step "
                               f"{best['step']})")
                        break
                if cfg.ckpt_every and step % cfg.ckpt_every == 0 and not is_last:
                    checkpoint(step, elapsed_before + time.perf_counter() - t0)
        except BaseException:
            metrics.close()
            raise

        # ---- the end: final evaluation, checkpoint and weights ------------------------------------------
        # On a signal the checkpoint comes first and nothing else: a service manager's grace period (10-30 s)
        # is shorter than a validation pass can be.
        if evaluate is not None and stopped_by not in ("signal", "early_stop") and \
                (stopped_by != "max_steps" or not val) and step > (resume_step or 0):
            val = run_eval()
            metrics.write({"step": step, "elapsed_s": round(elapsed_before + time.perf_counter() - t0, 3),
                           **val})
            track_best(step, val)
        elapsed = elapsed_before + time.perf_counter() - t0
        checkpoint(step, elapsed)
        if best["step"] is not None:  # the best evaluation's weights are the result
            os.replace(run_dir / "best.safetensors", run_dir / "model.safetensors")
            val = best["val"]
            metrics.write({"step": step, "best_step": best["step"], **{f"best_{k}": v for k, v in val.items()}})
        else:
            save_model(model, run_dir / "model.safetensors")
        metrics.close()
    if stopped_by == "signal":
        report(progress, "train", message=f"stopped by signal at step {step}; checkpoint saved, "
               "continue with --resume")
    return TrainResult(step=step, elapsed_s=elapsed, tokens=tokens, stopped_by=stopped_by,
                       train_loss=train_loss, val=val, tokens_per_s=tokens_per_s,
                       train_s=train_before + elapsed - elapsed_before - eval_s[0], best_step=best["step"])


def config_to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict (tuples become lists) for config.yaml."""
    d = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
