"""Batches for language modelling: token shards -> (inputs, targets) tensors, causal or masked.

Training batches are random windows: row ``b`` of step ``s`` is the window of ``seq_len + 1`` ids that starts
at a position drawn from a generator seeded with ``(seed, s, micro)``::

    x[b] = ids[start_b     : start_b + T]         # what the model sees
    y[b] = ids[start_b + 1 : start_b + T + 1]     # what it must predict: the next id at every position

A batch is a pure function of (seed, step, micro-batch), so a resumed run draws exactly the batches an
uninterrupted run would, with no data-loader state to save. Windows may cross document (EOS) and shard
boundaries; over many steps every position of the split is equally likely to be covered.

Evaluation batches are the split read sequentially in non-overlapping windows, the same every time.

Masked-LM batches (:class:`MLMBatches`, BERT pretraining) wrap a window as ``[CLS] window [SEP]`` and hide
about 15% of its tokens; the targets are the hidden tokens. See :class:`MLMMasking` for the rule.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

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
    return _eval_windows(shards, batch_size, seq_len, eval_window_count(shards, seq_len, max_tokens))


def eval_window_count(shards: TokenShards, seq_len: int, max_tokens: int | None = None) -> int:
    """How many windows :func:`eval_batches` reads: every whole window of the split, or those holding the first
    ``max_tokens`` predicted tokens (at least one). DataError when not even one window fits."""
    n_windows = (len(shards) - 1) // seq_len if seq_len > 0 else 0
    if n_windows == 0:
        raise DataError(f"the validation split ({len(shards)} tokens) is too small for seq_len {seq_len}; "
                        "give more validation text or a shorter sequence length.")
    if max_tokens is not None:
        n_windows = min(n_windows, max(1, max_tokens // seq_len))
    return n_windows


def _eval_windows(shards: TokenShards, batch_size: int, seq_len: int, n_windows: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for first in range(0, n_windows, batch_size):
        n = min(batch_size, n_windows - first)
        ids = torch.from_numpy(shards.window(first * seq_len, n * seq_len + 1))
        yield ids[:-1].view(n, seq_len), ids[1:].view(n, seq_len)


# ---------------------------------------------------------------------------------------------- masked LM
IGNORE_INDEX = -100  # label of a position that is not scored (F.cross_entropy's default ignore_index)
_MASK_STREAM = 0x4D4C4D  # "MLM": keeps the mask generator's stream apart from the window-start generator's
_EVAL_STREAM = 0x4556414C  # "EVAL"


def _torch_generator(*key: int) -> torch.Generator:
    """A CPU torch.Generator whose seed is a hash of the non-negative integers ``key``."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(seed)


