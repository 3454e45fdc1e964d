"""Token shards: a corpus turned into token ids on disk, and read back through memory maps.

``prepare(corpus, tokenizer, out_dir)`` encodes every document of both splits, appends the EOS id after
each document, and writes the ids into files of at most ``shard_tokens`` ids::

    out_dir/index.json              what is where (format, dtype, vocab, per-split token/byte/document counts)
    out_dir/tokenizer.json          the tokenizer that made the ids (+ tokenizer_config.json)
    out_dir/train-00000.bin ...     shards, in order
    out_dir/val-00000.bin ...

A shard is little-endian binary: a 32-byte header, then ``count`` ids of ``itemsize`` bytes each::

    offset  0  8 bytes  magic  b"ZENLMTOK"
    offset  8  uint32   format version (1)
    offset 12  uint32   itemsize: 2 (uint16 ids, when the vocabulary has <= 65,536 entries) or 4 (uint32)
    offset 16  uint64   count: number of ids in the file
    offset 24  8 bytes  zero (reserved)

Every file is written under a temporary name and renamed when complete, and ``index.json`` is written last,
so an interrupted ``prepare`` never leaves a directory that looks usable. Reading checks each header against
the file size and the index, so a truncated or foreign file is refused with a message naming it.

Memory stays flat: documents stream from the corpus, are cut into slices at places where the tokenizer
splits anyway (so the ids equal those of encoding the whole document), encoded in batches and appended to the
current shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from zenlm.data.corpus import Corpus
from zenlm.errors import DataError, write_error
from zenlm.fileio import atomic_write_text, file_sha256, read_json_object
from zenlm.progress import ProgressFn, report
from zenlm.tokenizer import CUT_POINTS, Tokenizer

MAGIC = b"ZENLMTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")
HEADER_BYTES = HEADER.size  # 32
INDEX_FORMAT = "zenlm-shards"
DEFAULT_SHARD_TOKENS = 1 << 26  # 64M ids: 128 MB of uint16 per shard
SLICE_CHARS = 1 << 13  # a document is cut into slices of about this many characters...
HARD_LIMIT_CHARS = 1 << 20  # ...and, where it has no safe cut point, hard at this many
BATCH_CHARS = 1 << 20  # slices encoded together (the tokenizer encodes a batch in parallel)
# the files a data directory holds, and the temporary names they are written under (a crash may leave one)
_OURS = re.compile(r"^(index\.json|tokenizer\.json|tokenizer_config\.json|(train|val)-\d{5}\.bin)(\.tmp)?$"
                   r"|^\.(index|tokenizer|tokenizer_config)\.tmp-\d+\.json$")
_REPORT_SECONDS = 0.5


def _shard_name(split: str, i: int) -> str:
    return f"{split}-{i:05d}.bin"


# ---------------------------------------------------------------------------------------------- writing
class _ShardWriter:
    """Appends ids to ``split-NNNNN.bin`` files of at most ``shard_tokens`` ids (temp name until full)."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.limit = out, split, dtype, shard_tokens
        self.names: list[str] = []
        self.sizes: list[int] = []
        self._f: Any = None
        self._n = 0

    def _open(self) -> None:
        name = _shard_name(self.split, len(self.names))
        self._path = self.out / name
        self._f = (self.out / (name + ".tmp")).open("wb")
        self._f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0))
        self._n = 0

    def _close(self) -> None:
        self._f.seek(0)
        self._f.write(HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self._n))
        self._f.close()
        os.replace(self._path.with_name(self._path.name + ".tmp"), self._path)
        self.names.append(self._path.name)
        self.sizes.append(self._n)
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype.newbyteorder("<"), copy=False)
        while len(ids):
            if self._f is None:
                self._open()
            take = min(len(ids), self.limit - self._n)
            self._f.write(ids[:take].tobytes())
            self._n += take
            ids = ids[take:]
            if self._n == self.limit:
                self._close()

    def finish(self) -> None:
        if self._f is not None:
            self._close()

    def abort(self) -> None:
        """Close the open shard without finishing it (its .tmp file is removed by the caller)."""
        if self._f is not None:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self._f.close()
            self._f = None

    @property
    def current(self) -> Path:
        """The file being written now (for error messages)."""
        return self._path.with_name(self._path.name + ".tmp") if self._f is not None else self.out


