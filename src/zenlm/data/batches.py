"""Batches for causal language modelling: token shards -> (inputs, targets) tensors.

Training batches are random windows: row ``b`` of step ``s`` is the window of ``seq_len + 1`` ids that starts
at a position drawn from a generator seeded with ``(seed, s, micro)``::

    x[b] = ids[start_b     : start_b + T]         # what the model sees
    y[b] = ids[start_b + 1 : start_b + T + 1]     # what it must predict: the next id at every position

A batch is a pure function of (seed, step, micro-batch), so a resumed run draws exactly the batches an
uninterrupted run would, with no data-loader state to save. Windows may cross document (EOS) and shard
boundaries; over many steps every position of the split is equally likely to be covered.

Evaluation batches are the split read sequentially in non-overlapping windows, the same every time.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from zenlm.data.shards import TokenShards
from zenlm.errors import ConfigError, DataError


class CausalBatches:
    """Random next-token-prediction windows from one split.

    batch_size: rows per (micro-)batch B;  seq_len: tokens per row T;  seed: selects the sequence of windows.
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, seed: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {seq_len}.")
        if len(shards) < seq_len + 1:
            raise DataError(f"the {shards.split} split has {len(shards)} tokens, too small for seq_len {seq_len} "
                            f"(a window needs seq_len + 1); use a shorter --seq-len or more text.")
        self.shards, self.batch_size, self.seq_len, self.seed = shards, batch_size, seq_len, seed

    def starts(self, step: int, micro: int = 0) -> np.ndarray:
        """Start positions [B] of the windows of (step, micro), each in 0 .. len - seq_len - 1."""
        rng = np.random.Generator(np.random.PCG64([self.seed & 0xFFFFFFFF, step, micro]))
        return rng.integers(0, len(self.shards) - self.seq_len, size=self.batch_size)

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_BT, y_BT) int64 tensors for optimiser step ``step`` and micro-batch ``micro``."""
        T = self.seq_len
        rows = np.stack([self.shards.window(int(s), T + 1) for s in self.starts(step, micro)])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def eval_batches(
    shards: TokenShards, batch_size: int, seq_len: int, max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential, non-overlapping windows of ``split`` as (x_BT, y_BT) batches (the last may be smaller).

    max_tokens: score only the first ``max_tokens`` predicted tokens (rounded down to whole windows, at least
    one window); None scores the whole split.
    """
    n_windows = (len(shards) - 1) // seq_len if seq_len > 0 else 0
    if n_windows == 0:
        raise DataError(f"the validation split ({len(shards)} tokens) is too small for seq_len {seq_len}; "
                        "give more validation text or a shorter sequence length.")
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    return _eval_windows(shards, batch_size, seq_len, n_windows)


def _eval_windows(shards: TokenShards, batch_size: int, seq_len: int, n_windows: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for first in range(0, n_windows, batch_size):
        n = min(batch_size, n_windows - first)
        ids = torch.from_numpy(shards.window(first * seq_len, n * seq_len + 1))
        yield ids[:-1].view(n, seq_len), ids[1:].view(n, seq_len)


__all__ = ["CausalBatches", "eval_batches"]
