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

The divisor comes from one function, ``denominator(n_targets)``, so that a distributed run can plug in the
global count: under DDP, which averages the gradients of W processes, it is ``all_reduce(n_targets) / W``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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
    denominator:   ``n_targets of the step -> divisor`` (:func:`local_denominator`; distributed runs override)
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
    ) -> None:
        self.device = next(model.parameters()).device
        self.precision = precision
        self.optimizers = optimizers
        self.grad_clip = grad_clip
        self.count_targets = count_targets
        self.denominator = denominator
        self.params = [p for p in model.parameters() if p.requires_grad]
        objective = functools.partial(loss_fn, model)
        self.objective = torch.compile(objective) if compile else objective
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def __call__(self, batches: Sequence[Batch], step_number: int) -> StepOutput:
        """Accumulate the gradients of ``batches`` (the micro-batches of one step) and update the weights.

        step_number: 1-based, for the error message of a non-finite loss (the weights are then unchanged,
        and the gradients are left as they were: the run stops).
        """
        n_targets = sum(self.count_targets(b) for b in batches)
        divisor = self.denominator(n_targets)
        loss_total = torch.zeros((), device=self.device)
        n_tokens = scored = 0
        for batch in batches:
            with autocast(self.device, self.precision):
                out = self.objective(batch)
            loss = out.loss_sum / divisor
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_total += loss.detach()
            n_tokens += out.n_tokens
            scored += out.n_targets
        if scored != n_targets:
            raise ConfigError(
                f"the objective scored {scored} targets at step {step_number} but count_targets counted "
                f"{n_targets} in its batches; give fit a count_targets that counts what the loss function scores."
            )
        loss_value = float(loss_total)  # one sync per step: needed to refuse a non-finite loss
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"the training loss became {loss_value} at step {step_number}; the weights were not "
                "updated. Lower the learning rate (--lr), enable gradient clipping (--grad-clip) or "
                "use --precision fp32 / bf16."
            )
        self._update()
        return StepOutput(loss_value, n_targets, n_tokens)

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


__all__ = ["Batch", "CountFn", "LossFn", "LossOutput", "StepOutput", "TrainStep", "count_labels",
           "local_denominator"]
