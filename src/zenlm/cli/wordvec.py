"""CLI verbs for word vectors (registered in :func:`zenlm.cli.build_parser` through :func:`register`):

    zenlm wordvec train --corpus shakespeare --out vec/en [--method skipgram|cbow] [--dim 100] [--epochs 5]
    zenlm wordvec eval VECTORS [--neighbours king love ...] [--json-out]
    zenlm wordvec coverage VECTORS --tokenizer TOK      # how much of a word vocabulary the vectors cover

The flags and their defaults come from the library (:mod:`zenlm.wordvec`): ``train_corpus_vectors`` and
``Word2VecSettings`` for train, ``read_vectors`` and ``evaluate_vectors`` for eval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from zenlm.clikit import Param, add_verb, params_of


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


def _vectors_file(vectors: str) -> Path:
    path = Path(vectors)
    return path / "vectors.bin" if path.is_dir() else path


_VECTORS = Param("vectors", str, help="a word2vec text or binary file, a fastText .vec or a GloVe .txt file, or "
                 "a directory made by `zenlm wordvec train`")


def wordvec_train_params() -> list[Param]:
    """The flags: train_corpus_vectors' own parameters and the Word2VecSettings fields."""
    from zenlm.wordvec import Word2VecSettings, train_corpus_vectors

    return [*params_of(train_corpus_vectors, skip=("settings", "progress")), *params_of(Word2VecSettings)]


def wordvec_train(**flags: Any) -> None:
    """Train word2vec (skip-gram or CBOW) on the training split of a corpus, save and evaluate the vectors.

    The vectors go to OUT/vectors.bin (word2vec binary format, readable by gensim and most tools) and the
    settings and evaluation to OUT/wordvec.json. peoples-daily is read in its segmented form (words separated
    by spaces); English is split into words (runs of letters and digits).
    """
    import dataclasses

    from zenlm.cli.common import TerminalProgress
    from zenlm.wordvec import Word2VecSettings, train_corpus_vectors

    fields = {f.name for f in dataclasses.fields(Word2VecSettings)}
    settings = Word2VecSettings(**{k: v for k, v in flags.items() if k in fields})
    progress = TerminalProgress()
    _, info = train_corpus_vectors(settings=settings, progress=progress,
                                   **{k: v for k, v in flags.items() if k not in fields})
    progress.close()
    print(f"trained in {info['train_s']:.1f} s -> {Path(flags['out']) / 'vectors.bin'}")
    _print_report(info["evaluation"])


def wordvec_eval_params() -> list[Param]:
    """The flags: the vectors file, read_vectors' limit, evaluate_vectors' neighbours and topn, --json-out."""
    from zenlm.wordvec import evaluate_vectors, read_vectors

    return [_VECTORS, *params_of(read_vectors, only=("limit",)),
            *params_of(evaluate_vectors, only=("neighbours", "topn"), types={"neighbours": list[str]}),
            Param("json_out", bool, False, "print the report as JSON")]


def wordvec_eval(vectors: str, limit: int | None, neighbours: list[str], topn: int, json_out: bool) -> None:
    """Evaluate word vectors: Google analogies (accuracy), WordSim-353 and SimLex-999 (Spearman rho), and the
    nearest neighbours of a few words."""
    from zenlm.wordvec import evaluate_vectors, read_vectors

    report = evaluate_vectors(read_vectors(_vectors_file(vectors), limit=limit), neighbours, topn)
    if json_out:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        _print_report(report)


def wordvec_coverage_params() -> list[Param]:
    """The flags: the vectors file, the tokenizer, read_vectors' limit."""
    from zenlm.wordvec import read_vectors

    return [_VECTORS, Param("tokenizer", str, help="a tokenizer directory (e.g. from `zenlm tokenizer train "
                            "--kind word`)"), *params_of(read_vectors, only=("limit",))]


def wordvec_coverage(vectors: str, tokenizer: str, limit: int | None) -> None:
    """Report how much of a tokenizer's vocabulary a word-vector file covers (what initialising a word-level
    model's embeddings from it would give)."""
    from zenlm.tokenizer import Tokenizer
    from zenlm.wordvec import read_vectors, vocabulary_coverage

    kv = read_vectors(_vectors_file(vectors), limit=limit)
    print(vocabulary_coverage(Tokenizer.load(tokenizer), kv).line())


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``zenlm wordvec train | eval | coverage`` to the top-level sub-commands ``sub``."""
    wv = sub.add_parser("wordvec", help="word vectors: train (word2vec), eval, coverage")
    wv_sub = wv.add_subparsers(dest="wvverb", metavar="ACTION")
    add_verb(wv_sub, "train", wordvec_train, params=wordvec_train_params)
    add_verb(wv_sub, "eval", wordvec_eval, positional=("vectors",), params=wordvec_eval_params)
    add_verb(wv_sub, "coverage", wordvec_coverage, positional=("vectors",), params=wordvec_coverage_params)