def _slices(doc: Iterator[str]) -> Iterator[str]:
    """Cut a document (given as pieces) into slices of about ``SLICE_CHARS`` characters at safe cut points."""
    size, hard = SLICE_CHARS, HARD_LIMIT_CHARS
    buf = ""
    for piece in doc:
        buf += piece
        while len(buf) > size:
            m = CUT_POINTS.search(buf, size)
            if m is not None:
                yield buf[:m.start()]
                buf = buf[m.start():]
            elif len(buf) >= hard:  # no safe place: cut hard (ids may differ from whole-text encoding here)
                yield buf
                buf = ""
            else:
                break
    if buf:
        yield buf


def _check_out_dir(out: Path) -> None:
    """Accept a new or empty directory, or one of our own data directories (complete or half-written)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is not a directory; choose a folder for --out.")
    if not out.exists():
        return
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if not _OURS.match(n)]
    if foreign:
        raise DataError(f"{out} is not a zenlm data directory (it holds {foreign[0]}); choose an empty or new "
                        "--out so nothing there is overwritten.")
    index = out / "index.json"
    if index.exists():
        try:
            fmt = json.loads(index.read_text(encoding="utf-8")).get("format")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            fmt = None
        if fmt != INDEX_FORMAT:
            raise DataError(f"{out} is not a zenlm data directory (its index.json is not a zenlm shard index); "
                            "choose an empty or new --out.")


def _remove_ours(out: Path, keep_tokenizer: bool) -> None:
    for p in out.iterdir():
        if _OURS.match(p.name) and not (keep_tokenizer and p.name.startswith("tokenizer")):
            p.unlink()


def prepare(
    corpus: Corpus,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike[str],
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Encode both splits of ``corpus`` into token shards in ``out_dir``; returns the index (also index.json).

    A previous data directory at ``out_dir`` is replaced; a directory holding anything else is refused.
    shard_tokens: ids per shard file (the last shard of a split holds the rest).
    """
    if tokenizer.eos_id is None:
        raise DataError("the tokenizer has no <|eos|> token, which separates documents in the shards; "
                        "train it with zenlm's default special tokens.")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}.")
    out = Path(out_dir)
    _check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_ours(out, keep_tokenizer=False)  # the index goes first: a half-written directory is never usable
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    total_bytes = corpus.num_bytes("train") + corpus.num_bytes("val")
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    t0 = last = time.perf_counter()
    done_bytes = n_tokens = 0
    splits: dict[str, dict[str, Any]] = {}
    writer: _ShardWriter | None = None
    try:
        tokenizer.save(out)
        for split in ("train", "val"):
            writer = _ShardWriter(out, split, dtype, shard_tokens)
            n_docs = split_tokens = split_bytes = 0
            batch: list[str] = []
            batch_chars = 0

            def flush(w: _ShardWriter) -> None:
                nonlocal batch, batch_chars, split_tokens, n_tokens
                if not batch:
                    return
                for ids in tokenizer.encode_batch(batch):
                    if ids:
                        w.write(np.asarray(ids, dtype=np.int64))
                        split_tokens += len(ids)
                        n_tokens += len(ids)
                batch, batch_chars = [], 0

            for doc in corpus.documents(split):  # type: ignore[arg-type]
                for s in _slices(doc):
                    batch.append(s)
                    batch_chars += len(s)
                    b = len(s.encode("utf-8"))
                    split_bytes += b
                    done_bytes += b
                    if batch_chars >= BATCH_CHARS:
                        flush(writer)
                flush(writer)  # the document's ids go out before its EOS
                writer.write(eos)
                split_tokens += 1
                n_tokens += 1
                n_docs += 1
                now = time.perf_counter()
                if now - last >= _REPORT_SECONDS:
                    last = now
                    report(progress, "prepare", done=done_bytes, total=total_bytes, unit="B",
                           info={"MB/s": done_bytes / 1e6 / max(now - t0, 1e-9), "tokens": n_tokens})
            writer.finish()
            splits[split] = {"tokens": split_tokens, "bytes": split_bytes, "documents": n_docs,
                             "shards": writer.names, "shard_sizes": writer.sizes}
            writer = None
        index = {
            "format": INDEX_FORMAT,
            "version": VERSION,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "tokenizer": "tokenizer.json",
            "tokenizer_kind": tokenizer.kind,
            "corpus": corpus.name,
            "text_bytes": done_bytes,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "splits": splits,
        }
        atomic_write_text(out / "index.json", json.dumps(index, indent=2, ensure_ascii=False))
    except BaseException as e:
        where = writer.current if writer is not None else out
        if writer is not None:
            writer.abort()
        for p in [*out.glob("*.tmp"), *out.glob("*.bin")]:  # never a half-written data directory
            with contextlib.suppress(OSError):
                p.unlink()
        if isinstance(e, OSError):
            raise write_error(where, e, DataError, "then run zenlm prepare again") from None
        raise
    elapsed = max(time.perf_counter() - t0, 1e-9)
    report(progress, "prepare", done=done_bytes, total=total_bytes, unit="B",
           info={"MB/s": done_bytes / 1e6 / elapsed, "tokens": n_tokens})
    report(progress, "prepare", message=f"{n_tokens:,} tokens ({dtype.name}) written to {out} in {elapsed:.1f} s")
    return index


