"""Time accounting of a training run: budgets, schedule progress, elapsed and training time, throughput.

A run may be stopped and resumed; its times continue across invocations::

    elapsed_s = elapsed before this invocation + wall time of this invocation
    train_s   = train time before this invocation + wall time of this invocation - time spent evaluating

The learning-rate schedule warms up and decays over whichever budget runs out first, steps or seconds::

    progress = max(step / decay_steps, seconds of this invocation / max_seconds)

(under a time budget warm-up ends after warmup_steps steps or its share of the time, whichever comes first:
zenlm.train.optim.lr_factor).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RunClock:
    """Clock of one invocation of a run (it starts when created).

    max_steps / decay_steps / max_seconds: the run's budgets (max_seconds None = no time limit)
    elapsed_before / train_before:        elapsed_s and train_s of earlier invocations (resume)
    now:                                  the time source (seconds), replaceable in tests
    """

    def __init__(self, max_steps: int, decay_steps: int, max_seconds: float | None, *, elapsed_before: float = 0.0,
                 train_before: float = 0.0, now: Callable[[], float] = time.perf_counter) -> None:
        self.max_steps, self.decay_steps, self.max_seconds = max_steps, decay_steps, max_seconds
        self.elapsed_before, self.train_before = elapsed_before, train_before
        self.now = now
        self.t0 = now()
        self.eval_s = 0.0  # time spent evaluating in this invocation (not training time)
        self._mark_t, self._mark_tokens = self.t0, 0
        self._pinned: float | None = None

    def seconds(self) -> float:
        """Wall time of this invocation so far."""
        return self.now() - self.t0

    def pin_seconds(self, seconds: float) -> None:
        """Use ``seconds`` as this invocation's time for the budget and the schedule until the next pin: the
        processes of a distributed run all pin process 0's time at the start of each step, so they stop at the
        same step and use the same learning rates."""
        self._pinned = seconds

    def _budget_seconds(self) -> float:
        return self.seconds() if self._pinned is None else self._pinned

    def out_of_time(self) -> bool:
        return self.max_seconds is not None and self._budget_seconds() >= self.max_seconds

    def schedule_progress(self, step: int) -> float:
        """Training progress for the learning-rate schedule at ``step`` (0 at the start, 1 at the end; may pass 1)."""
        p = step / self.decay_steps
        return max(p, self._budget_seconds() / self.max_seconds) if self.max_seconds is not None else p

    def done_fraction(self, step: int) -> float:
        """How much of the run's budget (steps or seconds, whichever runs out first) is used, in [0, 1]."""
        f = step / self.max_steps
        if self.max_seconds is not None:
            f = max(f, self._budget_seconds() / self.max_seconds)
        return min(f, 1.0)

    def elapsed(self, at: float | None = None) -> float:
        """elapsed_s of the run at time ``at`` (default: now)."""
        return self.elapsed_before + (self.now() if at is None else at) - self.t0

    def train_s(self, at: float | None = None) -> float:
        """train_s of the run at time ``at`` (default: now): elapsed time minus evaluation time."""
        return self.train_before + (self.now() if at is None else at) - self.t0 - self.eval_s

    def add_eval_time(self, seconds: float) -> None:
        self.eval_s += seconds

    def tokens_per_s(self, tokens: int, at: float) -> float:
        """Throughput since the last :meth:`mark` (or the start): tokens read per second up to ``at``."""
        return (tokens - self._mark_tokens) / max(at - self._mark_t, 1e-9)

    def mark(self, tokens: int) -> None:
        """Start the next throughput interval now, at ``tokens`` tokens read so far."""
        self._mark_t, self._mark_tokens = self.now(), tokens


__all__ = ["RunClock"]
