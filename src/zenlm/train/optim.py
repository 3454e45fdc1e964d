"""Optimisers and learning-rate schedules.

Two recipes are supported:

* ``adamw``: one AdamW over every parameter; weight decay on matrices (ndim >= 2), none on gains and biases.
* ``muon``:  Muon (momentum + Newton–Schulz orthogonalisation, ``torch.optim.Muon``) for the hidden
  matrices of the network, AdamW for everything else (embeddings, output heads, adapters, norms, biases).
  Muon's update for a matrix W is ``W -= lr * orth(momentum)`` where ``orth`` approximately maps the
  momentum matrix ``U S V^T`` to ``U V^T``.

Which parameter is which is read from the model's structure (:func:`roles_of`), not from its names:

    role         what it is                                  how it is found            with "muon"
    "embedding"  a lookup table (tokens, positions)          every nn.Embedding weight  AdamW, weight decay
    "gain"       a vector: norm gain, bias                   ndim < 2                   AdamW, no decay
    "hidden"     a matrix inside the network                 every other matrix         Muon
    "head"       a matrix that reads the network's output    declared by the model      AdamW, weight decay
                 (LM head, pooler, classifier)
    "adapter"    a small added matrix (LoRA's A and B)       declared by its module     AdamW, weight decay

A module declares the exceptions to the default rules in a class attribute ``param_roles``: a dict from
the name of one of its own children (or parameters) to a role, applied to every parameter under it, e.g.
``GPT.param_roles = {"lm_head": "head"}``. Declarations of inner modules win over outer ones, and they are
found through any wrapper that keeps the model as a submodule (DDP's ``.module``, FSDP2, a LoRA layer
around a Linear). Frozen parameters (``requires_grad=False``) get no role and no optimiser. Weight decay
applies to parameters with ndim >= 2 only, whatever their role (a head's bias gets none).

The schedule is a pure function of training progress so a resumed run sees the same learning rates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from zenlm.config import check_dataclass
from zenlm.errors import ConfigError

log = logging.getLogger(__name__)

ROLES = ("hidden", "embedding", "head", "adapter", "gain")


@dataclass
class OptimConfig:
    """Optimiser hyper-parameters.

    name:          "adamw" or "muon" (Muon for hidden matrices + AdamW for the rest)
    lr:            peak learning rate of AdamW parameters
    min_lr:        learning rate at the end of the schedule (as an absolute value for AdamW params;
                   Muon params follow the same relative curve)
    warmup_steps:  linear warm-up from 0 to the peak (with a time budget: at most the same share of the time,
                   see :func:`lr_factor`)
    schedule:      "cosine" (warm-up then cosine decay to min_lr), "linear" (linear decay), "constant",
                   or "wsd" (warm-up, stable, then linear decay over the last ``cooldown_frac``)
    cooldown_frac: fraction of training spent decaying, for "wsd"
    weight_decay:  decoupled weight decay on matrices (AdamW: also embeddings)
    betas:         AdamW (beta1, beta2)
    eps:           AdamW epsilon
    muon_lr:       peak learning rate of the Muon parameters
    muon_momentum: Muon momentum
    grad_clip:     clip the global gradient norm to this value (0 disables)
    fused:         use the fused AdamW kernel (``None`` = automatically where supported)
    """

    name: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"
    cooldown_frac: float = 0.4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    grad_clip: float = 1.0
    fused: bool | None = None

    def __post_init__(self) -> None:
        check_dataclass(self)  # types first: nan, "1e-3" (YAML text) or a list where a number belongs
        if self.name not in ("adamw", "muon"):
            raise ConfigError(f"optimizer {self.name!r} is not supported; choose 'adamw' or 'muon'.")
        if self.schedule not in ("cosine", "linear", "constant", "wsd"):
            raise ConfigError(
                f"schedule {self.schedule!r} is not supported; choose cosine, linear, constant or wsd."
            )
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}.")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
        if not 0.0 < self.cooldown_frac <= 1.0:
            raise ConfigError(f"cooldown_frac must be in (0, 1], got {self.cooldown_frac}.")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not (self.muon_lr > 0 and self.eps > 0):
            raise ConfigError(f"muon_lr and eps must be > 0, got muon_lr={self.muon_lr}, eps={self.eps}.")
        if not all(0.0 <= b < 1.0 for b in (*self.betas, self.muon_momentum)):
            raise ConfigError(f"betas and muon_momentum must be in [0, 1), got betas={self.betas}, "
                              f"muon_momentum={self.muon_momentum}.")


MIN_WARMUP_SHARE = 0.1  # under a time budget warm-up may take a tenth of the time (see warmup_share)


def warmup_share(warmup_steps: int, decay_steps: int) -> float:
    """The largest share of a time budget that warm-up may take: its share of the step budget, warmup_steps /
    decay_steps, but at least a tenth (a run whose step budget is only a nominal upper bound, 1,000,000 steps
    under a five-minute budget, would otherwise get no warm-up at all)."""
    return max(warmup_steps / decay_steps, MIN_WARMUP_SHARE)


def lr_factor(cfg: OptimConfig, step: int, progress: float, warmup_fraction: float | None = None) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) and training ``progress`` in [0, 1].

    Warm-up and decay count the same budget::

        warm-up:  factor = max((step + 1) / warmup_steps, progress / warmup_fraction)
                  for the first warmup_steps steps, and while progress < warmup_fraction
        decay:    factor = schedule(progress)                          (cosine, linear, wsd: down to min_lr)

    ``progress`` is how much of the budget is used: steps, or seconds under a time budget (zenlm.train.clock),
    whichever runs out first. ``warmup_fraction`` (None: steps only) caps warm-up at that share of the budget:
    under a step budget warm-up is simply the first warmup_steps steps; under a time budget
    (:func:`warmup_share`) it also ends when its share of the time is used, however slow the steps are. Without
    that cap, 100 warm-up steps of 0.9 s each would use up a 90-second budget, and the decay, counted in seconds,
    would then drop the rate from its peak to the floor within the last few steps.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        by_share = progress / warmup_fraction if warmup_fraction else 0.0
        if by_share < 1.0:  # (under a step budget by_share = step / warmup_steps: always < 1 here)
            return max((step + 1) / cfg.warmup_steps, by_share)
    floor = cfg.min_lr / cfg.lr
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "linear":
        return floor + (1.0 - floor) * (1.0 - p)
    if cfg.schedule == "wsd":
        start = 1.0 - cfg.cooldown_frac
        if p <= start:
            return 1.0
        return floor + (1.0 - floor) * (1.0 - (p - start) / cfg.cooldown_frac)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


class RoledParam(NamedTuple):
    """A trainable parameter, its name in the model, and its role (one of :data:`ROLES`)."""

    name: str
    param: nn.Parameter
    role: str


def roles_of(model: nn.Module) -> list[RoledParam]:
    """Every trainable parameter of ``model`` with its role, in ``model.named_parameters()`` order.

    Roles come from the module types and the ``param_roles`` declarations (see the module docstring); a
    parameter shared by two modules (a tied head) is listed once, under the name PyTorch gives it first.
    """
    declared: dict[int, str] = {}
    for module in model.modules():  # parents before children: an inner declaration overrides an outer one
        if isinstance(module, nn.Embedding):
            declared[id(module.weight)] = "embedding"
        for attr, role in getattr(module, "param_roles", {}).items():
            assert role in ROLES, f"{type(module).__name__}.param_roles: unknown role {role!r} for {attr!r}"
            assert hasattr(module, attr), f"{type(module).__name__}.param_roles names {attr!r}, which it lacks"
            target = getattr(module, attr)
            if target is None:  # an optional part this instance does not have (e.g. the head of a tied model)
                continue
            for p in [target] if isinstance(target, nn.Parameter) else target.parameters():
                declared[id(p)] = role
    return [RoledParam(name, p, declared.get(id(p), "gain" if p.ndim < 2 else "hidden"))
            for name, p in model.named_parameters() if p.requires_grad]


def _is_muon_matrix(rp: RoledParam) -> bool:
    return rp.role == "hidden" and rp.param.ndim == 2  # Muon orthogonalises matrices; other shapes use AdamW


def build_optimizers(model: nn.Module, cfg: OptimConfig, device_type: str) -> list[torch.optim.Optimizer]:
    """Create the optimiser(s) for ``model``: ``[AdamW]`` for "adamw"; ``[AdamW, Muon]`` for "muon" (just
    ``[AdamW]`` when the model has no trainable hidden matrix, e.g. LoRA adapters on frozen weights).

    AdamW's groups: matrices with weight decay, then vectors without. Each param group remembers its peak
    lr in ``initial_lr``.
    """
    params = roles_of(model)
    fused = cfg.fused if cfg.fused is not None else device_type in ("cuda", "cpu")
    if cfg.name == "adamw":
        decay = [rp.param for rp in params if rp.param.ndim >= 2]
        no_decay = [rp.param for rp in params if rp.param.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
        opts: list[torch.optim.Optimizer] = [opt]
    else:
        hidden = [rp.param for rp in params if _is_muon_matrix(rp)]
        matrices = [rp.param for rp in params if not _is_muon_matrix(rp) and rp.param.ndim >= 2]
        gains = [rp.param for rp in params if rp.param.ndim < 2]
        adam = torch.optim.AdamW(
            [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": gains, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            fused=fused,
        )
        opts = [adam]
        if hidden:
            opts.append(torch.optim.Muon(
                hidden,
                lr=cfg.muon_lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum,
            ))
        else:
            log.warning("optimizer muon: %s has no trainable hidden matrix; AdamW trains every parameter",
                        type(model).__name__)
    for opt in opts:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return opts


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> float:
    """Scale every group's learning rate to ``initial_lr * factor``; return the first group's lr."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
    return optimizers[0].param_groups[0]["lr"]
