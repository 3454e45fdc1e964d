"""Corpora: built-in texts (exact, reproducible), local files and folders, splits, bad input, flat memory."""

from __future__ import annotations

import hashlib
import json
import re
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zenlm.data.corpus as corpus_mod
from zenlm.data.corpus import Corpus, open_corpus, shakespeare_char_text
from zenlm.errors import ConfigError, DataError
from zenlm.progress import Progress


def split_text(c: Corpus, split: str) -> str:
    return "".join(c.texts(split))  # type: ignore[arg-type]


def docs(c: Corpus, split: str) -> list[str]:
    return ["".join(d) for d in c.documents(split)]  # type: ignore[arg-type]


def sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- built-ins
def test_shakespeare_char_is_the_exact_benchmark_text() -> None:
    text = shakespeare_char_text()
    assert len(text) == 1_115_394
    assert sha(text) == "e8d9b6ac0fff4a11a1df114853545df9db584adfab60afc9be070eeb267d177a"
    assert text.startswith("ALL'S WELL THAT ENDS WELL\n\nby William Shakespeare\n\n")
    c = open_corpus("shakespeare-char")
    train, val = docs(c, "train"), docs(c, "val")
    assert len(train) == 1 and len(val) == 1
    assert len(train[0]) == int(0.9 * 1_115_394) == 1_003_854 and len(val[0]) == 111_540
    assert train[0] + val[0] == text
    assert c.num_bytes("train") == 1_003_854 and c.num_chars("val") == 111_540


def test_shakespeare_plays_are_normalised_documents() -> None:
    c = open_corpus("shakespeare")
    train, val = docs(c, "train"), docs(c, "val")
    full = "".join(train) + "".join(val)
    assert sha(full) == "c7c2c695ac765d704e69b117e4d413e3c7dc873d69fa25cc124924c76280175e"
    assert len(train) + len(val) == 42 + 1  # 42 plays, one of them cut by the split
    assert len(split_text(c, "train")) == int(0.9 * len(full))
    assert "\r" not in full and "\n\n\n" not in full and not re.search(r"[ \t]+\n", full)
    assert all(d.endswith("\n\n") for d in train[:-1] + val)
    assert train[0].startswith("ALL'S WELL THAT ENDS WELL")  # modern spelling, sorted by file name
    assert not any(d.startswith("All's Well, that Ends Well") for d in train)  # no folio texts
    assert full.startswith(shakespeare_char_text())
    assert c.num_bytes("train") + c.num_bytes("val") == len(full.encode("utf-8"))


def test_peoples_daily_is_plain_chinese_without_tags() -> None:
    c = open_corpus("peoples-daily")
    train, val = docs(c, "train"), docs(c, "val")
    full = "".join(train) + "".join(val)
    assert sha(full) == "8f9b6e80b89d3511e47bcead4648819281b8f60b7a64e56054f1139d87c4dbbe"
    assert full.startswith("迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）\n")
    assert "１９９８年" in full  # full-width digits are kept
    assert not re.search(r"/[A-Za-z]{1,3}\b", full) and "  " not in full
    assert 2000 < len(train) + len(val) < 4000
    assert all(d.endswith("\n") and "\n\n" not in d for d in train[:-1] + val)
    assert len(split_text(c, "train")) == int(0.9 * len(full))
    assert c.num_bytes("val") == len("".join(val).encode("utf-8"))


def test_builtins_have_a_fixed_split() -> None:
    with pytest.raises(ConfigError, match="fixed split"):
        open_corpus("shakespeare", val_fraction=0.2)


