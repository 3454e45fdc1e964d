"""Word vectors: word2vec training and evaluation, vector files in every format (and bad ones), vocabulary
coverage and embedding initialisation, the word-level tokenizer, the segmented People's Daily, the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from zenlm.cli import main
from zenlm.data.corpus import open_corpus
from zenlm.data.shards import TokenShards, prepare
from zenlm.errors import ConfigError, DataError
from zenlm.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from zenlm.wordvec import (
    CorpusSentences,
    Word2VecSettings,
    evaluate_vectors,
    init_embeddings,
    read_vectors,
    save_vectors,
    train_word2vec,
    vector_format,
    vocabulary_coverage,
)

MALE = ["boy", "brother", "father", "king", "man", "son", "husband", "prince"]
FEMALE = ["girl", "sister", "mother", "queen", "woman", "daughter", "wife", "princess"]
OTHER = ["cabbage", "rook", "lad", "kid", "parent", "uncle", "guardian", "secretary", "the", "and", "a"]


def _text(lines: int = 300, seed: int = 0) -> str:
    """A small English text built from words of the analogy and similarity test sets."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        i = rng.randrange(len(MALE))
        out.append(f"The {MALE[i]} and the {FEMALE[i]} saw a {rng.choice(OTHER)}, {rng.choice(MALE)} "
                   f"{rng.choice(FEMALE)}!")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wv") / "words.txt"
    path.write_text(_text(), encoding="utf-8")
    return path


SMALL = Word2VecSettings(dim=8, min_count=1, epochs=2, window=3, seed=1)


@pytest.fixture(scope="module")
def kv(corpus_file: Path):
    return train_word2vec(CorpusSentences(str(corpus_file)), SMALL)


def test_word2vec_trains_reproducibly_and_evaluates_in_range(corpus_file: Path, kv) -> None:
    again = train_word2vec(CorpusSentences(str(corpus_file)), SMALL)
    assert again.index_to_key == kv.index_to_key and np.array_equal(again.vectors, kv.vectors)
    assert set(MALE + FEMALE) <= set(kv.key_to_index) and "The" not in kv.key_to_index  # lowercased
    cbow = train_word2vec(CorpusSentences(str(corpus_file)), Word2VecSettings(**{**SMALL.__dict__,
                                                                               "method": "cbow"}))
    assert not np.array_equal(cbow.vectors, kv.vectors)
    r = evaluate_vectors(kv)
    a = r["analogy"]
    assert 0 < a["questions"] < a["total"] == 19544 and 0.0 <= a["accuracy"] <= 1.0
    for name in ("wordsim353", "simlex999"):
        s = r[name]
        assert -1.0 <= s["spearman"] <= 1.0 and -1.0 <= s["pearson"] <= 1.0 and 0.0 < s["oov"] < 1.0
    assert r["vocab_size"] == len(kv) and r["dim"] == 8
    assert set(r["neighbours"]) == {"king"}  # the probe words in the vocabulary
    assert len(r["neighbours"]["king"]) == 5 and all(-1 <= s <= 1 for _, s in r["neighbours"]["king"])


def test_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="method"):
        Word2VecSettings(method="glove")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="dim"):
        Word2VecSettings(dim=0)
    (tmp_path / "t.txt").write_text("one two three\n" * 3)
    with pytest.raises(DataError, match="min_count"):
        train_word2vec(CorpusSentences(str(tmp_path / "t.txt")), Word2VecSettings(min_count=50))


def test_vector_files_in_every_format_read_back(kv, tmp_path: Path) -> None:
    binary = save_vectors(kv, tmp_path / "out", {"corpus": "test"})
    assert json.loads((tmp_path / "out" / "wordvec.json").read_text()) == {"corpus": "test"}
    kv.save_word2vec_format(str(tmp_path / "w2v.txt"))  # word2vec text = fastText .vec
    with open(tmp_path / "glove.txt", "w", encoding="utf-8") as f:  # GloVe: no header line
        for word in kv.index_to_key:
            f.write(word + " " + " ".join(f"{x:.6f}" for x in kv[word]) + "\n")
    expected = {binary: (True, True), tmp_path / "w2v.txt": (False, True), tmp_path / "glove.txt": (False, False)}
    for path, (is_binary, header) in expected.items():
        assert vector_format(path) == {"binary": is_binary, "header": header, "dim": 8}
        back = read_vectors(path)
        assert back.index_to_key == kv.index_to_key
        np.testing.assert_allclose(back.vectors, kv.vectors, atol=1e-6)
    assert len(read_vectors(binary, limit=5)) == 5


