"""The metrics log of a run: one JSON object per line in ``RUN_DIR/metrics.jsonl`` (and TensorBoard events).

A line written during training holds ``step, elapsed_s, lr, train_loss, tokens_per_s, tokens, train_s`` and,
at evaluation steps, the evaluation's results (``val_loss``, ...). A resumed run first drops the lines after
the step it resumes from, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl``; use it as a context manager (or call :meth:`close`).

    resume_step: None for a new run (an old file is removed), else keep the lines up to this step
    tensorboard: also write every number to TensorBoard event files under ``run_dir/tb``
    write:       False: touch nothing and drop every record (the processes of a distributed run but the first)
    """

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool, *, write: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.fh = None
        self.tb = None
        if write:
            self._open(resume_step, tensorboard)

    def _open(self, resume_step: int | None, tensorboard: bool) -> None:
        if resume_step is not None and self.path.exists():
            keep = []
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                step = record.get("step") if isinstance(record, dict) else None
                if isinstance(step, int) and not isinstance(step, bool) and step <= resume_step:
                    keep.append(line)  # (a line that is not a step's record is dropped)
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.fh = self.path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.path.parent / "tb"))
            except ImportError:  # pragma: no cover - tensorboard is a declared dependency
                log.warning("tensorboard is not installed; writing metrics.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (which has a "step") as one line, flushed at once."""
        if self.fh is None:
            return
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.fh is not None and not self.fh.closed:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


__all__ = ["MetricsLog"]