# ---------------------------------------------------------------------------------------------- local files
def test_text_file_split_is_exact_and_defaults_to_ten_percent(tmp_path: Path) -> None:
    text = "".join(f"line {i}: naïve café 中文 😀\n" for i in range(1000))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    c = open_corpus(str(tmp_path / "a.txt"))
    cut = int(0.9 * len(text))
    assert split_text(c, "train") == text[:cut] and split_text(c, "val") == text[cut:]
    assert c.stats["val_fraction"] == 0.1
    assert c.num_bytes("train") == len(text[:cut].encode("utf-8"))
    assert c.num_bytes("val") == len(text[cut:].encode("utf-8"))
    c3 = open_corpus(str(tmp_path / "a.txt"), val_fraction=0.3)
    assert split_text(c3, "val") == text[int(0.7 * len(text)):]


def test_crlf_and_bom_are_normalised_even_across_read_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 3)
    raw = "\ufeffab\r\ncd中\r\n\r\nx😀y\rz".encode()
    (tmp_path / "a.txt").write_bytes(raw)
    c = open_corpus(str(tmp_path / "a.txt"), val_fraction=0.5)
    expected = "ab\ncd中\n\nx😀y\rz"
    assert split_text(c, "train") + split_text(c, "val") == expected
    assert c.stats["replaced_chars"] == 0
    assert max(len(p) for p in c.texts("train")) <= 3


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.text(alphabet=st.sampled_from(list("ab \n中😀é")), max_size=30), min_size=1, max_size=6),
    st.floats(0.01, 0.99),
    st.integers(1, 9),
)
def test_fraction_split_cuts_the_stream_exactly(tmp_path_factory: pytest.TempPathFactory, texts: list[str],
                                                 fraction: float, chunk: int) -> None:
    root = tmp_path_factory.mktemp("frac")
    for i, t in enumerate(texts):
        (root / f"{i:02d}.txt").write_text(t, encoding="utf-8")
    full = "".join(texts)
    old = corpus_mod.CHUNK_BYTES
    corpus_mod.CHUNK_BYTES = chunk
    try:
        cut = int((1 - fraction) * len(full))
        if cut == 0 or cut == len(full):
            with pytest.raises(DataError, match="empty"):
                open_corpus(str(root), val_fraction=fraction)
            return
        c = open_corpus(str(root), val_fraction=fraction)
        assert split_text(c, "train") == full[:cut] and split_text(c, "val") == full[cut:]
        assert "".join(docs(c, "train")) == full[:cut]
        nonempty = [t for t in texts if t]
        assert len(docs(c, "train")) + len(docs(c, "val")) in (len(nonempty), len(nonempty) + 1)
        assert c.num_bytes("train") == len(full[:cut].encode("utf-8"))
        assert c.num_bytes("val") == len(full[cut:].encode("utf-8"))
    finally:
        corpus_mod.CHUNK_BYTES = old


def test_folder_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    root, val_dir = tmp_path / "train", tmp_path / "val"
    for d in (root / "b", root / ".hidden", val_dir):
        d.mkdir(parents=True)
    (root / "b" / "2.txt").write_text("second\n", encoding="utf-8")
    (root / "a.txt").write_text("first\n", encoding="utf-8")
    (root / "c.jsonl").write_text('{"text": "third"}\n{"text": "fourth"}\n', encoding="utf-8")
    (root / ".hidden" / "x.txt").write_text("hidden\n", encoding="utf-8")
    (root / "notes.md").write_text("ignored\n", encoding="utf-8")
    (root / "v.TXT").write_text("upper-case suffix", encoding="utf-8")
    (val_dir / "v.txt").write_text("held out", encoding="utf-8")
    c = open_corpus(str(root), val=str(val_dir))
    assert docs(c, "train") == ["first\n", "second\n", "third", "fourth", "upper-case suffix"]
    assert docs(c, "val") == ["held out"]
    assert c.stats["files"] == 5 and c.num_bytes("val") == 8


def test_documents_can_be_skipped_without_reading_them(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(5)), "utf-8")
    c = open_corpus(str(tmp_path / "d.jsonl"), val_fraction=0.2)
    it = c.documents("train")
    next(it)
    next(it)
    assert "".join(next(it)) == "doc 2"


