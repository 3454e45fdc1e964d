"""Tokenizer training, exact round trips, special-token safety, files loadable by transformers, streaming."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zenlm.tokenizer as tkz
from zenlm.errors import ConfigError, DataError
from zenlm.progress import Progress
from zenlm.tokenizer import SPECIAL_TOKENS, Tokenizer, split_text, train_tokenizer

# every code point, lone surrogates included (st.text would drop the surrogates of a mixed alphabet)
ANY_CHAR = st.one_of(st.characters(codec=None), st.characters(categories=["Cs"]))
ANY_TEXT = st.lists(ANY_CHAR, max_size=80).map("".join)


def without_surrogates(s: str) -> str:
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in s)


@pytest.fixture(params=["bpe", "wordpiece", "char"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tok")


# ---------------------------------------------------------------------------------------------- round trips
@settings(max_examples=200, deadline=None)
@given(ANY_TEXT)
def test_bpe_round_trip_is_exact_for_every_string(bpe_tok: Tokenizer, s: str) -> None:
    assert bpe_tok.decode(bpe_tok.encode(s)) == without_surrogates(s)
    assert bpe_tok.decode(bpe_tok.encode(s, allow_special=True)) == without_surrogates(s)


def test_the_round_trip_strategy_produces_lone_surrogates() -> None:
    found = []

    @settings(max_examples=100, deadline=None, database=None)
    @given(ANY_TEXT)
    def probe(s: str) -> None:
        found.append(any(0xD800 <= ord(c) <= 0xDFFF for c in s))

    probe()
    assert sum(found) > 10


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["<|eos|>", "<|bos|>", "<|", "|>", "eos", " ", "\n", "中", "😀", "\x00"]), max_size=12))
def test_bpe_round_trip_with_special_token_strings(bpe_tok: Tokenizer, parts: list[str]) -> None:
    s = "".join(parts)
    ids = bpe_tok.encode(s)
    assert bpe_tok.decode(ids) == s
    assert not set(ids) & bpe_tok.special_ids


def test_bpe_round_trip_of_awkward_strings(bpe_tok: Tokenizer) -> None:
    for s in ["", " ", "  leading and trailing  ", "\x00\x01\x7f\r\n\t", "a\u200bb\ufeff", "中文 😀 ñ ǅ 𝔘",
              "don't  ,  . spaced ' s", "x" * 5000, "\ufffd", "e\u0301 vs \u00e9", "\U0010ffff"]:
        assert bpe_tok.decode(bpe_tok.encode(s)) == s
    assert bpe_tok.decode(bpe_tok.encode("a\ud800b\udfff")) == "a\ufffdb\ufffd"


def test_decode_does_not_clean_up_spaces(bpe_tok: Tokenizer, wordpiece_tok: Tokenizer) -> None:
    s = "Hello , world . It ' s here !"
    assert bpe_tok.decode(bpe_tok.encode(s)) == s
    # WordPiece joins words with one space; "cleanup" would have glued " ," and " ." to the word before
    assert wordpiece_tok.decode(wordpiece_tok.encode(s)) == s


def test_char_round_trip_and_vocabulary_order(char_tok: Tokenizer, sample_text: str) -> None:
    chars = sorted(set(sample_text))
    assert [char_tok.token_to_id(c) for c in chars] == list(range(len(chars)))
    assert [char_tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(chars), len(chars) + 5))
    assert char_tok.vocab_size == len(chars) + 5
    assert "\n" in chars and char_tok.encode("\n\n") == [char_tok.token_to_id("\n")] * 2
    s = "To be, or not to be:\nthat is 中文 😀"
    assert len(char_tok.encode(s)) == len(s)
    assert char_tok.decode(char_tok.encode(s)) == s
    assert char_tok.encode("\x00§") == [char_tok.unk_id] * 2  # unseen characters


def test_char_fast_path_matches_the_library_pipeline(char_tok: Tokenizer, sample_text: str) -> None:
    assert char_tok._char_vocab is not None  # the per-character lookup is in use
    s = sample_text[:5000] + "unseen: \x00§ <|eos|>\r\n"
    assert char_tok.encode(s, allow_special=True) == char_tok.hf.encode(s, add_special_tokens=False).ids
    plain = s.replace("<|eos|>", "")
    assert char_tok.encode(plain) == char_tok.hf.encode(plain, add_special_tokens=False).ids


def test_char_vocab_size_caps_rare_characters() -> None:
    text = "a" * 50 + "b" * 40 + "c" * 30 + "d" * 2 + "e"
    progress: list[Progress] = []
    tok = train_tokenizer([text], kind="char", vocab_size=8, progress=progress.append)
    assert tok.vocab_size == 8
    assert [tok.token_to_id(c) for c in "abc"] == [0, 1, 2]
    assert tok.encode("de") == [tok.unk_id, tok.unk_id]
    assert any(p.message and "do not fit" in p.message for p in progress)


def test_wordpiece_keeps_case_and_splits_chinese(wordpiece_tok: Tokenizer) -> None:
    assert wordpiece_tok.decode(wordpiece_tok.encode("KING LEAR and Hamlet")) == "KING LEAR and Hamlet"
    assert wordpiece_tok.decode(wordpiece_tok.encode("中文")) == "中 文"
    assert wordpiece_tok.encode("ⱷⱷⱷ") == [wordpiece_tok.unk_id]


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_long_texts_are_split_without_changing_ids(kind: str, request: pytest.FixtureRequest,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    tok: Tokenizer = request.getfixturevalue(f"{kind}_tok")
    rng = random.Random(0)
    alphabet = list("ab cd\n\n  \t\r'sxyz.,!中文😀\x1c\u3000\u00a0\u2028") + ["don't", "<|eos|>"]
    text = "".join(rng.choice(alphabet) for _ in range(20_000))
    monkeypatch.setattr(tkz, "CHUNK_CHARS", 37)
    assert len(split_text(text, 37)) > 100
    assert tok.encode(text, allow_special=True) == tok.hf.encode(text, add_special_tokens=False).ids


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \n\t中'.")), max_size=60), st.integers(1, 10))
def test_split_text_joins_back_and_cuts_before_space(text: str, size: int) -> None:
    pieces = split_text(text, size)
    assert "".join(pieces) == text
    assert all(pieces)
    for p in pieces[1:]:
        assert p[0] in " \n" and (p[1].isalnum() or p[1] == "_")
    for p in pieces[:-1]:
        assert len(p) >= size


def test_a_million_characters_encode_quickly(bpe_tok: Tokenizer, sample_text: str) -> None:
    text = (sample_text * 6)[:1_000_000]
    t0 = time.perf_counter()
    ids = bpe_tok.encode(text)
    elapsed = time.perf_counter() - t0
    assert bpe_tok.decode(ids) == text
    assert len(ids) < len(text) / 2
    assert elapsed < 10, f"1M characters took {elapsed:.1f} s"


def test_encode_batch_equals_encode(tok: Tokenizer) -> None:
    texts = ["first text", "", "second <|eos|> text", "中文 😀"]
    for allow in (False, True):
        assert tok.encode_batch(texts, allow_special=allow) == [tok.encode(t, allow_special=allow) for t in texts]


# ---------------------------------------------------------------------------------------------- special tokens
def test_special_token_text_is_plain_text_unless_allowed(tok: Tokenizer) -> None:
    text = "hi <|eos|> there<|bos|>"
    plain = tok.encode(text)
    assert tok.eos_id not in plain and tok.bos_id not in plain
    assert not set(plain) & (tok.special_ids - {tok.unk_id})  # unk: characters the small vocab never saw
    eos_plain = tok.encode("<|eos|>")
    assert len(eos_plain) > 1 and tok.eos_id not in eos_plain
    assert tok.encode("<|eos|>", allow_special=True) == [tok.eos_id]
    allowed = tok.encode(text, allow_special=True)
    assert allowed.count(tok.eos_id) == 1 and allowed.count(tok.bos_id) == 1


def test_special_ids_and_skip_special(tok: Tokenizer) -> None:
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.mask_id) == tuple(ids.values())
    assert tok.special_ids == frozenset(ids.values())
    body = tok.encode("abc")
    assert tok.decode([tok.bos_id, *body, tok.eos_id], skip_special=True) == tok.decode(body)
    assert tok.decode([tok.bos_id, *body, tok.eos_id]).startswith("<|bos|>")


# ---------------------------------------------------------------------------------------------- training
def test_training_reports_progress_and_checks_settings(sample_text: str) -> None:
    seen: list[Progress] = []
    train_tokenizer([sample_text[:20_000]], kind="bpe", vocab_size=300, progress=seen.append)
    messages = [p.message for p in seen if p.message]
    assert all(p.task == "tokenizer" for p in seen)
    assert "training a bpe tokenizer" in messages[0] and "trained" in messages[-1]
    with pytest.raises(ConfigError, match="at least 261"):
        train_tokenizer(["abc"], kind="bpe", vocab_size=260)
    with pytest.raises(ConfigError, match="no room"):
        train_tokenizer(["abc"], kind="wordpiece", vocab_size=5)
    with pytest.raises(ConfigError, match="unknown tokenizer kind"):
        train_tokenizer(["abc"], kind="sentencepiece")
    with pytest.raises(ConfigError, match="<\\|unk\\|>"):
        train_tokenizer(["abc"], kind="char", special_tokens=["<|eos|>"])
    for kind in ("bpe", "wordpiece", "char"):
        with pytest.raises(DataError, match="empty"):
            train_tokenizer(iter([]), kind=kind, vocab_size=300)


def test_bpe_every_byte_is_in_the_vocabulary(bpe_tok: Tokenizer) -> None:
    tok = train_tokenizer(["aaaa bbbb"], kind="bpe", vocab_size=300)
    assert tok.vocab_size >= 256 + len(SPECIAL_TOKENS)
    s = "".join(map(chr, range(1, 300))) + "\x00中😀"
    assert tok.decode(tok.encode(s)) == s
    assert tok.unk_id not in tok.encode(s)


# ---------------------------------------------------------------------------------------------- files
def test_save_and_load_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["zenlm_kind"] == tok.kind
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"], cfg["mask_token"]) == tuple(
        SPECIAL_TOKENS)
    assert isinstance(cfg["model_max_length"], int) and "bos_token" in cfg["chat_template"]
    s = "Hello <|eos|> 中文\n"
    for src in (tmp_path / "t", tmp_path / "t" / "tokenizer.json"):
        loaded = Tokenizer.load(src)
        assert loaded.kind == tok.kind and loaded.vocab_size == tok.vocab_size
        assert loaded.encode(s) == tok.encode(s) and loaded.eos_id == tok.eos_id


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="has no tokenizer.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(DataError, match="no such tokenizer file"):
        Tokenizer.load(tmp_path / "nope.json")
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_transformers_loads_the_files_unchanged(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tok.save(tmp_path)
    texts = ["To be, or not to be", "Hello 中文 😀\n\n  x", "a <|eos|> b"]
    for hf in (PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json")),
               PreTrainedTokenizerFast.from_pretrained(str(tmp_path))):
        for t in texts:
            # transformers always matches special-token text; compare with allow_special=True
            ids = hf.encode(t, add_special_tokens=False)
            assert ids == tok.encode(t, allow_special=True)
            assert hf.decode(ids) == tok.decode(ids)
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id, hf.mask_token_id) == (
        tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.mask_id)
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|bos|>user:\nhi<|eos|>\nassistant:\n"


# ---------------------------------------------------------------------------------------------- streaming
def stream(tok: Tokenizer, ids: list[int], **kw: bool) -> list[str]:
    dec = tok.stream_decoder(**kw)
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_stream_decoder_never_emits_half_characters(bpe_tok: Tokenizer) -> None:
    text = "Chinese 中文文本, emoji 😀🚀👍🏽, accents ñé — done."
    ids = bpe_tok.encode(text)
    pieces = stream(bpe_tok, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0  # multi-byte characters were held back at least once


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_stream_decoder_concatenation_equals_decode(
    bpe_tok: Tokenizer, wordpiece_tok: Tokenizer, char_tok: Tokenizer, data: st.DataObject,
) -> None:
    tok = data.draw(st.sampled_from([bpe_tok, wordpiece_tok, char_tok]))
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    skip = data.draw(st.booleans())
    assert "".join(stream(tok, ids, skip_special=skip)) == tok.decode(ids, skip_special=skip)


def test_stream_decoder_keeps_word_spacing_across_skipped_specials(wordpiece_tok: Tokenizer) -> None:
    a, b = wordpiece_tok.encode("the"), wordpiece_tok.encode("king")
    ids = a + [wordpiece_tok.pad_id] * 10 + b + [wordpiece_tok.eos_id]
    assert "".join(stream(wordpiece_tok, ids, skip_special=True)) == "the king"
    assert "".join(stream(wordpiece_tok, ids)) == wordpiece_tok.decode(ids)


def test_stream_decoder_work_per_token_is_bounded(bpe_tok: Tokenizer, sample_text: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ids = bpe_tok.encode(sample_text[:20_000])
    lengths: list[int] = []
    real = Tokenizer.decode

    def spy(self: Tokenizer, ids: list[int], **kw: bool) -> str:
        lengths.append(len(ids))
        return real(self, ids, **kw)

    monkeypatch.setattr(Tokenizer, "decode", spy)
    dec = bpe_tok.stream_decoder()
    out = "".join(dec.push(i) for i in ids) + dec.flush()
    monkeypatch.undo()
    assert out == sample_text[:20_000]
    assert max(lengths) <= 8
