"""The small family of errors zenlm raises for user mistakes.

Every error is a ``ValueError`` subclass (so ``except ValueError`` keeps working) whose message says what
went wrong *and* what to do about it. ``assert`` is reserved for internal invariants.
"""

from __future__ import annotations

import errno
import os


class ZenlmError(ValueError):
    """Base class: a mistake in the user's input, files or settings."""


class ConfigError(ZenlmError):
    """A configuration value is invalid or inconsistent."""


class DataError(ZenlmError):
    """A corpus, shard or data file is missing, empty, truncated or malformed."""


class CheckpointError(ZenlmError):
    """A run directory or checkpoint is missing, incomplete or does not match the model."""


class TrainingError(RuntimeError):
    """Training cannot continue (for example a non-finite loss)."""


def write_error(path: str | os.PathLike[str], e: OSError, cls: type[ZenlmError] = ZenlmError,
                hint: str = "") -> ZenlmError:
    """The error to raise when writing ``path`` failed with ``e``: a full disk and a read-only or forbidden
    place are named as such (``no space left on device while writing FILE``), with ``hint`` appended."""
    if e.errno == errno.ENOSPC:
        msg = f"no space left on device while writing {path}; free some space"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        msg = f"cannot write {path}: {e.strerror}; choose a writable place"
    else:
        msg = f"writing {path} failed: {e.strerror or e}"
    return cls(msg + (f" ({hint})." if hint else "."))
