"""Token shards: exact contents, file layout, refusal of bad files, safe overwrite, progress, flat memory."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import zenlm.data.corpus as corpus_mod
import zenlm.data.shards as shards_mod
import zenlm.tokenizer as tkz
from zenlm.data.corpus import open_corpus
from zenlm.data.shards import HEADER_BYTES, TokenShards, load_index, prepare
from zenlm.errors import DataError
from zenlm.progress import Progress
from zenlm.tokenizer import Tokenizer, train_tokenizer


def all_ids(data: Path, split: str) -> np.ndarray:
    s = TokenShards.open(data, split)
    return s.window(0, len(s))


def test_shakespeare_char_token_counts_are_exact(tmp_path: Path) -> None:
    c = open_corpus("shakespeare-char")
    tok = train_tokenizer(c.texts("train"), kind="char")
    index = prepare(c, tok, tmp_path)
    n = 1_115_394
    assert index["splits"]["train"]["tokens"] == int(0.9 * n) + 1
    assert index["splits"]["val"]["tokens"] == n - int(0.9 * n) + 1
    assert index["splits"]["train"]["bytes"] == int(0.9 * n) and index["splits"]["val"]["documents"] == 1
    train = all_ids(tmp_path, "train")
    text = "".join(c.texts("train"))
    assert train[-1] == tok.eos_id and (train[:-1] != tok.eos_id).all()
    assert train[:-1].tolist() == tok.encode(text)
    val = all_ids(tmp_path, "val")
    assert val[-1] == tok.eos_id and len(val) == len("".join(c.texts("val"))) + 1


def test_layout_of_a_shard_file(char_data: Path) -> None:
    index = load_index(char_data)
    name = index["splits"]["train"]["shards"][0]
    raw = (char_data / name).read_bytes()
    magic, version, itemsize, count = struct.unpack("<8sIIQ", raw[:24])
    assert (magic, version, itemsize) == (b"ZENLMTOK", 1, 2) and raw[24:32] == bytes(8)
    assert count == index["splits"]["train"]["shard_sizes"][0] == 10_000
    assert len(raw) == HEADER_BYTES + 2 * count
    ids = np.frombuffer(raw[32:], dtype="<u2")
    assert ids.tolist() == TokenShards.open(char_data, "train").window(0, count).tolist()


def test_index_fields_and_tokenizer_copy(char_data: Path, char_tok: Tokenizer, sample_text: str) -> None:
    index = load_index(char_data)
    assert index["format"] == "zenlm-shards" and index["version"] == 1 and index["dtype"] == "uint16"
    assert index["vocab_size"] == char_tok.vocab_size and index["tokenizer"] == "tokenizer.json"
    assert index["eos_id"] == char_tok.eos_id and index["tokenizer_kind"] == "char"
    assert index["corpus"].endswith("sample.txt") and "T" in index["created"]
    assert index["text_bytes"] == len(sample_text.encode("utf-8"))
    for split in ("train", "val"):
        info = index["splits"][split]
        assert set(info) >= {"tokens", "bytes", "documents", "shards"}
        assert sum(info["shard_sizes"]) == info["tokens"] == len(TokenShards.open(char_data, split))
        assert info["shards"] == [f"{split}-{i:05d}.bin" for i in range(len(info["shards"]))]
        assert all(n == 10_000 for n in info["shard_sizes"][:-1])
    assert len(index["splits"]["train"]["shards"]) == 19
    assert Tokenizer.load(char_data).encode("To be") == char_tok.encode("To be")
    assert not list(char_data.glob("*.tmp"))


def test_windows_cross_shard_boundaries(char_data: Path, char_tok: Tokenizer, sample_text: str) -> None:
    train = TokenShards.open(char_data, "train")
    expected = np.array(char_tok.encode(sample_text[: int(0.9 * len(sample_text))]) + [char_tok.eos_id])
    assert len(train) == len(expected)
    for start, length in [(0, 10), (9_995, 10), (9_990, 30_000), (len(train) - 7, 7), (123, 0)]:
        w = train.window(start, length)
        assert w.dtype == np.int64 and w.tolist() == expected[start:start + length].tolist()
    with pytest.raises(IndexError):
        train.window(len(train) - 3, 4)


def test_every_document_ends_with_eos_and_matches_whole_encoding(
    tmp_path: Path, bpe_tok: Tokenizer, sample_text: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # tiny slices and batches force many cuts inside documents; the ids must not change
    monkeypatch.setattr(shards_mod, "SLICE_CHARS", 50)
    monkeypatch.setattr(shards_mod, "BATCH_CHARS", 300)
    monkeypatch.setattr(tkz, "CHUNK_CHARS", 20)
    docs = [sample_text[i * 3000:(i + 1) * 3000] for i in range(6)] + ["中文 <|eos|> 😀", "x" * 500]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    val_text = sample_text[:20_000]
    (tmp_path / "v.txt").write_text(val_text, encoding="utf-8")
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 777)  # the corpus hands out pieces cut anywhere
    c = open_corpus(str(tmp_path / "d.jsonl"), val=str(tmp_path / "v.txt"))
    assert len(list(c.texts("val"))) > 20
    index = prepare(c, bpe_tok, tmp_path / "out", shard_tokens=333)
    assert index["splits"]["train"]["documents"] == len(docs)
    ids = all_ids(tmp_path / "out", "train").tolist()
    expected: list[int] = []
    for d in docs:
        expected += bpe_tok.encode(d) + [bpe_tok.eos_id]
    assert ids == expected
    assert ids.count(bpe_tok.eos_id) == len(docs)
    assert all_ids(tmp_path / "out", "val").tolist() == bpe_tok.encode(val_text) + [bpe_tok.eos_id]


def test_text_without_cut_points_is_still_encoded(tmp_path: Path, bpe_tok: Tokenizer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards_mod, "SLICE_CHARS", 50)
    monkeypatch.setattr(shards_mod, "HARD_LIMIT_CHARS", 300)
    monkeypatch.setattr(corpus_mod, "CHUNK_BYTES", 100)
    doc = "中文" * 1000 + " end"
    (tmp_path / "a.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "b.txt").write_text("short", encoding="utf-8")
    longest = [0]
    real = Tokenizer.encode_batch

    def spy(self: Tokenizer, texts: list[str], **kw: bool) -> list[list[int]]:
        longest[0] = max([longest[0], *map(len, texts)])
        return real(self, texts, **kw)

    monkeypatch.setattr(Tokenizer, "encode_batch", spy)
    prepare(open_corpus(str(tmp_path / "a.txt"), val=str(tmp_path / "b.txt")), bpe_tok, tmp_path / "out")
    assert 300 <= longest[0] < 500  # the slice was cut at the hard limit, not held whole
    ids = all_ids(tmp_path / "out", "train").tolist()
    assert ids[-1] == bpe_tok.eos_id and bpe_tok.eos_id not in ids[:-1]
    assert bpe_tok.decode(ids[:-1]) == doc


def test_large_vocabularies_use_uint32(tmp_path: Path) -> None:
    chars = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c <= 0xDFFF)
    tok = train_tokenizer([chars], kind="char", vocab_size=80_000)
    assert tok.vocab_size > 65_536
    (tmp_path / "t.txt").write_text(chars[-20:] * 10, encoding="utf-8")
    index = prepare(open_corpus(str(tmp_path / "t.txt")), tok, tmp_path / "out")
    assert index["dtype"] == "uint32"
    shard = (tmp_path / "out" / "train-00000.bin").read_bytes()
    assert struct.unpack("<I", shard[12:16])[0] == 4
    ids = all_ids(tmp_path / "out", "train")
    assert ids.max() > 65_535 and tok.decode(ids[:-1].tolist()) == (chars[-20:] * 10)[:180]


def test_progress_reports_bytes_and_speed(tmp_path: Path, char_tok: Tokenizer, sample_text: str) -> None:
    (tmp_path / "a.txt").write_text(sample_text, encoding="utf-8")
    seen: list[Progress] = []
    prepare(open_corpus(str(tmp_path / "a.txt")), char_tok, tmp_path / "out", progress=seen.append)
    counts = [p for p in seen if p.message is None]
    assert counts and all(p.task == "prepare" and p.unit == "B" for p in counts)
    last = counts[-1]
    assert last.done == last.total == len(sample_text.encode("utf-8"))
    assert last.info["MB/s"] > 0 and last.info["tokens"] == len(sample_text) + 2
    assert any(p.message and "written to" in p.message for p in seen)


# ---------------------------------------------------------------------------------------------- directories
def test_previous_data_dir_is_replaced_and_foreign_dirs_refused(
    tmp_path: Path, char_tok: Tokenizer, sample_text: str,
) -> None:
    (tmp_path / "a.txt").write_text(sample_text, encoding="utf-8")
    c = open_corpus(str(tmp_path / "a.txt"))
    out = tmp_path / "out"
    prepare(c, char_tok, out, shard_tokens=20_000)
    assert (out / "train-00009.bin").exists()
    (out / "train-00042.bin.tmp").write_bytes(b"left over from a crash")
    index = prepare(c, char_tok, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json", "tokenizer.json", "tokenizer_config.json", "train-00000.bin", "val-00000.bin"]
    assert index["splits"]["train"]["shards"] == ["train-00000.bin"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious", encoding="utf-8")
    with pytest.raises(DataError, match=r"not a zenlm data directory \(it holds thesis.tex\)"):
        prepare(c, char_tok, foreign)
    assert (foreign / "thesis.tex").read_text(encoding="utf-8") == "precious"
    assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="is not a directory"):
        prepare(c, char_tok, tmp_path / "file")
    other = tmp_path / "other"
    other.mkdir()
    (other / "index.json").write_text('{"format": "something-else"}', encoding="utf-8")
    with pytest.raises(DataError, match="not a zenlm data directory"):
        prepare(c, char_tok, other)


def test_a_failed_prepare_leaves_no_index_and_no_temp_files(
    tmp_path: Path, char_tok: Tokenizer, sample_text: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "a.txt").write_text(sample_text, encoding="utf-8")
    c = open_corpus(str(tmp_path / "a.txt"))
    out = tmp_path / "out"
    prepare(c, char_tok, out)
    calls = {"n": 0}
    real = Tokenizer.encode_batch

    def failing(self: Tokenizer, texts: list[str], **kw: bool) -> list[list[int]]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("disk full")
        return real(self, texts, **kw)

    monkeypatch.setattr(Tokenizer, "encode_batch", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare(c, char_tok, out)
    assert not (out / "index.json").exists() and not list(out.glob("*.tmp"))
    with pytest.raises(DataError, match="zenlm prepare"):
        TokenShards.open(out, "train")
    monkeypatch.undo()
    prepare(c, char_tok, out)  # a half-written directory of our own is taken over again
    assert len(TokenShards.open(out, "val")) > 0


# ---------------------------------------------------------------------------------------------- bad files
@pytest.fixture
def data_copy(char_data: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    out.mkdir()
    for p in char_data.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


def test_missing_index_says_to_run_prepare(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"has no index.json; run `zenlm prepare"):
        TokenShards.open(tmp_path, "train")
    with pytest.raises(DataError, match="does not exist"):
        load_index(tmp_path / "nope")
    (tmp_path / "index.json").write_text("{", encoding="utf-8")
    with pytest.raises(DataError, match="not valid JSON"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text('{"format": "other"}', encoding="utf-8")
    with pytest.raises(DataError, match="not a zenlm shard index"):
        load_index(tmp_path)


def test_truncated_shard_is_refused_with_its_name(data_copy: Path) -> None:
    shard = data_copy / "train-00003.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError) as e:
        TokenShards.open(data_copy, "train")
    assert str(e.value) == (f"{shard} is truncated: header says 10000 tokens but file holds 9995; "
                            "re-run zenlm prepare.")
    shard.write_bytes(b"ZENLMT")
    with pytest.raises(DataError, match="train-00003.bin is truncated"):
        TokenShards.open(data_copy, "train")


def test_foreign_and_inconsistent_shards_are_refused(data_copy: Path) -> None:
    shard = data_copy / "val-00000.bin"
    good = shard.read_bytes()
    cases = {
        b"PK\x03\x04 a zip file, not ours" * 3: "val-00000.bin is not a zenlm token shard",
        good[:8] + struct.pack("<I", 2) + good[12:]: "format version 2",
        good[:12] + struct.pack("<I", 3) + good[16:]: "invalid id size 3",
        good + b"\x00\x00": "val-00000.bin is corrupt: header says",
        good[:12] + struct.pack("<I", 4) + good[16:]: "is truncated",
    }
    for content, message in cases.items():
        shard.write_bytes(content)
        with pytest.raises(DataError, match=message):
            TokenShards.open(data_copy, "val")
    shard.unlink()
    with pytest.raises(DataError, match="val-00000.bin is missing"):
        TokenShards.open(data_copy, "val")
    index = json.loads((data_copy / "index.json").read_text(encoding="utf-8"))
    index["splits"]["train"]["tokens"] += 1
    (data_copy / "index.json").write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(DataError, match="index.json says"):
        TokenShards.open(data_copy, "train")
    with pytest.raises(DataError, match="no split 'test'"):
        TokenShards.open(data_copy, "test")


# ---------------------------------------------------------------------------------------------- memory
MEMORY_PROBE = textwrap.dedent("""
    import resource, sys
    from zenlm.data.corpus import open_corpus
    from zenlm.data.shards import prepare
    from zenlm.tokenizer import train_tokenizer

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    path, out = sys.argv[1], sys.argv[2]
    tok = train_tokenizer([open(path, encoding="utf-8").read(100_000)], kind="char")
    corpus = open_corpus(path)
    before = max(rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    index = prepare(corpus, tok, out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak - before, index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"])
""")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read the resident set size")
def test_prepare_memory_stays_flat(tmp_path: Path, sample_text: str) -> None:
    path = tmp_path / "big.txt"
    block = sample_text[:200_000]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(160):  # about 32 MB
            f.write(block)
    size = path.stat().st_size
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    growth, tokens = map(int, r.stdout.split())
    assert tokens == len(block) * 160 + 2
    assert growth < size / 4, f"peak memory grew by {growth / 1e6:.1f} MB for a {size / 1e6:.0f} MB corpus"
