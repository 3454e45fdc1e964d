"""The one training loop. Pretraining and every fine-tuning recipe call :func:`fit`.

A recipe supplies:

* ``model``          an ``nn.Module``
* ``get_batch``      ``(step, micro) -> batch``; a pure function of its arguments, so the data position
                     of a resumed run is simply its step number
* ``loss_fn``        ``(model, batch) -> LossOutput(loss_sum, n_targets, n_tokens)``: the objective, summed
                     over the batch's targets (:mod:`zenlm.train.step`)
* ``count_targets``  optional ``batch -> int``: the targets of a batch, counted without the model (default:
                     the entries of the batch's last tensor that are not -100)
* ``evaluate``       optional ``(model) -> {"val_loss": ..., ...}``: run under ``torch.no_grad``

A run is::

    restore the newest checkpoint                        if resuming: weights, optimiser, RNG, step, times
    while step < max_steps, time is left and no signal came:
        lr = peak_lr * lr_factor(step, progress)         # optim.py; progress in steps or seconds: clock.py
        batches = [get_batch(step, micro) for micro in range(grad_accum)]
        train_step(batches)                              # step.py: sum of losses / targets of the step,
        step += 1                                        #   finite check, clipping, optimiser step
        every log_every steps:  write a metrics line     # metrics.py
        every eval_every steps: evaluate, keep the best weights, maybe stop early   # best.py
        every ckpt_every steps: save a checkpoint        # checkpoint.py
    evaluate unless the last step just did; save the final checkpoint and model.safetensors

Ctrl-C or SIGTERM ends the run after the current step (with the final checkpoint); a second one stops at
once. ``fit`` changes no process-wide setting: threads and TF32 are set by the entry points
(:func:`apply_process_settings`).
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from zenlm.config import check_dataclass
from zenlm.device import HardwareChoices, autocast, hardware_choices, resolve_device, synchronize
from zenlm.errors import ConfigError, TrainingError
from zenlm.fileio import atomic_write_text
from zenlm.progress import ProgressFn, report
from zenlm.train.best import BestWeights
from zenlm.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint, save_model
from zenlm.train.clock import RunClock
from zenlm.train.metrics import MetricsLog
from zenlm.train.optim import OptimConfig, build_optimizers, lr_factor, set_lr, warmup_share
from zenlm.train.step import Batch, CountFn, LossFn, TrainStep, count_labels, local_denominator

SEED_LIMIT = 2**32  # the data order is drawn from generators seeded with 32 bits of the seed


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
    seed:           seeds weight init, dropout and the data order; 0 .. 2**32-1 (the data order reads 32 bits)
    device:         auto | cpu | cuda | cuda:N | mps
    precision:      auto | fp32 | bf16 | fp16 (autocast for the forward pass; weights stay fp32)
    compile:        run the model through ``torch.compile``
    threads:        CPU threads for PyTorch (None = PyTorch's default); set by the entry points through
                    :func:`apply_process_settings`, not by :func:`fit`
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
        if isinstance(self.seed, int) and not isinstance(self.seed, bool) and not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"seed must be a whole number in 0..2**32-1, got {self.seed}.")
        check_dataclass(self)  # types first: 2.7 steps, nan seconds or "7" as a seed are refused by name
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
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 (or left out for PyTorch's choice), got {self.threads}.")


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


class StopFlag:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def apply_process_settings(cfg: TrainConfig) -> None:
    """The process-wide settings ``cfg`` asks for: PyTorch's CPU threads (``cfg.threads``) and, when training
    on a CUDA GPU, TF32 matrix multiplies. Entry points call this (the recipes' public functions, which the CLI
    verbs call; scripts that call :func:`fit` directly); :func:`fit` itself changes no global state."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if resolve_device(cfg.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass
class _Start:
    """Where an invocation starts: step 0, or what the newest checkpoint recorded."""

    step: int = 0
    elapsed_s: float = 0.0
    train_s: float = 0.0
    best: dict[str, Any] | None = None


def _restore(run_dir: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer],
             progress: ProgressFn | None) -> tuple[_Start, str]:
    """Load the newest checkpoint of ``run_dir`` that is intact (a damaged newer one is passed over with a
    warning) into model, optimisers and RNG; return where it stopped and the checkpoint's name."""
    ckpt, state = load_latest_checkpoint(run_dir / "checkpoints", model, optimizers,
                                         warn=lambda m: report(progress, "train", message=m))
    elapsed = float(state.get("elapsed_s", 0.0))
    return _Start(int(state["step"]), elapsed, float(state.get("train_s", elapsed)), state.get("best")), ckpt.name


