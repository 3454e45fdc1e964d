"""Source -> target pairs for sequence-to-sequence training (summarisation, translation).

    pairs.jsonl  ->  read_pairs  ->  encode_pairs (tokenise, truncate with a warning and a count)
                 ->  Seq2SeqBatches          encoder-decoder: source + eos | bos + target -> target + eos
                 ->  PromptCompletionBatches decoder-only:    source + sep + target + eos, loss on the target only
    plain text   ->  DenoisingBatches        self-supervised: corrupted text -> the text (BART text infilling)

A pairs file is JSON Lines, one object per line with a source and a target field (names configurable);
blank lines are skipped. Every batch is a pure function of ``(step, micro)``, so a resumed run sees the
same data. Label positions that must not be scored hold ``IGNORE_INDEX`` (-100, PyTorch's ignore_index).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from zenlm.data.batches import IGNORE_INDEX
from zenlm.data.jsonl import read_jsonl, read_text_utf8
from zenlm.errors import DataError
from zenlm.progress import ProgressFn, report


class _Encoder(Protocol):
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


@dataclass(frozen=True)
class Pair:
    """One training example: the text to read and the text to write."""

    source: str
    target: str


# ------------------------------------------------------------------------------------------- reading


def read_pairs(path: str | Path, source_field: str = "source", target_field: str = "target") -> list[Pair]:
    """All pairs of a ``.jsonl`` file. A missing file or field, a line that is not a JSON object, a non-string
    or empty (whitespace-only) source or target raises DataError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"pairs file {path} does not exist; give a .jsonl file with one "
                        f'{{"{source_field}": ..., "{target_field}": ...}} object per line.')
    pairs: list[Pair] = []
    for n, obj in read_jsonl(path, f"{source_field!r} and {target_field!r} fields"):
        texts = []
        for name in (source_field, target_field):
            if name not in obj:
                raise DataError(f"{path}:{n} has no {name!r} field (it has {sorted(obj)}); name the fields "
                                "with --source-field / --target-field.")
            value = obj[name]
            if not isinstance(value, str):
                raise DataError(f"{path}:{n}: {name!r} must be a string, got {type(value).__name__}.")
            if not value.strip():
                raise DataError(f"{path}:{n}: {name!r} is empty; remove the line or fill it in.")
            texts.append(value)
        pairs.append(Pair(texts[0], texts[1]))
    if not pairs:
        raise DataError(f"{path} holds no pairs; it needs at least one line with {source_field!r} and "
                        f"{target_field!r}.")
    return pairs


def check_pairs(pairs: Iterable[Pair]) -> list[Pair]:
    """Validate in-memory pairs the way :func:`read_pairs` validates a file (empty texts are refused)."""
    out = list(pairs)
    if not out:
        raise DataError("no pairs given; need at least one source/target pair.")
    for i, p in enumerate(out):
        if not isinstance(p.source, str) or not isinstance(p.target, str):
            raise DataError(f"pair {i}: source and target must be strings.")
        if not p.source.strip() or not p.target.strip():
            raise DataError(f"pair {i}: {'source' if not p.source.strip() else 'target'} is empty.")
    return out


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Plain documents for denoising: a ``.jsonl`` file (``text_field`` of each line) or a text file whose
    paragraphs (separated by blank lines) are the documents. Nothing to read raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist.")
    if path.suffix == ".jsonl":
        texts = []
        for n, obj in read_jsonl(path, f"a {text_field!r} field"):
            if not isinstance(obj.get(text_field), str):
                raise DataError(f"{path}:{n} has no string field {text_field!r}; name it with --text-field.")
            texts.append(obj[text_field])
    else:
        raw = read_text_utf8(path)
        texts = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{path} holds no text to train on.")
    return texts


# ------------------------------------------------------------------------------------------ encoding


@dataclass
class EncodedPairs:
    """Token ids of the pairs (no special tokens yet) and how many were cut to fit."""

    sources: list[list[int]]
    targets: list[list[int]]
    truncated_sources: int = 0
    truncated_targets: int = 0

    def __len__(self) -> int:
        return len(self.sources)