def test_jsonl_text_field_and_skipped_lines(tmp_path: Path) -> None:
    lines = ['{"body": "one", "id": 1}', "", "   ", '{"body": ""}', '{"body": "two\\r\\nlines"}',
             '{"body": "bad \\ud800 surrogate"}']
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    c = open_corpus(str(tmp_path / "d.jsonl"), text_field="body", val_fraction=0.1)
    assert "".join(docs(c, "train") + docs(c, "val")) == "onetwo\nlinesbad \ufffd surrogate"
    assert c.stats["skipped_lines"] == 2 and c.stats["empty_documents"] == 1 and c.stats["replaced_chars"] == 1


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_jsonl_lines_name_the_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "ok"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: not valid JSON"):
        open_corpus(str(p))
    p.write_text('{"text": "ok"}\n\n{"title": "t", "body": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: no 'text' field \(fields present: 'title', 'body'\)"):
        open_corpus(str(p))
    p.write_text('["a list"]\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 1: expected a JSON object"):
        open_corpus(str(p))
    p.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match="holds int, not a string"):
        open_corpus(str(p))


def test_missing_empty_and_binary_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no such file or folder: .*missing\.txt"):
        open_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        open_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "one.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="train split .* is empty"):
        open_corpus(str(tmp_path / "one.txt"))
    (tmp_path / "v.txt").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="val split .* is empty"):
        open_corpus(str(tmp_path / "one.txt"), val=str(tmp_path / "v.txt"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(DataError, match=r"holds no \.txt or \.jsonl files"):
        open_corpus(str(tmp_path / "sub"))
    (tmp_path / "bin.txt").write_bytes(b"abc" * 100 + b"\x00\x01\x02")
    with pytest.raises(DataError, match=r"bin\.txt looks like a binary file: NUL byte at offset 300"):
        open_corpus(str(tmp_path / "bin.txt"))
    (tmp_path / "u16.jsonl").write_bytes('{"text": "hi"}'.encode("utf-16"))
    with pytest.raises(DataError, match=r"u16\.jsonl looks like a binary file.*UTF-16"):
        open_corpus(str(tmp_path / "u16.jsonl"))


def test_invalid_utf8_is_replaced_counted_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 4)  # valid multi-byte characters straddle read blocks
    (tmp_path / "bad.txt").write_bytes(b"ab\xffcd \xe4\xb8\xad\xe6\x96\x87 \xe4\xb8 x\xfe\xfe end " * 3)
    seen: list[Progress] = []
    c = open_corpus(str(tmp_path / "bad.txt"), progress=seen.append)
    text = split_text(c, "train") + split_text(c, "val")
    assert text == "ab\ufffdcd 中文 \ufffd x\ufffd\ufffd end " * 3
    assert c.stats["replaced_chars"] == 12
    warnings = [p for p in seen if p.message]
    assert len(warnings) == 1 and warnings[0].task == "corpus"
    assert "bad.txt" in warnings[0].message and "12 invalid UTF-8" in warnings[0].message


def test_option_combinations_are_checked(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("some text here", encoding="utf-8")
    a = str(tmp_path / "a.txt")
    with pytest.raises(ConfigError, match="not both"):
        open_corpus(a, val=a, val_fraction=0.1)
    for bad in (0, 1, 0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="between 0 and 1"):
            open_corpus(a, val_fraction=bad)
    with pytest.raises(ConfigError, match="overlap"):
        open_corpus(str(tmp_path), val=a)
    c = open_corpus(a)
    with pytest.raises(ConfigError, match="unknown split"):
        list(c.texts("test"))  # type: ignore[arg-type]


def test_reading_a_large_file_keeps_memory_flat(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    block = shakespeare_char_text()[:1_000_000]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(24):
            f.write(block)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        c = open_corpus(str(path))
        n = sum(len(p) for d in c.documents("train") for p in d) + sum(len(p) for p in c.texts("val"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == size
    assert peak < size / 4, f"peak {peak / 1e6:.1f} MB while reading a {size / 1e6:.0f} MB file"
