"""Short sentences from a corpus: the data of the sentence VAE and of SeqGAN's real-text experiment.

Both models read one sentence at a time (the VAE encodes it into one vector; SeqGAN's discriminator judges it
whole), so their data is a list of short sentences rather than a stream of tokens::

    en:  blank-line paragraphs -> speaker names ("ROMEO.") and stage directions ("[Exit.]") dropped ->
         lines joined -> cut after . ! ? -> lowercased -> kept when it has min_len..max_len words
    zh:  lines -> cut after 。！？； -> kept when it has min_len..max_len characters

Sentences are read from one split of a :class:`~zenlm.data.corpus.Corpus`, so the validation sentences of a
built-in corpus come from its held-out text. Duplicates are kept (they are real frequencies), order is the text's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from zenlm.data.corpus import Corpus, Split, open_corpus
from zenlm.errors import ConfigError, DataError
from zenlm.evaluate import detect_lang
from zenlm.progress import ProgressFn, report
from zenlm.tokenizer import Tokenizer, train_tokenizer

Lang = Literal["en", "zh"]
_EN_END = re.compile(r"(?<=[.!?])\s+")
_ZH_END = re.compile(r"(?<=[。！？；])")
_SPEAKER = re.compile(r"^[A-Z][A-Z .,'&-]*\.$")  # "COUNTESS.", "FIRST LORD."
_DIRECTION = re.compile(r"\[[^\]]*\]")  # "[Exit STEWARD.]"
_EN_WORD = re.compile(r"\w+|[^\w\s]+")  # the word tokenizer's split (zenlm.tokenizer, kind "word")


def normalise_sentence(text: str, lang: Lang) -> str:
    """One sentence as the sentence models read it: English lowercased with words and punctuation separated by
    single spaces (``"Why not a mother?"`` -> ``"why not a mother ?"``, so a word tokenizer and BLEU see the same
    words); Chinese without spaces."""
    return " ".join(_EN_WORD.findall(text.lower())) if lang == "en" else "".join(text.split())


def english_sentences(text: str) -> Iterator[str]:
    """Sentences of English prose or verse, normalised (:func:`normalise_sentence`)."""
    for para in text.split("\n\n"):
        lines = [ln.strip() for ln in _DIRECTION.sub(" ", para).split("\n")]
        body = " ".join(ln for ln in lines if ln and not _SPEAKER.match(ln))
        for sent in _EN_END.split(body):
            sent = normalise_sentence(sent, "en")
            if sent:
                yield sent


def chinese_sentences(text: str) -> Iterator[str]:
    """Sentences of Chinese text, cut after 。！？； within each line, without spaces."""
    for line in text.split("\n"):
        for sent in _ZH_END.split(line):
            sent = normalise_sentence(sent, "zh")
            if sent:
                yield sent


def sentence_length(sentence: str, lang: Lang) -> int:
    """Words (en: space-separated) or characters (zh) of a sentence."""
    return len(sentence.split()) if lang == "en" else len(sentence)


def short_sentences(texts: Iterable[str], lang: Lang, min_len: int, max_len: int,
                    limit: int | None = None) -> list[str]:
    """The sentences of ``texts`` with ``min_len`` .. ``max_len`` words (en) or characters (zh), in order, at most
    ``limit`` of them (None: all)."""
    if not 1 <= min_len <= max_len:
        raise ConfigError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}.")
    split = english_sentences if lang == "en" else chinese_sentences
    out: list[str] = []
    for text in texts:
        for s in split(text):
            if min_len <= sentence_length(s, lang) <= max_len:
                out.append(s)
                if limit is not None and len(out) >= limit:
                    return out
    return out


def corpus_sentences(corpus: Corpus, split: Split, lang: Lang | Literal["auto"], min_len: int, max_len: int,
                     limit: int | None = None) -> tuple[list[str], Lang]:
    """The short sentences of one split of ``corpus`` (see :func:`short_sentences`) and the language they were
    read as ("auto": Chinese when most of the first characters are CJK). DataError when none fits."""
    docs = ["".join(doc) for doc in corpus.documents(split)]
    if lang == "auto":
        lang = detect_lang(docs[:20])
    found = short_sentences(docs, lang, min_len, max_len, limit)
    if not found:
        unit = "words" if lang == "en" else "characters"
        raise DataError(f"the {split} split of {corpus.name} has no sentence of {min_len}..{max_len} {unit}; "
                        "widen --min-len / --max-len or give another corpus.")
    return found, lang


@dataclass
class SentenceData:
    """The sentences of a corpus, ready for a sentence model: both splits as text and as token ids (no special
    tokens added), the language they were read as, and the tokenizer."""

    lang: Lang
    tokenizer: Tokenizer
    train: list[str]
    val: list[str]
    train_ids: list[list[int]]
    val_ids: list[list[int]]


def sentence_data(corpus: str, *, lang: Lang | Literal["auto"] = "auto", min_len: int = 4, max_len: int = 15,
                  max_sentences: int | None = None, max_val: int | None = None, tokenizer: Tokenizer | None = None,
                  vocab_size: int = 5000, progress: ProgressFn | None = None) -> SentenceData:
    """Short sentences of a built-in corpus or local text (:func:`corpus_sentences`), tokenised.

    max_sentences / max_val: keep the first N training / validation sentences (None: all)
    tokenizer:  the tokenizer to use (a resumed run's); None trains one on the training sentences: a word
                tokenizer for English (the ``vocab_size`` most frequent words, the rest <|unk|>), a character
                tokenizer for Chinese
    """
    c = open_corpus(corpus)
    train, lang = corpus_sentences(c, "train", lang, min_len, max_len, max_sentences)
    val, _ = corpus_sentences(c, "val", lang, min_len, max_len, max_val)
    if tokenizer is None:
        tokenizer = train_tokenizer(train, kind="word" if lang == "en" else "char", vocab_size=vocab_size,
                                    min_frequency=1)
    report(progress, "data", message=f"{corpus}: {len(train):,} training and {len(val):,} validation sentences "
           f"({lang}, {min_len}-{max_len} {'words' if lang == 'en' else 'characters'}), {tokenizer.kind} "
           f"tokenizer of {tokenizer.vocab_size:,} tokens")
    return SentenceData(lang, tokenizer, train, val, tokenizer.encode_batch(train), tokenizer.encode_batch(val))


__all__ = ["Lang", "SentenceData", "chinese_sentences", "corpus_sentences", "english_sentences",
           "normalise_sentence", "sentence_data", "sentence_length", "short_sentences"]
