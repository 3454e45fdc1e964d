"""Word vectors: word2vec (skip-gram and CBOW, trained with gensim), their evaluation, and pretrained vectors as
the starting embeddings of a word-level model.

word2vec learns two vectors per word, an input vector ``v_w`` and an output vector ``v'_w``, from the windows of
a text. Skip-gram predicts each context word from the centre word; with negative sampling one (centre, context)
pair contributes::

    log σ(v'_context · v_centre) + Σ_{k=1..K} log σ(−v'_{n_k} · v_centre),   n_k ~ P(w) ∝ count(w)^0.75

(pull the true pair together, push K random "noise" words away). CBOW swaps the roles: the mean of the context
words' input vectors predicts the centre word. Frequent words are randomly dropped from the windows (``sample``),
and the window size is drawn per word up to ``window``. The input vectors are the word vectors.

Evaluation uses the English test sets gensim ships (no download):

* Google analogy questions (``questions-words.txt``, 19,544 questions such as *man : king :: woman : ?*): the
  answer is the word nearest to ``v_king − v_man + v_woman`` (excluding the three question words); reported as
  accuracy over the questions whose four words are all in the vocabulary, and how many those were.
* WordSim-353 and SimLex-999: Spearman's ρ between the cosine similarities and human similarity ratings of word
  pairs (SimLex rates similarity proper, so *coast* / *shore* high but *cup* / *coffee* low; WordSim mixes in
  relatedness), over the pairs in the vocabulary, and the share of pairs left out.

The Chinese corpus has no such sets here; both languages get nearest neighbours of a few probe words.

Files: vectors are written in the word2vec binary format (``vectors.bin``), readable by gensim, fastText tools and
most other libraries, plus ``wordvec.json`` (settings and evaluation). :func:`read_vectors` reads word2vec text
and binary files, fastText ``.vec`` files and GloVe text files (no header line). gensim's own ``.model`` / ``.kv``
files are pickles and are refused: nothing zenlm reads can run code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from zenlm.data.corpus import open_corpus
from zenlm.errors import ConfigError, DataError
from zenlm.fileio import atomic_path, atomic_write_text
from zenlm.progress import ProgressFn, report
from zenlm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

WORD = re.compile(r"\w+")  # words: runs of letters/digits (CJK included); punctuation is left out
MAX_SENTENCE_WORDS = 1000  # longer lines are cut (gensim itself silently drops words past 10,000)
PROBE_WORDS = ("king", "love", "night", "sword", "good", "中国", "经济", "北京", "人民", "发展")
Method = Literal["skipgram", "cbow"]
_PICKLE_OR_NUMPY = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"\x93NUMPY", b"PK\x03\x04")


# ---------------------------------------------------------------------------------------------- sentences
def _lines(pieces: Iterable[str]) -> Iterator[str]:
    buf = ""
    for piece in pieces:
        buf += piece
        *done, buf = buf.split("\n")
        yield from done
    if buf:
        yield buf


class CorpusSentences:
    """The lines of one split of a corpus as lists of words, re-iterable (gensim reads the text several times).

    corpus: a built-in name or a local .txt/.jsonl path (see :func:`zenlm.data.corpus.open_corpus`);
            ``peoples-daily`` means its segmented form ``peoples-daily-words``. Text in languages written
            without spaces must come segmented (words separated by spaces).
    lower:  lowercase the words
    """

    def __init__(self, corpus: str, split: str = "train", *, lower: bool = True, val: str | None = None,
                 val_fraction: float | None = None, text_field: str = "text") -> None:
        name = "peoples-daily-words" if corpus == "peoples-daily" else corpus
        self.corpus = open_corpus(name, val=val, val_fraction=val_fraction, text_field=text_field)
        self.split, self.lower = split, lower

    def __iter__(self) -> Iterator[list[str]]:
        for line in _lines(self.corpus.texts(self.split)):  # type: ignore[arg-type]
            words = WORD.findall(line.lower() if self.lower else line)
            for i in range(0, len(words), MAX_SENTENCE_WORDS):
                yield words[i:i + MAX_SENTENCE_WORDS]


# ---------------------------------------------------------------------------------------------- training
@dataclass
class Word2VecSettings:
    """word2vec settings (gensim's names in brackets).

    method:     "skipgram" (predict the context from the word) or "cbow" (the word from its context) [sg]
    dim:        vector width [vector_size]
    window:     largest distance between a word and a context word
    min_count:  words seen fewer times are left out
    epochs:     passes over the text
    negative:   noise words per true pair (negative sampling)
    sample:     frequent-word down-sampling threshold
    seed:       random seed; with threads=1 training is reproducible
    threads:    worker threads [workers]
    lower:      lowercase the text
    """

    method: Method = "skipgram"
    dim: int = 100
    window: int = 5
    min_count: int = 5
    epochs: int = 5
    negative: int = 5
    sample: float = 1e-3
    seed: int = 0
    threads: int = 1
    lower: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("skipgram", "cbow"):
            raise ConfigError(f"method={self.method!r} is not supported; choose 'skipgram' or 'cbow'.")
        for name in ("dim", "window", "min_count", "epochs", "negative", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.sample < 0:
            raise ConfigError(f"sample must be >= 0, got {self.sample!r}.")


def _gensim() -> Any:
    """The gensim package, or a message that says how to install it."""
    try:
        import gensim
    except ImportError:
        raise ConfigError("word vectors need the gensim package: pip install gensim==4.4.0 (or install zenlm "
                          "with its wordvec extra: pip install -e \".[wordvec]\").") from None
    return gensim


def _stable_hash(s: str) -> int:
    """A hash that is the same in every process (Python's own hash of a str is salted per process), so that
    seeded training is reproducible."""
    return zlib.crc32(s.encode("utf-8"))


def train_word2vec(sentences: Iterable[list[str]], settings: Word2VecSettings | None = None, *,
                   progress: ProgressFn | None = None) -> Any:
    """Train word2vec on ``sentences`` (a re-iterable of word lists, e.g. :class:`CorpusSentences`) -> gensim
    ``KeyedVectors`` (the input vectors)."""
    _gensim()
    from gensim.models import Word2Vec
    from gensim.models.callbacks import CallbackAny2Vec

    s = settings or Word2VecSettings()

    class _Epochs(CallbackAny2Vec):  # type: ignore[misc]
        def __init__(self) -> None:
            self.n, self.t0 = 0, time.perf_counter()

        def on_epoch_end(self, model: Any) -> None:
            self.n += 1
            report(progress, "word2vec", done=self.n, total=s.epochs, unit="epoch",
                   info={"s": round(time.perf_counter() - self.t0, 1)})

    model = Word2Vec(vector_size=s.dim, window=s.window, min_count=s.min_count, workers=s.threads,
                     sg=int(s.method == "skipgram"), negative=s.negative, sample=s.sample, seed=s.seed,
                     hashfxn=_stable_hash)
    model.build_vocab(sentences)
    if not len(model.wv):
        raise DataError(f"no word occurs {s.min_count} times or more in the training text; give more text or "
                        "a lower min_count.")
    report(progress, "word2vec", message=f"{s.method}: {len(model.wv):,} words of {model.corpus_total_words:,} "
           f"running words, {s.dim} dimensions, {s.epochs} epochs")
    model.train(sentences, total_examples=model.corpus_count, epochs=s.epochs, callbacks=[_Epochs()])
    return model.wv


def train_corpus_vectors(corpus: str, out: str | os.PathLike[str], settings: Word2VecSettings | None = None, *,
                         val: str | None = None, val_fraction: float | None = None, text_field: str = "text",
                         progress: ProgressFn | None = None) -> tuple[Any, dict[str, Any]]:
    """Train word2vec on the training split of a corpus, evaluate the vectors and save both (:func:`save_vectors`)
    -> (KeyedVectors, the saved info: corpus, settings, train_s, evaluation).

    corpus:       built-in corpus name (shakespeare, shakespeare-char, peoples-daily) or a .txt/.jsonl file or
                  folder (text in languages without spaces must be segmented)
    out:          directory to write vectors.bin and wordvec.json into
    val:          explicit validation file or folder (kept out of training)
    val_fraction: fraction of the text, taken from the end, kept out of training
    text_field:   field holding the text in .jsonl files
    """
    s = settings or Word2VecSettings()
    sentences = CorpusSentences(corpus, lower=s.lower, val=val, val_fraction=val_fraction, text_field=text_field)
    t0 = time.perf_counter()
    kv = train_word2vec(sentences, s, progress=progress)
    info = {"corpus": corpus, "settings": asdict(s), "train_s": round(time.perf_counter() - t0, 1),
            "evaluation": evaluate_vectors(kv)}
    save_vectors(kv, out, info)
    return kv, info


def save_vectors(kv: Any, out_dir: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    """Write ``out_dir/vectors.bin`` (word2vec binary format) and ``out_dir/wordvec.json`` (``info``), each
    through a temporary file and a rename; returns the vectors file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "vectors.bin") as tmp:
        kv.save_word2vec_format(str(tmp), binary=True)
    atomic_write_text(out / "wordvec.json", json.dumps(info, indent=2, ensure_ascii=False))
    return out / "vectors.bin"


# ---------------------------------------------------------------------------------------------- reading
def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def vector_format(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Tell the format of a word-vector file: {"binary": bool, "header": bool, "dim": int}.

    word2vec text and fastText ``.vec``: a ``count dim`` line, then ``word x_1 .. x_dim`` per line; word2vec binary:
    the same header, then per word its bytes, a space and dim little-endian float32; GloVe: text without the header.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such word-vector file: {p}.")
    with p.open("rb") as f:
        head = f.read(1 << 20)
    if not head.strip():
        raise DataError(f"{p} is empty; give a word2vec, GloVe or fastText vector file.")
    if head.startswith(_PICKLE_OR_NUMPY):
        raise DataError(f"{p} is a pickle or numpy file (gensim's own .model/.kv format?), which zenlm does not "
                        "load because a pickle can run code. Export the vectors in the word2vec format first: "
                        "KeyedVectors.save_word2vec_format(PATH, binary=True).")
    first, _, rest = head.partition(b"\n")
    try:
        line = first.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise DataError(f"{p}: the first line is not text; expected a 'count dim' header (word2vec, fastText) or "
                        "'word x1 x2 ...' (GloVe).") from None
    m = re.fullmatch(r"(\d+)\s+(\d+)", line)
    if m:
        count, dim = int(m.group(1)), int(m.group(2))
        if count < 1 or dim < 1:
            raise DataError(f"{p}: the header says {count} vectors of {dim} dimensions; nothing to read.")
        second = rest.split(b"\n", 1)[0]
        try:
            parts = second.decode("utf-8").split()
        except UnicodeDecodeError:
            parts = []
        text = len(parts) == dim + 1 and all(_is_float(x) for x in parts[1:])
        return {"binary": not text, "header": True, "dim": dim}
    parts = line.split()
    if len(parts) >= 2 and all(_is_float(x) for x in parts[1:]):
        return {"binary": False, "header": False, "dim": len(parts) - 1}
    raise DataError(f"{p} is not a word-vector file: its first line {line[:60]!r} is neither a 'count dim' header "
                    "nor 'word x1 x2 ...'.")


def read_vectors(path: str | os.PathLike[str], *, limit: int | None = None) -> Any:
    """Read a word2vec (text or binary), fastText ``.vec`` or GloVe file -> gensim ``KeyedVectors``.
    limit: read only the first ``limit`` vectors (files list the most frequent words first)."""
    fmt = vector_format(path)
    _gensim()
    from gensim.models import KeyedVectors

    try:
        return KeyedVectors.load_word2vec_format(str(path), binary=fmt["binary"], no_header=not fmt["header"],
                                                 limit=limit)
    except (ValueError, EOFError, UnicodeDecodeError, IndexError) as e:
        kind = "binary word2vec" if fmt["binary"] else ("word2vec text" if fmt["header"] else "GloVe text")
        raise DataError(f"{path} could not be read as a {kind} file: {e}") from None


# ---------------------------------------------------------------------------------------------- evaluation
def _test_file(name: str) -> str:
    _gensim()
    from gensim.test.utils import datapath

    return datapath(name)


def analogy_accuracy(kv: Any) -> dict[str, Any]:
    """Google analogy questions: {"accuracy": fraction correct or None, "questions": answered, "total": all}."""
    path = _test_file("questions-words.txt")
    with open(path, encoding="utf-8") as f:
        total = sum(1 for line in f if line.strip() and not line.startswith(":"))
    logging.getLogger("gensim.models.keyedvectors").setLevel(logging.WARNING)
    _, sections = kv.evaluate_word_analogies(path)
    last = sections[-1]  # "Total accuracy"
    n = len(last["correct"]) + len(last["incorrect"])
    return {"accuracy": len(last["correct"]) / n if n else None, "questions": n, "total": total}


def similarity_correlation(kv: Any, test_set: Literal["wordsim353", "simlex999"]) -> dict[str, Any]:
    """Spearman's ρ (and Pearson's r) of cosine similarity against human ratings: {"spearman", "pearson",
    "oov"}, oov = the share of pairs with a word outside the vocabulary (ρ and r are None when all are)."""
    name = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}[test_set]
    try:
        pearson, spearman, oov = kv.evaluate_word_pairs(_test_file(name))
    except ValueError:  # no pair in the vocabulary
        return {"spearman": None, "pearson": None, "oov": 1.0}
    rho = float(spearman.statistic if hasattr(spearman, "statistic") else spearman[0])
    return {"spearman": None if math.isnan(rho) else rho, "pearson": float(pearson[0]), "oov": float(oov) / 100}


def nearest_neighbours(kv: Any, words: Sequence[str] = PROBE_WORDS, topn: int = 5) -> dict[str, list[Any]]:
    """The ``topn`` nearest words (cosine similarity) of each word of ``words`` that is in the vocabulary."""
    return {w: [[n, round(float(s), 4)] for n, s in kv.most_similar(w, topn=topn)]
            for w in words if w in kv.key_to_index}


def evaluate_vectors(kv: Any, neighbours: Sequence[str] = PROBE_WORDS, topn: int = 5) -> dict[str, Any]:
    """Everything above in one dict: vocab_size, dim, analogy, wordsim353, simlex999, and the ``topn`` nearest
    neighbours of the words of ``neighbours`` that are in the vocabulary.

    neighbours: words whose nearest neighbours to show (default: a few English and Chinese words)
    topn:       neighbours per word
    """
    return {"vocab_size": len(kv), "dim": int(kv.vector_size), "analogy": analogy_accuracy(kv),
            "wordsim353": similarity_correlation(kv, "wordsim353"),
            "simlex999": similarity_correlation(kv, "simlex999"),
            "neighbours": nearest_neighbours(kv, neighbours, topn)}


# ---------------------------------------------------------------------------------------------- init embeddings
@dataclass
class Coverage:
    """How much of a tokenizer's vocabulary a set of vectors covers (special tokens are not counted).

    words: vocabulary entries looked up;  exact: found as they are;  lowercased: found only in lowercase;
    missing_examples: a few that were not found (in id order, which for word tokenizers is frequency order)
    """

    words: int
    exact: int
    lowercased: int
    missing_examples: list[str] = field(default_factory=list)

    @property
    def found(self) -> int:
        return self.exact + self.lowercased

    @property
    def fraction(self) -> float:
        return self.found / self.words if self.words else 0.0

    def line(self) -> str:
        """One line for a person: how many were found and a few that were not."""
        miss = f"; missing e.g. {' '.join(map(repr, self.missing_examples[:8]))}" if self.missing_examples else ""
        return (f"vectors cover {self.found:,} of {self.words:,} vocabulary entries ({self.fraction:.1%}; "
                f"{self.lowercased:,} only in lowercase){miss}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "found": self.found, "fraction": self.fraction}


def _lookup(tokenizer: Tokenizer, kv: Any) -> tuple[list[int], list[str], Coverage]:
    """(token ids, the vector keys they map to, coverage) for every ordinary vocabulary entry."""
    ids, keys, missing = [], [], []
    exact = lowered = words = 0
    for i in range(tokenizer.vocab_size):
        token = tokenizer.id_to_token(i)
        if i in tokenizer.special_ids or token is None:
            continue
        words += 1
        if token in kv.key_to_index:
            exact += 1
        elif token.lower() in kv.key_to_index:
            lowered += 1
            token = token.lower()
        else:
            if len(missing) < 20:
                missing.append(token)
            continue
        ids.append(i)
        keys.append(token)
    return ids, keys, Coverage(words, exact, lowered, missing)


def vocabulary_coverage(tokenizer: Tokenizer, kv: Any) -> Coverage:
    """The share of ``tokenizer``'s vocabulary (special tokens aside) that has a vector in ``kv``."""
    return _lookup(tokenizer, kv)[2]


@torch.no_grad()
def init_embeddings(weight_VD: torch.Tensor, tokenizer: Tokenizer, kv: Any, *,
                    scale: Literal["match", "none"] = "match") -> Coverage:
    """Copy the vector of every vocabulary entry found in ``kv`` into its row of an embedding matrix, in place.

    weight_VD: [V, D] embedding weight (V >= the tokenizer's vocabulary; D must equal the vectors' width).
    scale:     "match" multiplies the copied vectors by one factor so that their standard deviation equals that
               of the rows as initialised (the model's other rows and its tied head, if any, expect that
               scale); "none" copies them unchanged.
    Rows of entries without a vector keep their initial values. Returns the :class:`Coverage`.
    """
    if weight_VD.ndim != 2:
        raise ConfigError(f"expected an embedding matrix [V, D], got a tensor of shape {tuple(weight_VD.shape)}.")
    if weight_VD.shape[1] != kv.vector_size:
        raise ConfigError(f"the vectors are {kv.vector_size}-dimensional but the model's embeddings are "
                          f"{weight_VD.shape[1]} wide; build the model with an embedding width of {kv.vector_size} "
                          "(e.g. n_embd) or train vectors with that --dim.")
    if weight_VD.shape[0] < tokenizer.vocab_size:
        raise ConfigError(f"the embedding has {weight_VD.shape[0]} rows, fewer than the tokenizer's "
                          f"{tokenizer.vocab_size} ids.")
    if scale not in ("match", "none"):
        raise ConfigError(f"scale={scale!r} is not supported; choose 'match' or 'none'.")
    ids, keys, coverage = _lookup(tokenizer, kv)
    if ids:
        vec_ND = torch.from_numpy(np.stack([kv[k] for k in keys])).to(weight_VD.dtype)
        if scale == "match":
            vec_ND *= weight_VD.float().std().item() / max(vec_ND.float().std().item(), 1e-12)
        weight_VD[torch.tensor(ids, device=weight_VD.device)] = vec_ND.to(weight_VD.device)
    return coverage


__all__ = ["CorpusSentences", "Word2VecSettings", "train_word2vec", "train_corpus_vectors", "save_vectors",
           "vector_format",
           "read_vectors", "analogy_accuracy", "similarity_correlation", "nearest_neighbours", "evaluate_vectors",
           "Coverage", "vocabulary_coverage", "init_embeddings", "PROBE_WORDS"]
