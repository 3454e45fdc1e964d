"""Keep the weights of the best evaluation, and stop early when it stops improving.

    after each evaluation:
        if result[metric] > best:   best = result[metric]; save weights -> best.safetensors; bad = 0
        else:                       bad += 1; stop when bad == patience
    at the end:                     best.safetensors -> model.safetensors (the run's result)

The best-so-far travels in every checkpoint (:meth:`BestWeights.state`), and ``best.safetensors`` names the
step of its weights in its metadata, so a resumed run still knows which weights are best and whether the
file on disk holds them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn

from zenlm.errors import ConfigError
from zenlm.train.distributed import ParallelModel, World

BEST_FILE = "best.safetensors"


def best_step_of(path: Path) -> int | None:
    """The step recorded in a best-weights file's metadata (None: no such file or no such record)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            step = (f.metadata() or {}).get("best_step")
    except (SafetensorError, OSError):
        return None
    return int(step) if step is not None and step.isdigit() else None


class BestWeights:
    """Tracks the best evaluation of ``metric`` (higher is better) for the run in ``run_dir``.

    metric:   a key of the evaluation's result, or None: track nothing (every method is then a no-op)
    patience: with a metric, :meth:`update` says stop after this many evaluations in a row without improving
    resumed:  the ``best`` record of the checkpoint a run resumes from (see :meth:`state`), if any
    io:       the run's processes and model (gathers and writes weights on process 0; decisions that depend on
              files are made by process 0 and shared); None = this process alone
    """

    def __init__(self, model: nn.Module, run_dir: Path, metric: str | None, patience: int | None = None,
                 resumed: dict[str, Any] | None = None, *, io: ParallelModel | None = None) -> None:
        self.model, self.run_dir, self.metric, self.patience = model, Path(run_dir), metric, patience
        self.io = io or ParallelModel(model, World(), "none")
        self.value: float | None = None
        self.step: int | None = None
        self.val: dict[str, float] = {}
        self.bad = 0  # evaluations since the last improvement
        if resumed and metric is not None and resumed.get("metric") == metric:
            self._restore(resumed)

    def _restore(self, resumed: dict[str, Any]) -> None:
        # the best weights are best.safetensors, or model.safetensors when the previous invocation ended
        # normally (it moved them there); the file's metadata names their step
        found = False
        if self.io.world.is_main:
            for name in (BEST_FILE, "model.safetensors"):
                if best_step_of(self.run_dir / name) == resumed["step"]:
                    if name != BEST_FILE:
                        shutil.copyfile(self.run_dir / name, self.run_dir / BEST_FILE)
                    found = True
                    break
        if self.io.world.share(found):
            self.value, self.step, self.val, self.bad = (resumed[k] for k in ("value", "step", "val", "bad"))

    def update(self, step: int, result: dict[str, float]) -> bool:
        """Record the evaluation ``result`` of ``step`` (saving the weights when best); True: patience ran out."""
        if self.metric is None:
            return False
        if self.metric not in result:
            raise ConfigError(f"best_metric {self.metric!r} is not among the evaluation's results {sorted(result)}.")
        if self.value is None or result[self.metric] > self.value:
            self.value, self.step, self.val, self.bad = result[self.metric], step, dict(result), 0
            self.io.save_weights(self.run_dir / BEST_FILE, metadata={"format": "pt", "best_step": str(step)})
            return False
        self.bad += 1
        return bool(self.patience) and self.bad >= self.patience

    def state(self) -> dict[str, Any] | None:
        """The best-so-far for a checkpoint (None when nothing is tracked yet)."""
        if self.metric is None or self.step is None:
            return None
        return {"value": self.value, "step": self.step, "val": self.val, "bad": self.bad, "metric": self.metric}

    def finish(self) -> bool:
        """Make the best weights the run's ``model.safetensors``; False when there are none (save the model's)."""
        if self.step is None:
            return False
        if self.io.world.is_main:
            os.replace(self.run_dir / BEST_FILE, self.run_dir / "model.safetensors")
        self.io.world.barrier()
        return True


__all__ = ["BEST_FILE", "BestWeights", "best_step_of"]
