"""The small family of errors zenlm raises for user mistakes.

Every error is a ``ValueError`` subclass (so ``except ValueError`` keeps working) whose message says what
went wrong *and* what to do about it. ``assert`` is reserved for internal invariants.
"""

from __future__ import annotations


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