# ---------------------------------------------------------------------------------------------- reading
def load_index(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``index.json`` of a data directory made by :func:`prepare` (DataError when unusable)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory {d} does not exist; make it with `zenlm prepare --out {d}`.")
    path = d / "index.json"
    if not path.is_file():
        raise DataError(f"{d} has no index.json; run `zenlm prepare --corpus ... --out {d}` (again: an "
                        "interrupted prepare leaves no index).")
    index = read_json_object(path, DataError, "re-run zenlm prepare")
    if index.get("format") != INDEX_FORMAT:
        raise DataError(f"{path} is not a zenlm shard index; point to a directory made by zenlm prepare.")
    _check_index(index, path)
    return index


def data_fingerprint(data_dir: str | os.PathLike[str]) -> dict[str, str]:
    """What identifies the token ids of a data directory: the SHA-256 of its tokenizer.json and of its index.json
    (without the time it was written). A copy of the directory, or the same corpus prepared again with the same
    tokenizer, has the same fingerprint; other text or another tokenizer has another one. Cheap: the shards
    themselves are not read (their names, sizes and token counts are in the index)."""
    d = Path(data_dir)
    index = load_index(d)
    index = {k: v for k, v in index.items() if k != "created"}
    return {"tokenizer_sha256": file_sha256(d / "tokenizer.json"),
            "index_sha256": hashlib.sha256(json.dumps(index, sort_keys=True).encode("utf-8")).hexdigest()}


def _check_index(index: dict[str, Any], path: Path) -> None:
    """Refuse an index.json whose entries have the wrong types (a hand edit or a damaged file), naming the
    entry, instead of failing later with a traceback."""

    def bad(what: str, value: Any) -> DataError:
        return DataError(f"{path}: {what}, got {value!r}; the file is damaged: re-run zenlm prepare.")

    def whole(v: Any, low: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    if not whole(index.get("vocab_size"), 1):
        raise bad("'vocab_size' must be a whole number >= 1", index.get("vocab_size"))
    if index.get("dtype") not in ("uint16", "uint32"):
        raise bad("'dtype' must be 'uint16' or 'uint32'", index.get("dtype"))
    eos = index.get("eos_id")
    if eos is not None and (not whole(eos) or eos >= index["vocab_size"]):
        raise bad(f"'eos_id' must be a token id below vocab_size {index['vocab_size']}", eos)
    splits = index.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise bad("'splits' must map split names to their shards", splits)
    for name, info in splits.items():
        if not isinstance(info, dict):
            raise bad(f"split {name!r} must be an object", info)
        shards, sizes = info.get("shards"), info.get("shard_sizes")
        if not isinstance(shards, list) or not all(isinstance(n, str) and _OURS.match(n) for n in shards):
            raise bad(f"split {name!r}: 'shards' must be a list of shard file names", shards)
        if sizes is not None and (not isinstance(sizes, list) or len(sizes) != len(shards)
                                  or not all(whole(n) for n in sizes)):
            raise bad(f"split {name!r}: 'shard_sizes' must list one whole number per shard", sizes)
        for key in ("tokens", "bytes"):
            if key in info and not whole(info[key]):
                raise bad(f"split {name!r}: {key!r} must be a whole number >= 0", info[key])


def _open_shard(path: Path, expected: int | None) -> np.memmap | np.ndarray:
    """Check one shard's header against its size and the index; returns its ids as a read-only memmap."""
    if not path.is_file():
        raise DataError(f"{path} is missing; re-run zenlm prepare.")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) >= len(MAGIC) and head[:len(MAGIC)] != MAGIC:
        raise DataError(f"{path} is not a zenlm token shard (wrong magic bytes); re-run zenlm prepare.")
    if len(head) < HEADER_BYTES:
        raise DataError(f"{path} is truncated: {size} bytes is shorter than the {HEADER_BYTES}-byte header; "
                        "re-run zenlm prepare.")
    _, version, itemsize, count = HEADER.unpack(head)
    if version != VERSION:
        raise DataError(f"{path} has format version {version}; this zenlm reads version {VERSION}. "
                        "Re-run zenlm prepare.")
    if itemsize not in (2, 4):
        raise DataError(f"{path} has an invalid id size {itemsize} (expected 2 or 4); re-run zenlm prepare.")
    held = (size - HEADER_BYTES) // itemsize
    if held < count:
        raise DataError(f"{path} is truncated: header says {count} tokens but file holds {held}; "
                        "re-run zenlm prepare.")
    if size != HEADER_BYTES + count * itemsize:
        raise DataError(f"{path} is corrupt: header says {count} tokens but file holds "
                        f"{(size - HEADER_BYTES) / itemsize:g}; re-run zenlm prepare.")
    if expected is not None and count != expected:
        raise DataError(f"{path} holds {count} tokens but index.json says {expected}; re-run zenlm prepare.")
    if count == 0:
        return np.zeros(0, dtype=np.uint16 if itemsize == 2 else np.uint32)
    return np.memmap(path, dtype="<u2" if itemsize == 2 else "<u4", mode="r", offset=HEADER_BYTES,
                     shape=(count,))


class TokenShards:
    """The ids of one split as one long read-only sequence over its shard files (memory-mapped).

    ``len(shards)`` is the number of ids; ``shards.window(start, length)`` returns ids
    ``start .. start+length-1`` as an int64 array, crossing shard boundaries as needed.
    """

    def __init__(self, data_dir: Path, split: str, arrays: list[np.ndarray], index: dict[str, Any]) -> None:
        self.data_dir, self.split, self.index = data_dir, split, index
        self._arrays = arrays
        self._starts = np.cumsum([0] + [len(a) for a in arrays])
        self._len = int(self._starts[-1])

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], split: str) -> TokenShards:
        """Open ``split`` ("train" or "val") of a data directory, checking every shard file."""
        d = Path(data_dir)
        index = load_index(d)
        splits = index.get("splits", {})
        if split not in splits:
            raise DataError(f"{d / 'index.json'} has no split {split!r} (it has {', '.join(splits)}).")
        info = splits[split]
        sizes = info.get("shard_sizes") or [None] * len(info["shards"])
        arrays = [_open_shard(d / name, n) for name, n in zip(info["shards"], sizes, strict=True)]
        vocab = int(index["vocab_size"])
        for name, a in zip(info["shards"], arrays, strict=True):
            # one pass at memory speed (~GB/s): an id outside the vocabulary would crash the model's embedding
            if len(a) and int(a.max()) >= vocab:
                bad = int(np.argmax(a >= vocab))
                raise DataError(f"{d / name} holds token id {int(a[bad])} at position {bad:,}, but the vocabulary "
                                f"has {vocab} ids; the shard is damaged or was written with another tokenizer: "
                                "re-run zenlm prepare.")
        total = sum(len(a) for a in arrays)
        if total != info["tokens"]:
            raise DataError(f"{d / 'index.json'} says {info['tokens']} tokens for split {split!r} but its shards "
                            f"hold {total}; re-run zenlm prepare.")
        return cls(d, split, arrays, index)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TokenShards({str(self.data_dir)!r}, {self.split!r}, {self._len:,} tokens)"

    def window(self, start: int, length: int) -> np.ndarray:
        """Ids ``start .. start+length-1`` as int64 [length]; IndexError when outside the split."""
        if start < 0 or length < 0 or start + length > self._len:
            raise IndexError(f"window [{start}, {start + length}) is outside the split's {self._len} tokens")
        if length == 0:
            return np.zeros(0, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        off = start - int(self._starts[i])
        first = self._arrays[i]
        if off + length <= len(first):  # the common case: one shard
            ids = first[off:off + length].astype(np.int64)
        else:
            parts, need = [], length
            while need:
                a = self._arrays[i]
                take = min(need, len(a) - off)
                parts.append(a[off:off + take])
                need -= take
                i, off = i + 1, 0
            ids = np.concatenate(parts).astype(np.int64)
        return ids


__all__ = ["prepare", "load_index", "data_fingerprint", "TokenShards", "HEADER_BYTES", "MAGIC", "VERSION"]
