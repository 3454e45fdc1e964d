"""One optimiser step: gradient accumulation normalised by target count, a finite-loss check, clipping.

A training objective returns, for one micro-batch, the SUM of its per-target losses and how many targets
and input tokens it saw (:class:`LossOutput`). A step over k micro-batches divides every sum by the number
of targets N of the *whole step*, counted from the batches before any backward pass::

    N = sum_i count_targets(batch_i)                     # targets of all k micro-batches of the step
    for i in 1..k:
        (loss_sum_i / N).backward()                      # gradients add up to d/dW (sum of all losses / N)
    loss = sum_i loss_sum_i / N                          # the step's mean loss per target
    refuse a non-finite loss                             # before the weights are touched
    clip_grad_norm_(params, grad_clip)
    optimizer.step(); optimizer.zero_grad()

so k micro-batches give the gradient of one batch made of the same rows, whatever the number of targets in
each. (Averaging the k per-batch means instead would weigh a target in a micro-batch with few targets -- a
short answer in chat fine-tuning, a row with few masked tokens in MLM -- more than one in a full batch.)

The divisor comes from one function, ``denominator(N)`` of the step's target count. A run on several processes
(:mod:`zenlm.train.distributed`) shares the micro-batches of a step between them through a :class:`StepSync`:
N is then the count summed over the processes, and since DDP and FSDP2 *average* the gradients of W processes,
each process divides by ``denominator(N) / W`` (W = ``sync.averaged_over``), so the averaged gradient is again
d(sum of all losses)/N. Every micro-batch but the last runs forward AND backward inside ``sync.grad_sync(False)``
(no gradient all-reduce until the last backward).

Dropout is seeded per micro-batch from (seed, step, micro) when ``seed`` is given: a micro-batch gets the same
dropout masks whichever process runs it and however the run was interrupted and resumed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from zenlm.data.batches import IGNORE_INDEX
from zenlm.device import autocast
from zenlm.errors import ConfigError, TrainingError

Batch = Any


class LossOutput(NamedTuple):
    """What a training objective returns for one batch.

    loss_sum:  the sum of the per-target losses, a differentiable scalar tensor (float32)
    n_targets: how many targets that sum runs over: the target tokens scored (next tokens, masked tokens,
               completion tokens) or the examples (classification)
    n_tokens:  how many input tokens the model read (tokens/s and the ``tokens`` column of metrics.jsonl)
    """

    loss_sum: Tensor
    n_targets: int
    n_tokens: int


LossFn = Callable[[nn.Module, Batch], LossOutput]
CountFn = Callable[[Batch], int]


def count_labels(batch: Batch) -> int:
    """The targets of a batch whose last tensor holds them (every zenlm objective's batches do): the entries
    that are not ``IGNORE_INDEX``. Counted from the batch alone, before the model runs."""
    labels = batch[-1]
    return int(labels.ne(IGNORE_INDEX).sum())


def local_denominator(n_targets: int) -> int:
    """What each micro-batch's loss sum is divided by in a one-process run: the step's target count (at least
    1, so a step without targets has zero loss and zero gradients instead of NaN)."""
    return max(n_targets, 1)


class StepSync(Protocol):
    """How the processes of a run share one optimiser step (:class:`LocalSync`: one process;
    :class:`zenlm.train.distributed.ParallelModel`: DDP / FSDP2)."""

    averaged_over: int  # the gradient reduction divides by this (DDP, FSDP2: the number of processes)

    def objective(self, loss_fn: LossFn) -> Callable[[Batch], LossOutput]:
        """``batch -> loss_fn(model, batch)``, run through the wrapper that synchronises gradients."""
        ...

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager[None]:
        """Context around forward and backward of a micro-batch; gradients are reduced only when ``last``."""
        ...

    def total_targets(self, n: int) -> int:
        """The targets of the whole step from this process's ``n``."""
        ...

    def reduce_step(self, loss: Tensor, n_tokens: int) -> tuple[float, int]:
        """(mean loss per target of the step, input tokens of the step) from this process's share."""
        ...


class LocalSync:
    """One process: nothing to share."""

    averaged_over = 1

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def objective(self, loss_fn: LossFn) -> Callable[[Batch], LossOutput]:
        model = self.model
        return lambda batch: loss_fn(model, batch)

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def total_targets(self, n: int) -> int:
        return n

    def reduce_step(self, loss: Tensor, n_tokens: int) -> tuple[float, int]:
        return float(loss), n_tokens  # one sync per step: needed to refuse a non-finite loss


def micro_seed(seed: int, step: int, micro: int) -> int:
    """The RNG seed (dropout) of micro-batch ``micro`` of step ``step`` (0-based) of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, step, micro]).generate_state(1, dtype=np.uint64)[0]
               & ((1 << 63) - 1))


class StepOutput(NamedTuple):
    """What one optimiser step did: its mean loss per target and what it counted."""

    loss: float
    n_targets: int
    n_tokens: int


class TrainStep:
    """Runs optimiser steps of ``model`` (see the module docstring).

    loss_fn:       ``(model, batch) -> LossOutput``
    optimizers:    from :func:`zenlm.train.optim.build_optimizers`; their learning rates are set by the caller
    precision:     a resolved precision ("fp32" | "bf16" | "fp16"); fp16 scales the loss with a GradScaler
    grad_clip:     clip the global gradient norm to this (0 disables)
    compile:       compile the model and the objective together with ``torch.compile`` (the compiler can then
                   fuse the output head, the float32 upcast and the cross-entropy)
    count_targets: ``batch -> int``, the targets a batch holds, read without running the model
    denominator:   ``n_targets of the step -> divisor`` (:func:`local_denominator`)
    sync:          how several processes share a step (None: one process, :class:`LocalSync`)
    seed:          seed dropout per micro-batch from (seed, step, micro) (None: leave the RNG alone)
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizers: list[torch.optim.Optimizer],
        *,
        precision: str = "fp32",
        grad_clip: float = 0.0,
        compile: bool = False,
        count_targets: CountFn = count_labels,
        denominator: Callable[[int], float] = local_denominator,
        sync: StepSync | None = None,
        seed: int | None = None,
    ) -> None:
        self.device = next(model.parameters()).device
        self.precision = precision
        self.optimizers = optimizers
        self.grad_clip = grad_clip
        self.count_targets = count_targets
        self.denominator = denominator
        self.sync = sync or LocalSync(model)
        self.seed = seed
        self.params = [p for p in model.parameters() if p.requires_grad]
        objective = self.sync.objective(loss_fn)
        self.objective = torch.compile(objective) if compile else objective
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def __call__(self, batches: Sequence[Batch], step_number: int, micros: Sequence[int] | None = None
                 ) -> StepOutput:
        """Accumulate the gradients of ``batches`` (this process's micro-batches of one step) and update the weights.

        step_number: 1-based, for the error message of a non-finite loss (the weights are then unchanged,
        and the gradients are left as they were: the run stops).
        micros:      the index of each batch among the step's micro-batches (default 0, 1, ...), for dropout seeds
        """
        micros = range(len(batches)) if micros is None else micros
        n_local = sum(self.count_targets(b) for b in batches)
        n_targets = self.sync.total_targets(n_local)
        divisor = self.denominator(n_targets) / self.sync.averaged_over
        loss_total = torch.zeros((), device=self.device)
        n_tokens = scored = 0
        for i, (batch, micro) in enumerate(zip(batches, micros, strict=True)):
            out, loss = self._micro_batch(batch, divisor, step_number - 1, micro, last=i == len(batches) - 1)
            loss_total += loss
            n_tokens += out.n_tokens
            scored += out.n_targets
        if scored != n_local:
            raise ConfigError(
                f"the objective scored {scored} targets at step {step_number} but count_targets counted "
                f"{n_local} in its batches; give fit a count_targets that counts what the loss function scores."
            )
        loss_value, n_tokens = self.sync.reduce_step(loss_total, n_tokens)
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"the training loss became {loss_value} at step {step_number}; the weights were not "
                "updated. Lower the learning rate (--lr), enable gradient clipping (--grad-clip) or "
                "use --precision fp32 / bf16."
            )
        self._update()
        return StepOutput(loss_value, n_targets, n_tokens)

    def _micro_batch(self, batch: Batch, divisor: float, step: int, micro: int, last: bool
                     ) -> tuple[LossOutput, Tensor]:
        """Forward and backward of one micro-batch, both inside the sync context (DDP arms its gradient
        all-reduce in the forward pass: a forward outside ``no_sync`` would all-reduce in its backward)."""
        with self.sync.grad_sync(last):
            if self.seed is not None:
                torch.manual_seed(micro_seed(self.seed, step, micro))
            with autocast(self.device, self.precision):
                out = self.objective(batch)
            loss = out.loss_sum / divisor
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return out, loss.detach()

    def _update(self) -> None:
        """Unscale (fp16), clip, step every optimiser, clear the gradients."""
        if self.scaler is not None:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        for opt in self.optimizers:
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler is not None:
            self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)


__all__ = ["Batch", "CountFn", "LocalSync", "LossFn", "LossOutput", "StepOutput", "StepSync", "TrainStep",
           "count_labels", "local_denominator", "micro_seed"]