def test_bad_vector_files_are_refused_with_the_reason(kv, tmp_path: Path) -> None:
    binary = save_vectors(kv, tmp_path / "out", {})
    cases = {
        "empty.txt": (b"", "is empty"),
        "model.kv": (b"\x80\x04\x95" + b"\x00" * 40, "pickle"),
        "vectors.npy": (b"\x93NUMPY\x01\x00" + b"\x00" * 40, "pickle or numpy"),
        "notes.txt": (b"hello world\nthis is text\n", "not a word-vector file"),
        "truncated.bin": (binary.read_bytes()[:-50], "could not be read as a binary word2vec"),
        "short.txt": (b"2 3\nking 0.1 0.2 0.3\nqueen 0.1 0.2\n", "could not be read as a word2vec text"),
        "zero.txt": (b"0 3\n", "nothing to read"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError, match=message):
            read_vectors(tmp_path / name)
    with pytest.raises(DataError, match="no such word-vector file"):
        read_vectors(tmp_path / "missing.vec")


def test_word_tokenizer(tmp_path: Path) -> None:
    tok = train_tokenizer([_text()], kind="word", vocab_size=200, min_frequency=1)
    assert tok.kind == "word" and tok.special_tokens == SPECIAL_TOKENS
    ids = tok.encode("The king and the zebra!")
    assert len(ids) == 6 and ids[4] == tok.unk_id  # "!" is a token, "zebra" is unknown
    assert tok.decode(ids) == "The king and the <|unk|> !"
    assert tok.eos_id not in tok.encode("king <|eos|>") and tok.encode("<|eos|>", allow_special=True) == [
        tok.eos_id]
    tok.save(tmp_path / "tok")
    back = Tokenizer.load(tmp_path / "tok")
    assert back.kind == "word" and back.encode("The queen, a girl.") == tok.encode("The queen, a girl.")
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert hf("The queen, a girl.")["input_ids"] == tok.encode("The queen, a girl.")
    # shards of word ids: a long document is encoded in pieces with the same ids as whole
    (tmp_path / "c.txt").write_text(_text(1500, seed=1), encoding="utf-8")
    prepare(open_corpus(str(tmp_path / "c.txt")), tok, tmp_path / "data")
    train = TokenShards.open(tmp_path / "data", "train")
    text = "".join(open_corpus(str(tmp_path / "c.txt")).texts("train"))
    assert train.window(0, len(train)).tolist() == tok.encode(text) + [tok.eos_id]


def test_coverage_and_embedding_initialisation(kv, tmp_path: Path) -> None:
    tok = train_tokenizer(["The King and the queen met a zebra .\n" * 3], kind="word", vocab_size=50,
                          min_frequency=1)
    cov = vocabulary_coverage(tok, kv)
    words = tok.vocab_size - len(SPECIAL_TOKENS)  # The King and the queen met a zebra .
    assert cov.words == words == 9
    assert cov.exact == 4 and cov.lowercased == 2  # the, and, queen, a; The and King in lowercase
    assert set(cov.missing_examples) == {"met", "zebra", "."} and cov.fraction == pytest.approx(6 / 9)
    assert "6 of 9" in cov.line() and "'zebra'" in cov.line()
    weight = torch.randn(tok.vocab_size + 3, 8) * 0.1
    before = weight.clone()
    init_embeddings(weight, tok, kv, scale="none")
    assert torch.equal(weight[tok.token_to_id("King")], torch.tensor(kv["king"]))
    assert torch.equal(weight[tok.token_to_id("zebra")], before[tok.token_to_id("zebra")])
    assert torch.equal(weight[tok.eos_id], before[tok.eos_id])
    matched = before.clone()
    init_embeddings(matched, tok, kv, scale="match")
    ratio = matched[tok.token_to_id("queen")] / torch.tensor(kv["queen"])
    assert torch.allclose(ratio, ratio[0].expand(8))  # one factor for all copied vectors
    with pytest.raises(ConfigError, match="8-dimensional"):
        init_embeddings(torch.zeros(tok.vocab_size, 16), tok, kv)
    with pytest.raises(ConfigError, match="fewer than"):
        init_embeddings(torch.zeros(3, 8), tok, kv)


def test_peoples_daily_comes_segmented() -> None:
    words = next(iter(CorpusSentences("peoples-daily")))
    assert words[:6] == ["迈向", "充满", "希望", "的", "新", "世纪"] and "——" not in words
    seg, plain = open_corpus("peoples-daily-words"), open_corpus("peoples-daily")
    seg_text = "".join(seg.texts("train")) + "".join(seg.texts("val"))
    assert seg_text.replace(" ", "") == "".join(plain.texts("train")) + "".join(plain.texts("val"))
    assert seg.stats["documents"] == plain.stats["documents"]


def test_cli(corpus_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "vec"
    assert main(["wordvec", "train", "--corpus", str(corpus_file), "--out", str(out), "--dim", "8",
                 "--min-count", "1", "--epochs", "1", "--method", "cbow"]) == 0
    report = json.loads((out / "wordvec.json").read_text())
    assert report["settings"]["method"] == "cbow" and report["evaluation"]["dim"] == 8
    assert "Google analogies: accuracy" in capsys.readouterr().out
    assert main(["wordvec", "eval", str(out / "vectors.bin"), "--neighbours", "queen", "--json-out"]) == 0
    assert list(json.loads(capsys.readouterr().out)["neighbours"]) == ["queen"]
    tok = train_tokenizer([_text()], kind="word", vocab_size=100, min_frequency=1)
    tok.save(tmp_path / "tok")
    assert main(["wordvec", "coverage", str(out), "--tokenizer", str(tmp_path / "tok")]) == 0
    assert "vectors cover" in capsys.readouterr().out
    assert main(["wordvec"]) == 2 and "coverage" in capsys.readouterr().out  # the group's own help
    (tmp_path / "bad.vec").write_text("not vectors at all\n")
    assert main(["wordvec", "eval", str(tmp_path / "bad.vec")]) == 2
    assert "zenlm: error:" in capsys.readouterr().err