def _save(run_dir: Path, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer], clock: RunClock,
          at: float, extra: dict[str, Any], best: BestWeights, keep: int) -> None:
    """Write checkpoint ``step``; the run's times at clock time ``at``, the recipe's extra state and the best
    evaluation so far go along."""
    state = {"elapsed_s": clock.elapsed(at), "train_s": clock.train_s(at), **extra}
    if best.state() is not None:  # its weights are run_dir/best.safetensors
        state["best"] = best.state()
    save_checkpoint(run_dir / "checkpoints", step, model, optimizers, state, keep=keep or None)


def _evaluate(evaluate: Callable[[nn.Module], dict[str, float]], model: nn.Module, forward: nn.Module,
              precision: str, clock: RunClock) -> dict[str, float]:
    """Run ``evaluate`` in eval mode without gradients; its time counts as evaluation, not training."""
    device = next(model.parameters()).device
    synchronize(device)
    t = clock.now()
    model.eval()
    with torch.no_grad(), autocast(device, precision):
        out = evaluate(forward)
    model.train()
    synchronize(device)
    clock.add_eval_time(clock.now() - t)
    return out


def _model_device(model: nn.Module, cfg: TrainConfig) -> torch.device:
    device = next(model.parameters()).device
    want = resolve_device(cfg.device)
    if device.type != want.type or (want.index is not None and device.index != want.index):
        raise ConfigError(f"model is on {device} but the config asks for {cfg.device}; move it first.")
    return device