def encode_pairs(pairs: Sequence[Pair], tokenizer: _Encoder, max_source_tokens: int, max_target_tokens: int,
                 *, progress: ProgressFn | None = None) -> EncodedPairs:
    """Tokenise the pairs; keep at most ``max_source_tokens`` / ``max_target_tokens`` ids of each (the
    beginning). Truncation is counted and reported through ``progress`` (a warning when there is none)."""
    if max_source_tokens < 1 or max_target_tokens < 1:
        raise DataError(f"the length limits leave no room for text ({max_source_tokens} source / "
                        f"{max_target_tokens} target tokens); raise the model's context lengths.")
    pairs = check_pairs(pairs)
    src = tokenizer.encode_batch([p.source for p in pairs])
    tgt = tokenizer.encode_batch([p.target for p in pairs])
    for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
        if not s or not t:
            raise DataError(f"pair {i} encodes to no tokens ({'source' if not s else 'target'}); "
                            "remove it or use a tokenizer that covers its text.")
    n_src = sum(len(s) > max_source_tokens for s in src)
    n_tgt = sum(len(t) > max_target_tokens for t in tgt)
    for n, what, limit in ((n_src, "sources", max_source_tokens), (n_tgt, "targets", max_target_tokens)):
        if n:
            msg = (f"{n} of {len(pairs)} {what} are longer than {limit} tokens and were truncated "
                   f"(kept the first {limit}).")
            if progress is None:  # a caller without a progress callback still hears of it
                warnings.warn(msg, stacklevel=2)
            else:  # (once: a warning too would print the same line again)
                report(progress, "data", message=msg)
    return EncodedPairs([s[:max_source_tokens] for s in src], [t[:max_target_tokens] for t in tgt], n_src, n_tgt)


def pad_right(seqs: Sequence[Sequence[int]], value: int) -> Tensor:
    """[len(seqs), longest] int64, each sequence followed by ``value``."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


def seq2seq_example(source: Sequence[int], target: Sequence[int], bos_id: int, eos_id: int
                    ) -> tuple[list[int], list[int], list[int]]:
    """Encoder-decoder teacher forcing: (encoder input, decoder input, labels).

        encoder input = source + [eos]
        decoder input = [bos] + target          labels = target + [eos]    (labels[t] follows input[:t+1])
    """
    return list(source) + [eos_id], [bos_id] + list(target), list(target) + [eos_id]


def collate_seq2seq(examples: Sequence[tuple[list[int], list[int], list[int]]], pad_id: int
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(src_BS, src_mask_BS, tgt_in_BT, labels_BT), right-padded; labels are IGNORE_INDEX on padding."""
    src_BS = pad_right([e[0] for e in examples], pad_id)
    src_mask_BS = pad_right([[1] * len(e[0]) for e in examples], 0).bool()
    return src_BS, src_mask_BS, pad_right([e[1] for e in examples], pad_id), pad_right([e[2] for e in examples],
                                                                                      IGNORE_INDEX)


