"""Progress reporting without printing.

Library code never prints. Long-running functions accept ``progress: ProgressFn | None`` and call it with
a :class:`Progress` record; the CLI turns those records into progress bars, a notebook may ignore them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """One progress report.

    task:   short name of the work ("prepare", "train", "tokenizer", ...)
    done:   units completed so far
    total:  units expected in all (None when unknown)
    unit:   what a unit is ("B" for bytes, "step", "tok", ...)
    info:   extra values to show (loss, tokens/s, MB/s, ...)
    message: a one-off line to show (a warning, a summary); may be set with or without counts
    """

    task: str
    done: float = 0
    total: float | None = None
    unit: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    message: str | None = None


ProgressFn = Callable[[Progress], None]


def report(progress: ProgressFn | None, *args: Any, **kwargs: Any) -> None:
    """Call ``progress`` with a :class:`Progress` built from the arguments, if a callback was given."""
    if progress is not None:
        progress(Progress(*args, **kwargs))