def _how_to_go_on(run_dir: Path) -> str:
    """After a failed step: what to run next, given the checkpoints the run has."""
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if ckpts:
        return (f"Then continue from {ckpts[-1].name} with --resume (flags given then win over the run's saved "
                "settings), or start again from scratch with --overwrite.")
    return ("No checkpoint was saved yet: run the same command again with those changes (a run that stopped "
            "before its first checkpoint is started again).")


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
    count_targets: CountFn = count_labels,
    denominator: Callable[[int], float] = local_denominator,
) -> TrainResult:
    """Train ``model`` in place and write weights, checkpoints and metrics into ``run_dir``.

    The model must already be on the device given by ``cfg.device`` (use :func:`zenlm.device.resolve_device`).
    With ``resume=True`` the newest checkpoint in ``run_dir/checkpoints`` is restored first (weights,
    optimiser, RNG, step, elapsed time), so the run continues exactly where it stopped.

    best_metric:   a key of ``evaluate``'s result where higher is better (e.g. "val_f1"): the weights of the
                   best evaluation are kept in ``run_dir/best.safetensors`` and become ``model.safetensors``
                   at the end (``result.val`` is then that evaluation's).
    patience:      with ``best_metric``, stop early after this many evaluations in a row without improvement.
    count_targets: ``batch -> int``, the targets of a batch without running the model (see
                   :mod:`zenlm.train.step`); must agree with the ``n_targets`` that ``loss_fn`` returns.
    denominator:   ``targets of the step -> what each loss sum is divided by``; a distributed run gives the
                   global count here (see :mod:`zenlm.train.step`).
    """
    run_dir = Path(run_dir)
    device = _model_device(model, cfg)
    choices = hardware_choices(device, cfg.precision)  # "auto" -> what this hardware runs fastest
    precision = choices.precision
    report(progress, "train", message=choices.line())
    _record_resolved(run_dir, choices)
    optimizers = build_optimizers(model, optim, device.type)
    start = _Start()
    if resume:
        start, name = _restore(run_dir, model, optimizers, progress)
        report(progress, "train", message=f"resumed from {name} (step {start.step})")
    train_step = TrainStep(model, loss_fn, optimizers, precision=precision, grad_clip=optim.grad_clip,
                           compile=cfg.compile, count_targets=count_targets, denominator=denominator)
    forward = torch.compile(model) if cfg.compile else model  # for evaluation
    best = BestWeights(model, run_dir, best_metric, patience, resumed=start.best)
    extra = dict(trainer_extra or {})

    clock = RunClock(cfg.max_steps, cfg.decay_steps or cfg.max_steps, cfg.max_seconds,
                     elapsed_before=start.elapsed_s, train_before=start.train_s)
    # with a time budget, warm-up ends after warmup_steps steps or its share of the time, whichever comes first
    warmup_fraction = warmup_share(optim.warmup_steps, clock.decay_steps) if cfg.max_seconds is not None else None
    if optim.warmup_steps >= cfg.max_steps > start.step:
        report(progress, "train", message=f"warning: the run ends inside its learning-rate warm-up (warmup_steps "
               f"{optim.warmup_steps} >= max_steps {cfg.max_steps}): the learning rate never reaches its peak; "
               "give fewer --warmup-steps or more --max-steps")
    step, tokens, tokens_per_s, lr = start.step, 0, 0.0, 0.0
    train_loss: float | None = None
    val: dict[str, float] = {}
    stopped_by = "max_steps"
    model.train()
    # the progress bar from the start (step 0, or where a resumed run stands), not from the first logged step
    report(progress, "train", done=round(100 * clock.done_fraction(start.step), 2), total=100, unit="%",
           info={"step": start.step})
    with StopFlag() as stop, MetricsLog(run_dir, start.step if resume else None, cfg.tensorboard) as metrics:
        while step < cfg.max_steps:
            if clock.out_of_time() or stop.signum is not None:
                stopped_by = "max_seconds" if stop.signum is None else "signal"
                break
            lr = set_lr(optimizers, lr_factor(optim, step, clock.schedule_progress(step), warmup_fraction))
            try:
                out = train_step([get_batch(step, micro) for micro in range(cfg.grad_accum)], step + 1)
            except TrainingError as e:  # say how to go on from what is on disk
                raise TrainingError(f"{e} {_how_to_go_on(run_dir)}") from None
            step, tokens, train_loss = step + 1, tokens + out.n_tokens, out.loss

            is_last = step == cfg.max_steps
            do_eval = evaluate is not None and (is_last or bool(cfg.eval_every and step % cfg.eval_every == 0))
            if step % cfg.log_every == 0 or do_eval or is_last:
                synchronize(device)
                now = clock.now()
                tokens_per_s = clock.tokens_per_s(tokens, now)
                record: dict[str, Any] = {
                    "step": step, "elapsed_s": round(clock.elapsed(now), 3), "lr": lr, "train_loss": train_loss,
                    "tokens_per_s": round(tokens_per_s, 1), "tokens": tokens, "train_s": round(clock.train_s(now), 3),
                }
                early = False
                if do_eval:
                    assert evaluate is not None
                    val = _evaluate(evaluate, model, forward, precision, clock)
                    record.update(val)
                    early = best.update(step, val)
                metrics.write(record)
                # progress in percent of whichever budget (steps or seconds) runs out first
                report(progress, "train", done=round(100 * clock.done_fraction(step), 2), total=100, unit="%",
                       info={"step": step, "loss": train_loss, "tok/s": tokens_per_s, "lr": lr, **val})
                clock.mark(tokens)
                if early:
                    stopped_by = "early_stop"
                    report(progress, "train", message=f"early stop at step {step}: {best_metric} has not improved "
                           f"for {patience} evaluations (best {best.value:.4f} at step {best.step})")
                    break
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and not is_last:
                _save(run_dir, step, model, optimizers, clock, clock.now(), extra, best, cfg.keep_checkpoints)

        # ---- the end: final evaluation, checkpoint and weights ------------------------------------------
        # On a signal the checkpoint comes first and nothing else: a service manager's grace period (10-30 s)
        # is shorter than a validation pass can be.
        if evaluate is not None and stopped_by not in ("signal", "early_stop") and \
                (stopped_by != "max_steps" or not val) and step > start.step:
            val = _evaluate(evaluate, model, forward, precision, clock)
            metrics.write({"step": step, "elapsed_s": round(clock.elapsed(), 3), **val})
            best.update(step, val)
        end = clock.now()
        _save(run_dir, step, model, optimizers, clock, end, extra, best, cfg.keep_checkpoints)
        if best.finish():  # the best evaluation's weights are the result
            val = best.val
            metrics.write({"step": step, "best_step": best.step, **{f"best_{k}": v for k, v in val.items()}})
        else:
            save_model(model, run_dir / "model.safetensors")
    if stopped_by == "signal":
        report(progress, "train", message=f"stopped by signal at step {step}; checkpoint saved, "
               "continue with --resume")
    return TrainResult(step=step, elapsed_s=clock.elapsed(end), tokens=tokens, stopped_by=stopped_by,
                       train_loss=train_loss, val=val, tokens_per_s=tokens_per_s, train_s=clock.train_s(end),
                       best_step=best.step)


def config_to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict (tuples become lists) for config.yaml."""
    d = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
