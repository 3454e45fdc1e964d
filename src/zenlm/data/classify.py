"""Labelled texts for classification: read ``.jsonl`` / ``.csv``, split by class, encode and pad.

    examples = read_labelled(path, text_field="text", label_field="label")   # [(text, label), ...]
    train, val = stratified_split(examples, val_fraction=0.1, seed=0)         # every class in both parts
    ids = encode_for_model(tokenizer, texts, max_len, encoder=True)           # [CLS] text [SEP] (encoders)
    ids_BT, mask_BT = pad_batch(ids, pad_id)                                  # right padding, 0/1 mask
"""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from zenlm.data.jsonl import read_jsonl, read_text_utf8
from zenlm.errors import DataError
from zenlm.tokenizer import Tokenizer

Example = tuple[str, str]  # (text, label)


def _rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) of a .jsonl or .csv file."""
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(read_text_utf8(path).splitlines())
        return [(i + 2, row) for i, row in enumerate(reader)]
    return read_jsonl(path, "a text and a label field")


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[Example]:
    """(text, label) pairs from a ``.jsonl`` (one object per line) or ``.csv`` (with a header row) file.

    Labels may be strings or numbers (kept as their string form). Refused with a DataError: a missing file,
    an unknown field (the message lists the fields there are), empty texts or labels, fewer than two classes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file: {path}; give a .jsonl or .csv file with text and label fields.")
    if path.suffix.lower() not in (".jsonl", ".csv", ".json"):
        raise DataError(f"{path}: use a .jsonl (one JSON object per line) or .csv (header row) file.")
    rows = _rows(path)
    if not rows:
        raise DataError(f"{path} holds no examples.")
    out: list[Example] = []
    empty: list[int] = []
    for line, rec in rows:
        for field, what in ((text_field, "--text-field"), (label_field, "--label-field")):
            if field not in rec:
                raise DataError(f"{path}:{line} has no field {field!r} (fields: {', '.join(map(repr, rec))}); "
                                f"name the right one with {what}.")
        text, label = rec[text_field], rec[label_field]
        if not isinstance(text, str) or not text.strip() or label is None or str(label).strip() == "":
            empty.append(line)
            continue
        out.append((text, str(label).strip()))
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
        raise DataError(f"{path}: {len(empty)} example(s) have an empty text or label (lines {shown}); "
                        "remove or fill them.")
    classes = Counter(label for _, label in out)
    if len(classes) < 2:
        raise DataError(f"{path}: every example has the label {next(iter(classes))!r}; a classifier needs at "
                        "least two classes.")
    return out


def stratified_split(examples: Sequence[Example], val_fraction: float, seed: int) -> tuple[list[Example],
                                                                                           list[Example]]:
    """Split each class on its own (shuffled with ``seed``) so both parts keep the class proportions; every
    class with at least two examples has at least one in each part."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    by_class: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        by_class[ex[1]].append(ex)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        group = by_class[label][:]
        rng.shuffle(group)
        n_val = min(max(1, round(len(group) * val_fraction)), len(group) - 1) if len(group) > 1 else 0
        val += group[:n_val]
        train += group[n_val:]
    rng.shuffle(train)
    rng.shuffle(val)
    if not val:
        raise DataError("the validation split is empty; give more examples or a larger validation fraction.")
    return train, val


def encode_for_model(tok: Tokenizer, texts: Sequence[str], max_len: int, *, encoder: bool) -> list[list[int]]:
    """Token ids ready for a model: ``[CLS] text [SEP]`` for an encoder (the tokenizer's bos/eos play CLS/SEP),
    ``text <|eos|>`` for a decoder (whose last token then summarises the text); cut to ``max_len`` ids."""
    if max_len < 3:
        raise DataError(f"max_len must be at least 3, got {max_len}.")
    start = [tok.bos_id] if encoder and tok.bos_id is not None else []
    end = [tok.eos_id] if tok.eos_id is not None else []
    room = max_len - len(start) - len(end)
    return [start + ids[:room] + end for ids in tok.encode_batch(list(texts))]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to the longest: -> ids [B, T] int64 and mask [B, T] int64 (1 = real token)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


class ClassBatches:
    """Shuffled mini-batches of (ids, mask, label) for training; ``get(step)`` is a pure function of ``step``
    (epoch e uses the permutation seeded by (seed, e)), so a resumed run continues with the same data."""

    def __init__(self, seqs: Sequence[Sequence[int]], labels: Sequence[int], batch_size: int, pad_id: int,
                 seed: int = 0) -> None:
        if len(seqs) != len(labels) or not seqs:
            raise DataError("need one label per text and at least one example.")
        self.seqs, self.labels = list(seqs), torch.as_tensor(list(labels), dtype=torch.long)
        self.batch_size, self.pad_id, self.seed = min(batch_size, len(seqs)), pad_id, seed
        self.steps_per_epoch = len(seqs) // self.batch_size

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.seqs), generator=g)[i * self.batch_size : (i + 1) * self.batch_size]
        ids, mask = pad_batch([self.seqs[j] for j in order.tolist()], self.pad_id)
        return ids, mask, self.labels[order]


__all__ = ["ClassBatches", "Example", "encode_for_model", "pad_batch", "read_labelled", "stratified_split"]