class MLMMasking:
    """BERT's masking rule: wrap windows as ``[CLS] window [SEP]`` and choose positions to predict.

    Of the positions that hold an ordinary token (never [CLS], [SEP] or any other special id such as the
    ``<|eos|>`` that separates documents), a fraction ``mask_prob`` (15%) is chosen in every row; each chosen
    position is then

    * replaced by ``mask_id`` with probability 0.8,
    * replaced by a random ordinary (non-special) token id with probability 0.1,
    * left unchanged with probability 0.1,

    and its label is the original id; every other label is -100 (ignored by the loss). Why not always
    [MASK]? [MASK] never occurs when the encoder is later used on real text, so a model trained only on
    [MASK] positions could learn to produce useful representations there and nowhere else. Because a scored
    position may hold a random token or the right token, the model cannot tell from the input which
    positions it will be asked about, and must keep a good contextual representation of *every* token.

    The count per row is ``floor(mask_prob * n + u)`` with ``u ~ U(0, 1)`` (stochastic rounding, so the
    expected fraction is exactly ``mask_prob`` for any window length), at least 1 when the row has any
    ordinary token; which positions is uniform among them.

    mask_id:     id of the mask token;  vocab_size: ids 0..vocab_size-1 may be drawn as random tokens
    special_ids: ids never chosen and never drawn (cls_id, sep_id and mask_id are added to them)
    cls_id:      the token put first ([CLS]; zenlm uses the tokenizer's bos);  sep_id: put last (eos)
    mask_prob:   fraction of ordinary positions to predict, in (0, 1)
    """

    MASK_FRAC = 0.8  # of the chosen positions: replaced by [MASK] ...
    RANDOM_FRAC = 0.1  # ... by a random token; the rest (0.1) keep their token

    def __init__(self, *, mask_id: int, vocab_size: int, special_ids: Iterable[int], cls_id: int, sep_id: int,
                 mask_prob: float = 0.15) -> None:
        if not 0.0 < mask_prob < 1.0:
            raise ConfigError(f"mask_prob must be in (0, 1), got {mask_prob}.")
        special = {int(i) for i in special_ids} | {int(mask_id), int(cls_id), int(sep_id)}
        if not all(0 <= i < vocab_size for i in special):
            raise ConfigError(f"special ids {sorted(special)} must lie in 0..{vocab_size - 1} (the vocabulary).")
        ordinary = [i for i in range(vocab_size) if i not in special]
        if not ordinary:
            raise DataError("the vocabulary holds only special tokens; train a tokenizer with a real vocabulary.")
        self.mask_id, self.cls_id, self.sep_id, self.mask_prob = int(mask_id), int(cls_id), int(sep_id), mask_prob
        self.vocab_size = vocab_size
        self.special_ids = torch.tensor(sorted(special), dtype=torch.int64)
        self.ordinary_ids = torch.tensor(ordinary, dtype=torch.int64)

    def __call__(self, windows_BW: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """windows_BW [B, W] int64 token ids -> (ids_BT, labels_BT), both [B, W + 2] int64 on the CPU.

        All randomness comes from ``gen``, so equal generators give equal batches.
        """
        B = windows_BW.shape[0]
        ids_BT = torch.cat([torch.full((B, 1), self.cls_id), windows_BW, torch.full((B, 1), self.sep_id)], dim=1)
        T = ids_BT.shape[1]
        ordinary_BT = ~torch.isin(ids_BT, self.special_ids)
        # how many to choose per row: stochastic rounding of mask_prob * n, and at least one
        n_B = ordinary_BT.sum(1)
        k_B = torch.floor(n_B * self.mask_prob + torch.rand(B, generator=gen, dtype=torch.float64)).long()
        k_B = torch.where(n_B > 0, k_B.clamp(min=1), 0)
        # which: the k positions with the smallest random scores; special positions score 2 (never among them)
        score_BT = torch.rand(B, T, generator=gen).masked_fill(~ordinary_BT, 2.0)
        rank_BT = score_BT.argsort(dim=1).argsort(dim=1)  # rank of each position's score within its row
        chosen_BT = rank_BT < k_B[:, None]
        labels_BT = torch.where(chosen_BT, ids_BT, IGNORE_INDEX)
        # 80% [MASK], 10% a random ordinary token, 10% unchanged
        u_BT = torch.rand(B, T, generator=gen)
        random_BT = self.ordinary_ids[torch.randint(len(self.ordinary_ids), (B, T), generator=gen)]
        inputs_BT = torch.where(chosen_BT & (u_BT < self.MASK_FRAC), self.mask_id, ids_BT)
        use_random = chosen_BT & (u_BT >= self.MASK_FRAC) & (u_BT < self.MASK_FRAC + self.RANDOM_FRAC)
        inputs_BT = torch.where(use_random, random_BT, inputs_BT)
        return inputs_BT, labels_BT


class MLMBatches:
    """Random masked-LM rows from one split, as (ids_BT, labels_BT) int64 tensors [B, T].

    Row ``b`` of step ``s`` is ``[CLS] + ids[start_b : start_b + T - 2] + [SEP]`` with the window start drawn
    exactly as :class:`CausalBatches` draws it, masked by :class:`MLMMasking` with a ``torch.Generator``
    seeded from ``(seed, s, micro)``: a batch is a pure function of (seed, step, micro), so a resumed run
    sees the same windows *and* the same masks as an uninterrupted one.

    batch_size: rows B;  seq_len: T, including [CLS] and [SEP] (>= 3);  seed: selects windows and masks.
    The other arguments are those of :class:`MLMMasking`.
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, *, mask_id: int, vocab_size: int,
                 special_ids: Iterable[int], cls_id: int, sep_id: int, mask_prob: float = 0.15,
                 seed: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
        if seq_len < 3:
            raise ConfigError(f"seq_len must be >= 3 for masked-LM rows ([CLS] + tokens + [SEP]), got {seq_len}.")
        if len(shards) < seq_len - 2:
            raise DataError(f"the {shards.split} split has {len(shards)} tokens, too small for seq_len {seq_len} "
                            f"(a row holds seq_len - 2 tokens); use a shorter --seq-len or more text.")
        self.shards, self.batch_size, self.seq_len, self.seed = shards, batch_size, seq_len, seed
        self.masking = MLMMasking(mask_id=mask_id, vocab_size=vocab_size, special_ids=special_ids, cls_id=cls_id,
                                  sep_id=sep_id, mask_prob=mask_prob)

    def starts(self, step: int, micro: int = 0) -> np.ndarray:
        """Start positions [B] of the windows of (step, micro), each in 0 .. len - (seq_len - 2)."""
        rng = np.random.Generator(np.random.PCG64([self.seed & 0xFFFFFFFF, step, micro]))
        return rng.integers(0, len(self.shards) - (self.seq_len - 2) + 1, size=self.batch_size)

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids_BT, labels_BT) int64 tensors for optimiser step ``step`` and micro-batch ``micro``."""
        W = self.seq_len - 2
        windows = torch.from_numpy(np.stack([self.shards.window(int(s), W) for s in self.starts(step, micro)]))
        return self.masking(windows, _torch_generator(self.seed & 0xFFFFFFFF, step, micro, _MASK_STREAM))


def mlm_eval_batches(
    shards: TokenShards, batch_size: int, seq_len: int, max_tokens: int | None = None, *, mask_id: int,
    vocab_size: int, special_ids: Iterable[int], cls_id: int, sep_id: int, mask_prob: float = 0.15, seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split read in order as masked-LM (ids_BT, labels_BT) batches, identical at every call.

    Row ``i`` wraps the non-overlapping window ``ids[i*(T-2) : (i+1)*(T-2)]``; the masks of batch ``j`` come
    from a generator seeded with ``(seed, j)``, fixed (not the training seed) so that runs with different
    training seeds are scored on the same masked positions. The last batch may be smaller.
    max_tokens: use only the first ``max_tokens // seq_len`` rows (at least one); None reads the whole split.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    if seq_len < 3:
        raise ConfigError(f"seq_len must be >= 3 for masked-LM rows ([CLS] + tokens + [SEP]), got {seq_len}.")
    masking = MLMMasking(mask_id=mask_id, vocab_size=vocab_size, special_ids=special_ids, cls_id=cls_id,
                         sep_id=sep_id, mask_prob=mask_prob)
    W = seq_len - 2
    n_rows = len(shards) // W
    if n_rows == 0:
        raise DataError(f"the validation split ({len(shards)} tokens) is too small for seq_len {seq_len}; "
                        "give more validation text or a shorter sequence length.")
    if max_tokens is not None:
        n_rows = min(n_rows, max(1, max_tokens // seq_len))
    return _mlm_eval_rows(shards, masking, batch_size, W, n_rows, seed)


def _mlm_eval_rows(shards: TokenShards, masking: MLMMasking, batch_size: int, W: int, n_rows: int, seed: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for j, first in enumerate(range(0, n_rows, batch_size)):
        n = min(batch_size, n_rows - first)
        windows = torch.from_numpy(shards.window(first * W, n * W)).view(n, W)
        yield masking(windows, _torch_generator(seed & 0xFFFFFFFF, j, _EVAL_STREAM))


__all__ = ["CausalBatches", "eval_batches", "eval_window_count", "IGNORE_INDEX", "MLMBatches", "MLMMasking",
           "mlm_eval_batches"]
