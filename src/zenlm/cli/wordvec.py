"""CLI verbs for word vectors (registered in :func:`zenlm.cli.build_parser` through :func:`register`):

    zenlm wordvec train --corpus shakespeare --out vec/en [--method skipgram|cbow] [--dim 100] [--epochs 5]
    zenlm wordvec eval VECTORS [--neighbours king love ...] [--json-out]
    zenlm wordvec coverage VECTORS --tokenizer TOK      # what --init-embeddings would cover
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Literal

from zenlm.clikit import add_verb


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _print_report(r: dict[str, Any]) -> None:
    a, ws, sl = r["analogy"], r["wordsim353"], r["simlex999"]
    print(f"{r['vocab_size']:,} words x {r['dim']} dimensions")
    if a["questions"]:
        print(f"Google analogies: accuracy {a['accuracy']:.1%} on {a['questions']:,} of {a['total']:,} questions "
              "(the rest have a word outside the vocabulary)")
    else:
        print("Google analogies: no question has all its words in the vocabulary (the test sets are English)")
    for name, s in (("WordSim-353", ws), ("SimLex-999", sl)):
        print(f"{name}: Spearman rho {_num(s['spearman'], '.3f')}  ({s['oov']:.0%} of the pairs outside the "
              "vocabulary)")
    for word, near in r["neighbours"].items():
        print(f"  {word}: " + ", ".join(f"{w} {s:.2f}" for w, s in near))


def wordvec_train(
    corpus: str,
    out: str,
    method: Literal["skipgram", "cbow"] = "skipgram",
    dim: int = 100,
    window: int = 5,
    min_count: int = 5,
    epochs: int = 5,
    negative: int = 5,
    seed: int = 0,
    threads: int = 1,
    lower: bool = True,
    val: str | None = None,
    val_fraction: float | None = None,
    text_field: str = "text",
) -> None:
    """Train word2vec (skip-gram or CBOW) on the training split of a corpus, save and evaluate the vectors.

    The vectors go to OUT/vectors.bin (word2vec binary format, readable by gensim and most tools) and the
    settings and evaluation to OUT/wordvec.json. peoples-daily is read in its segmented form (words separated
    by spaces); English is split into words (runs of letters and digits).

    Args:
        corpus: built-in corpus name (shakespeare, shakespeare-char, peoples-daily) or a .txt/.jsonl file or
            folder (text in languages without spaces must be segmented)
        out: directory to write vectors.bin and wordvec.json into
        method: skipgram (predict the context from a word) or cbow (a word from its context)
        dim: vector width
        window: largest distance between a word and a context word
        min_count: leave out words seen fewer times
        epochs: passes over the text
        negative: noise words per true pair (negative sampling)
        seed: random seed (reproducible with --threads 1)
        threads: worker threads
        lower: lowercase the text
        val: explicit validation file or folder (kept out of training)
        val_fraction: fraction of the text, taken from the end, kept out of training
        text_field: field holding the text in .jsonl files
    """
    from zenlm.cli import TerminalProgress
    from zenlm.wordvec import (
        CorpusSentences,
        Word2VecSettings,
        evaluate_vectors,
        save_vectors,
        train_word2vec,
    )

    settings = Word2VecSettings(method=method, dim=dim, window=window, min_count=min_count, epochs=epochs,
                                negative=negative, seed=seed, threads=threads, lower=lower)
    sentences = CorpusSentences(corpus, lower=lower, val=val, val_fraction=val_fraction, text_field=text_field)
    progress = TerminalProgress()
    t0 = time.perf_counter()
    kv = train_word2vec(sentences, settings, progress=progress)
    train_s = time.perf_counter() - t0
    progress.close()
    report = evaluate_vectors(kv)
    path = save_vectors(kv, out, {"corpus": corpus, "settings": settings.__dict__, "train_s": round(train_s, 1),
                                  "evaluation": report})
    print(f"trained in {train_s:.1f} s -> {path}")
    _print_report(report)


def wordvec_eval(vectors: str, neighbours: list[str] | None = None, topn: int = 5, limit: int | None = None,
                 json_out: bool = False) -> None:
    """Evaluate word vectors: Google analogies (accuracy), WordSim-353 and SimLex-999 (Spearman rho), and the
    nearest neighbours of a few words.

    Args:
        vectors: a word2vec text or binary file, a fastText .vec or a GloVe .txt file, or a directory made by
            `zenlm wordvec train`
        neighbours: words whose nearest neighbours to show (default: a few English and Chinese words, those
            in the vocabulary)
        topn: neighbours per word
        limit: read only the first N vectors of the file (the most frequent words)
        json_out: print the report as JSON
    """
    from zenlm.wordvec import PROBE_WORDS, evaluate_vectors, read_vectors

    path = Path(vectors)
    kv = read_vectors(path / "vectors.bin" if path.is_dir() else path, limit=limit)
    report = evaluate_vectors(kv, neighbours or PROBE_WORDS, topn)
    if json_out:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        _print_report(report)


def wordvec_coverage(vectors: str, tokenizer: str, limit: int | None = None) -> None:
    """Report how much of a tokenizer's vocabulary a word-vector file covers (what initialising a word-level
    model's embeddings from it would give).

    Args:
        vectors: a word2vec text or binary file, a fastText .vec or a GloVe .txt file, or a directory made by
            `zenlm wordvec train`
        tokenizer: a tokenizer directory (e.g. `zenlm tokenizer train --kind word ...`)
        limit: read only the first N vectors of the file
    """
    from zenlm.tokenizer import Tokenizer
    from zenlm.wordvec import read_vectors, vocabulary_coverage

    path = Path(vectors)
    kv = read_vectors(path / "vectors.bin" if path.is_dir() else path, limit=limit)
    print(vocabulary_coverage(Tokenizer.load(tokenizer), kv).line())


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``zenlm wordvec train | eval | coverage`` to the top-level sub-commands ``sub``."""
    wv = sub.add_parser("wordvec", help="word vectors: train (word2vec), eval, coverage")
    wv_sub = wv.add_subparsers(dest="wvverb", metavar="ACTION")
    add_verb(wv_sub, "train", wordvec_train)
    add_verb(wv_sub, "eval", wordvec_eval, positional=("vectors",))
    add_verb(wv_sub, "coverage", wordvec_coverage, positional=("vectors",))
