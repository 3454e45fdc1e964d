"""Consecutive windows for truncated back-propagation through time (TBPTT).

A recurrent LM reads a text as one long sequence, but gradients can only flow back through a bounded number of
steps. TBPTT cuts the text into windows of T tokens, runs them in order, and carries the hidden state from the end
of one window into the start of the next (detached, so gradients stop at the window's edge while the state still
remembers what came before).

To train on B sequences at once, the split is cut into B equally long *streams*, each read front to back::

    L = (N − 1) // B                                  # tokens per stream (N ids in the split)
    stream b covers ids[b·L : (b+1)·L + 1]
    window t of stream b:  x = ids[s : s + T],  y = ids[s + 1 : s + T + 1],  s = b·L + o_e + t·T

so row b of window t continues row b of window t − 1 exactly. Each pass over the streams (an *epoch*) has
``windows_per_epoch = (L − T + 1) // T`` windows; epoch e starts its streams ``o_e`` tokens in (0 in the first
epoch, then drawn from ``(seed, e)`` in 0 .. T−1), so later epochs cut the text at other places. At the first
window of an epoch the state must start afresh: :meth:`StreamBatches.get` says so (``reset``). A batch is
``(x_BT, reset, y_BT)``, the targets last as in every zenlm batch (the training loop counts them there).

The windows are numbered ``w = step · grad_accum + micro``: a batch is a pure function of (step, micro), like
every batch source of :mod:`zenlm.data.batches`, so a resumed run reads exactly the windows an uninterrupted run
would. The *state* it carries is not a function of the step (it depends on the weights at every earlier step);
it is saved with the checkpoint (see :class:`zenlm.recipes.ladder.StateCarrier`).
"""

from __future__ import annotations

import numpy as np
import torch

from zenlm.data.shards import TokenShards
from zenlm.errors import ConfigError, DataError


class StreamBatches:
    """Consecutive TBPTT windows from one split: ``get(step, micro) -> (x_BT, reset, y_BT)``.

    batch_size: streams B;  seq_len: window length T;  grad_accum: micro-batches per optimiser step (windows are
    numbered across them);  seed: selects the per-epoch offsets.
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, *, grad_accum: int = 1,
                 seed: int = 0) -> None:
        for name, v in (("batch_size", batch_size), ("seq_len", seq_len), ("grad_accum", grad_accum)):
            if v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}.")
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.grad_accum, self.seed = grad_accum, seed
        self.stream_len = (len(shards) - 1) // batch_size
        self.windows_per_epoch = (self.stream_len - seq_len + 1) // seq_len
        if self.windows_per_epoch < 1:
            raise DataError(f"the {shards.split} split has {len(shards)} tokens: too few for {batch_size} streams "
                            f"of at least {2 * seq_len} tokens each; use fewer streams (--batch-size) or a shorter "
                            "--seq-len.")

    def window_index(self, step: int, micro: int = 0) -> int:
        """The number of the window that (step, micro) reads: step · grad_accum + micro."""
        if not 0 <= micro < self.grad_accum:
            raise IndexError(f"micro {micro} is outside 0 .. {self.grad_accum - 1}")
        return step * self.grad_accum + micro

    def epoch_offset(self, epoch: int) -> int:
        """o_e: where epoch ``epoch``'s streams start within their stretch of text (0 for the first epoch)."""
        if epoch == 0:
            return 0
        rng = np.random.Generator(np.random.PCG64([self.seed & 0xFFFFFFFF, epoch]))
        return int(rng.integers(0, self.seq_len))

    def starts(self, step: int, micro: int = 0) -> tuple[np.ndarray, bool]:
        """(start positions [B] of the windows of (step, micro), whether this window begins an epoch)."""
        epoch, t = divmod(self.window_index(step, micro), self.windows_per_epoch)
        s = np.arange(self.batch_size) * self.stream_len + self.epoch_offset(epoch) + t * self.seq_len
        return s, t == 0

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, bool, torch.Tensor]:
        """(x_BT, reset, y_BT) for optimiser step ``step`` and micro-batch ``micro``: int64 tensors [B, T], and
        ``reset`` True when the carried state must be dropped (the first window of an epoch)."""
        T = self.seq_len
        starts, reset = self.starts(step, micro)
        rows = torch.from_numpy(np.stack([self.shards.window(int(s), T + 1) for s in starts]))
        return rows[:, :-1].contiguous(), reset, rows[:, 1:].contiguous()


__all__ = ["StreamBatches"]
