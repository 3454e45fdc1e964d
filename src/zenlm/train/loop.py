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
once. ``fit`` changes no process-wide setting: threads, TF32 and joining the processes that ``torchrun``
started are done by the entry points (:func:`apply_process_settings`).

On several processes (:mod:`zenlm.train.distributed`) process r of W takes micro-batches r, r+W, ... of each
step (``grad_accum`` counts the step's micro-batches over all processes), the model is wrapped (DDP) or sharded
(FSDP2) by ``cfg.strategy``, the processes agree every step on signals and on the clock, and only process 0
reports progress and writes files.
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
from zenlm.train.checkpoint import list_checkpoints
from zenlm.train.clock import RunClock
from zenlm.train.distributed import (
    STRATEGIES,
    LostProcess,
    ParallelModel,
    Strategy,
    World,
    check_accumulation,
    comm_errors,
    current_world,
    init_world,
    resolve_strategy,
)
from zenlm.train.metrics import MetricsLog
from zenlm.train.optim import OptimConfig, build_optimizers, lr_factor, set_lr, warmup_share
from zenlm.train.step import Batch, CountFn, LossFn, LossOutput, TrainStep, count_labels, local_denominator

SEED_LIMIT = 2**32  # the data order is drawn from generators seeded with 32 bits of the seed


@dataclass
class TrainConfig:
    """Settings of the loop itself (the optimiser has its own :class:`OptimConfig`).

    max_steps:      optimiser steps to run in all (a resumed run continues up to this number)
    max_seconds:    stop after this much wall time in this invocation (None = no limit); the learning-rate
                    schedule then decays over whichever budget runs out first
    decay_steps:    steps over which the schedule decays (None = max_steps)
    grad_accum:     micro-batches per optimiser step, counted over all processes (under torchrun a multiple of
                    their number, so that the run is the same on any number of them)
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
    strategy:       under torchrun, how the processes share the model: ddp (a copy each), fsdp (sharded by
                    FSDP2), none (one process only) or auto (none for one process, ddp for several)
    dist_timeout:   seconds a process waits for the others in one collective before it gives up (a process
                    that died is usually noticed at once; a hung one after this long)
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
    strategy: Strategy = "auto"
    dist_timeout: float = 600.0

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
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} is not supported; choose one of: {', '.join(STRATEGIES)}.")
        if self.dist_timeout <= 0:
            raise ConfigError(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}.")
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


def apply_process_settings(cfg: TrainConfig) -> World:
    """The process-wide settings ``cfg`` asks for: PyTorch's CPU threads (``cfg.threads``), TF32 matrix
    multiplies when training on a CUDA GPU, and -- when ``torchrun`` started this process -- joining the other
    processes of the run (NCCL on GPUs, gloo on CPUs; each process takes GPU LOCAL_RANK). Entry points call this
    (the recipes' public functions, which the CLI verbs call; scripts that call :func:`fit` directly);
    :func:`fit` itself changes no global state. Returns the run's processes."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    world = init_world(device, cfg.strategy, cfg.dist_timeout)
    check_accumulation(cfg.grad_accum, world)  # before a recipe writes anything
    return world


@dataclass
class _Start:
    """Where an invocation starts: step 0, or what the newest checkpoint recorded."""

    step: int = 0
    elapsed_s: float = 0.0
    train_s: float = 0.0
    best: dict[str, Any] | None = None


def _save(par: ParallelModel, run_dir: Path, step: int, optimizers: list[torch.optim.Optimizer], clock: RunClock,
          at: float, extra: dict[str, Any], best: BestWeights, keep: int) -> None:
    """Write checkpoint ``step`` (every process takes part; process 0 writes); the run's times at clock time
    ``at``, the recipe's extra state and the best evaluation so far go along."""
    state = {"elapsed_s": clock.elapsed(at), "train_s": clock.train_s(at), **extra}
    if best.state() is not None:  # its weights are run_dir/best.safetensors
        state["best"] = best.state()
    par.save_checkpoint(run_dir / "checkpoints", step, optimizers, state, keep=keep or None)


def _evaluate(evaluate: Callable[[nn.Module], dict[str, float]], par: ParallelModel, forward: nn.Module,
              precision: str, clock: RunClock) -> dict[str, float]:
    """Run ``evaluate`` in eval mode without gradients; its time counts as evaluation, not training. Every
    process evaluates (an FSDP2 model needs all of them to run it); process 0's result is everyone's."""
    model = par.model
    device = next(model.parameters()).device
    synchronize(device)
    t = clock.now()
    model.eval()
    with torch.no_grad(), autocast(device, precision):
        out = par.run(lambda _: evaluate(forward))
    model.train()
    synchronize(device)
    clock.add_eval_time(clock.now() - t)
    return par.world.share(out)


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
    denominator:   ``targets of the step -> what each loss sum is divided by``, from the step's target count
                   summed over all processes (see :mod:`zenlm.train.step`).

    On several processes (started by torchrun; see :mod:`zenlm.train.distributed`) every process calls fit with
    the same arguments; with ``cfg.strategy`` "fsdp" the model is sharded in place (its weights are then in
    ``run_dir/model.safetensors``). Only process 0 reports progress and writes files.
    """
    run_dir = Path(run_dir)
    device = _model_device(model, cfg)
    world = current_world()
    strategy = resolve_strategy(cfg.strategy, world)
    check_accumulation(cfg.grad_accum, world)
    if not world.is_main:
        progress = None  # process 0 reports for everyone
    choices = hardware_choices(device, cfg.precision)  # "auto" -> what this hardware runs fastest
    precision = choices.precision
    report(progress, "train", message=choices.line())
    if world.size > 1:
        report(progress, "train", message=f"{world.size} processes ({strategy}), each {cfg.grad_accum // world.size} "
               f"of the {cfg.grad_accum} micro-batches of every step")
    if world.is_main:
        _record_resolved(run_dir, choices)
    micros = range(world.rank, cfg.grad_accum, world.size)  # this process's micro-batches of every step

    def probe(m: nn.Module) -> LossOutput:  # which parameters the objective uses (DDP asks once)
        with autocast(device, precision):
            return loss_fn(m, get_batch(0, micros[0]))

    ckpt_root = run_dir / "checkpoints"
    with comm_errors(world, ckpt_root):  # a process that dies makes the others stop with a clear error
        par = ParallelModel(model, world, strategy, precision, probe=probe)
        optimizers = build_optimizers(model, optim, device.type)  # after sharding: FSDP2 replaces the parameters
        start = _Start()
        if resume:
            name, state = par.restore(ckpt_root, optimizers, warn=lambda m: report(progress, "train", message=m))
            elapsed = float(state.get("elapsed_s", 0.0))
            start = _Start(int(state["step"]), elapsed, float(state.get("train_s", elapsed)), state.get("best"))
            was = state.get("world_size", 1)
            report(progress, "train", message=f"resumed from {name} (step {start.step})" + (
                f", written by {was} process(es), continued by {world.size}: the same run" if was != world.size
                else ""))
        return _train(par, optimizers, get_batch, loss_fn, run_dir, cfg, optim, start, precision,
                      evaluate=evaluate, resume=resume, trainer_extra=trainer_extra, best_metric=best_metric,
                      patience=patience, progress=progress, count_targets=count_targets, denominator=denominator)


def _train(par: ParallelModel, optimizers: list[torch.optim.Optimizer], get_batch: Callable[[int, int], Batch],
           loss_fn: LossFn, run_dir: Path, cfg: TrainConfig, optim: OptimConfig, start: _Start, precision: str, *,
           evaluate: Callable[[nn.Module], dict[str, float]] | None, resume: bool,
           trainer_extra: dict[str, Any] | None, best_metric: str | None, patience: int | None,
           progress: ProgressFn | None, count_targets: CountFn, denominator: Callable[[int], float]) -> TrainResult:
    """The loop of :func:`fit`, from the step it starts at."""
    model, world = par.model, par.world
    device = next(model.parameters()).device
    train_step = TrainStep(model, loss_fn, optimizers, precision=precision, grad_clip=optim.grad_clip,
                           compile=cfg.compile, count_targets=count_targets, denominator=denominator, sync=par,
                           seed=cfg.seed)
    forward = torch.compile(model) if cfg.compile else model  # for evaluation
    best = BestWeights(model, run_dir, best_metric, patience, resumed=start.best, io=par)
    extra = dict(trainer_extra or {})
    micros = range(world.rank, cfg.grad_accum, world.size)

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
    with StopFlag() as stop, MetricsLog(run_dir, start.step if resume else None, cfg.tensorboard,
                                        write=world.is_main) as metrics:
        while step < cfg.max_steps:
            # every process stops at the same step, and sees process 0's clock (same budget, same lr)
            signalled, seconds = world.agree(stop.signum is not None, clock.seconds())
            clock.pin_seconds(seconds)
            if clock.out_of_time() or signalled:
                stopped_by = "max_seconds" if not signalled else "signal"
                break
            lr = set_lr(optimizers, lr_factor(optim, step, clock.schedule_progress(step), warmup_fraction))
            try:
                out = train_step([get_batch(step, micro) for micro in micros], step + 1, micros)
            except LostProcess:  # another process is gone: comm_errors below says where to continue from
                raise
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
                    val = _evaluate(evaluate, par, forward, precision, clock)
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
                _save(par, run_dir, step, optimizers, clock, clock.now(), extra, best, cfg.keep_checkpoints)

        # ---- the end: final evaluation, checkpoint and weights ------------------------------------------
        # On a signal the checkpoint comes first and nothing else: a service manager's grace period (10-30 s)
        # is shorter than a validation pass can be.
        if evaluate is not None and stopped_by not in ("signal", "early_stop") and \
                (stopped_by != "max_steps" or not val) and step > start.step:
            val = _evaluate(evaluate, par, forward, precision, clock)
            metrics.write({"step": step, "elapsed_s": round(clock.elapsed(), 3), **val})
            best.update(step, val)
        end = clock.now()
        _save(par, run_dir, step, optimizers, clock, end, extra, best, cfg.keep_checkpoints)
        if best.finish():  # the best evaluation's weights are the result
            val = best.val
            metrics.write({"step": step, "best_step": best.step, **{f"best_{k}": v for k, v in val.items()}})
        else:
            par.save_weights(run_dir / "model.safetensors")
    world.barrier()  # every file is written before any process returns
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