def prompt_completion_example(source: Sequence[int], target: Sequence[int], sep_id: int, eos_id: int
                              ) -> tuple[list[int], list[int]]:
    """Decoder-only: (inputs, labels) for ``source + [sep] + target + [eos]``; the labels score only the
    target and the end token (the prompt's positions hold IGNORE_INDEX)."""
    prompt = list(source) + [sep_id]
    full = prompt + list(target) + [eos_id]
    labels = full[1:]
    labels[: len(prompt) - 1] = [IGNORE_INDEX] * (len(prompt) - 1)
    return full[:-1], labels


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class _Sampler:
    """Example indices for (step, micro): shuffled epochs, each example once per epoch."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, seed: int) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}.")
        self.n, self.batch_size, self.grad_accum, self.seed = n, batch_size, grad_accum, seed
        self._orders: dict[int, np.ndarray] = {}

    def indices(self, step: int, micro: int) -> list[int]:
        first = (step * self.grad_accum + micro) * self.batch_size
        out = []
        for k in range(first, first + self.batch_size):
            epoch, i = divmod(k, self.n)
            if epoch not in self._orders:
                self._orders = {epoch: _epoch_order(self.n, self.seed, epoch)}  # keep one epoch in memory
            out.append(int(self._orders[epoch][i]))
        return out


class Seq2SeqBatches:
    """Encoder-decoder batches: ``get(step, micro)`` -> (src_BS, src_mask_BS, tgt_in_BT, labels_BT)."""

    def __init__(self, data: EncodedPairs, batch_size: int, *, bos_id: int, eos_id: int, pad_id: int,
                 grad_accum: int = 1, seed: int = 0) -> None:
        self.data, self.bos_id, self.eos_id, self.pad_id = data, bos_id, eos_id, pad_id
        self.sampler = _Sampler(len(data), batch_size, grad_accum, seed)

    def get(self, step: int, micro: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        idx = self.sampler.indices(step, micro)
        ex = [seq2seq_example(self.data.sources[i], self.data.targets[i], self.bos_id, self.eos_id) for i in idx]
        return collate_seq2seq(ex, self.pad_id)


class PromptCompletionBatches:
    """Decoder-only batches of the same pairs: ``get(step, micro)`` -> (x_BT, labels_BT)."""

    def __init__(self, data: EncodedPairs, batch_size: int, *, sep_id: int, eos_id: int, pad_id: int,
                 grad_accum: int = 1, seed: int = 0) -> None:
        self.data, self.sep_id, self.eos_id, self.pad_id = data, sep_id, eos_id, pad_id
        self.sampler = _Sampler(len(data), batch_size, grad_accum, seed)

    def get(self, step: int, micro: int = 0) -> tuple[Tensor, Tensor]:
        idx = self.sampler.indices(step, micro)
        ex = [prompt_completion_example(self.data.sources[i], self.data.targets[i], self.sep_id, self.eos_id)
              for i in idx]
        return pad_right([e[0] for e in ex], self.pad_id), pad_right([e[1] for e in ex], IGNORE_INDEX)


# ----------------------------------------------------------------------------------------- denoising


def infill_noise(ids: Sequence[int], rng: np.random.Generator, mask_id: int, noise_density: float = 0.3,
                 mean_span: float = 3.0) -> list[int]:
    """BART-style text infilling: hide about ``noise_density`` of the tokens in spans whose lengths are
    drawn from Poisson(mean_span) (at least 1); each span becomes a single ``mask_id``, so the model must
    also work out how many tokens are missing."""
    if not 0.0 < noise_density < 1.0:
        raise DataError(f"noise_density must be in (0, 1), got {noise_density}.")
    n = len(ids)
    if n == 0:
        return []
    hidden = np.zeros(n, dtype=bool)
    target = max(1, round(n * noise_density))
    while hidden.sum() < target:
        length = max(1, int(rng.poisson(mean_span)))
        start = int(rng.integers(0, n))
        hidden[start : start + length] = True
    out: list[int] = []
    for i, tok in enumerate(ids):
        if not hidden[i]:
            out.append(int(tok))
        elif i == 0 or not hidden[i - 1]:
            out.append(mask_id)
    return out


class DenoisingBatches:
    """Self-supervised encoder-decoder batches from plain token streams: random windows of ``max_tokens``
    tokens, corrupted by :func:`infill_noise` as the source, the window itself as the target.
    ``get(step, micro)`` -> (src_BS, src_mask_BS, tgt_in_BT, labels_BT), a pure function of its arguments."""

    def __init__(self, docs: Sequence[Sequence[int]], batch_size: int, max_tokens: int, *, bos_id: int,
                 eos_id: int, pad_id: int, mask_id: int, noise_density: float = 0.3, mean_span: float = 3.0,
                 seed: int = 0) -> None:
        self.windows = [list(d[i : i + max_tokens]) for d in docs for i in range(0, len(d), max_tokens)
                        if len(d[i : i + max_tokens]) >= 2]
        if not self.windows:
            raise DataError("no text to denoise: every document is shorter than two tokens.")
        self.batch_size, self.seed = batch_size, seed
        self.bos_id, self.eos_id, self.pad_id, self.mask_id = bos_id, eos_id, pad_id, mask_id
        self.noise_density, self.mean_span = noise_density, mean_span

    def get(self, step: int, micro: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        rng = np.random.default_rng([self.seed, step, micro])
        ex = []
        for w in rng.integers(0, len(self.windows), self.batch_size):
            window = self.windows[int(w)]
            noisy = infill_noise(window, rng, self.mask_id, self.noise_density, self.mean_span)
            ex.append(seq2seq_example(noisy, window, self.bos_id, self.eos_id))
        return collate_seq2seq(ex, self.pad_id)


__all__ = ["Pair", "read_pairs", "read_texts", "check_pairs", "EncodedPairs", "encode_pairs", "pad_right",
           "seq2seq_example", "collate_seq2seq", "prompt_completion_example", "Seq2SeqBatches",
           "PromptCompletionBatches", "infill_noise", "DenoisingBatches"]
