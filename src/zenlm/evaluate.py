"""Evaluation metrics.

Generation metrics compare system outputs ("predictions") with human references, one reference per output.
They are computed by the standard packages, so the numbers match published ones:

* BLEU and chrF: ``sacrebleu`` (corpus level; its ``zh`` tokeniser for Chinese targets, ``13a`` otherwise)
* ROUGE-1/2/L:   ``rouge-score`` (mean F1 over the outputs; Porter stemming for English; for Chinese every
  CJK character is one token, since rouge-score's own tokeniser keeps only ASCII letters and digits)

All scores are percentages (0-100).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from zenlm.errors import DataError

Lang = Literal["auto", "en", "zh"]

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
# a CJK character, or a run of ASCII letters/digits (rouge-score's idea of an English word)
_ZH_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]|[a-z0-9]+")


def detect_lang(texts: Sequence[str]) -> Literal["en", "zh"]:
    """"zh" when at least 30% of the non-space characters of ``texts`` are CJK characters, else "en"."""
    chars = "".join("".join(t.split()) for t in texts)
    if not chars:
        return "en"
    return "zh" if len(_CJK.findall(chars)) / len(chars) >= 0.3 else "en"


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise DataError("pass lists of strings (one prediction and one reference per example), not a string.")
    if len(predictions) != len(references):
        raise DataError(f"{len(predictions)} predictions but {len(references)} references; "
                        "give exactly one reference per prediction.")
    if not predictions:
        raise DataError("no predictions to score; give at least one prediction/reference pair.")


def _resolve(lang: Lang, references: Sequence[str]) -> Literal["en", "zh"]:
    if lang == "auto":
        return detect_lang(references)
    if lang not in ("en", "zh"):
        raise DataError(f"lang {lang!r} is not supported; choose auto, en or zh.")
    return lang


def bleu(predictions: Sequence[str], references: Sequence[str], lang: Lang = "auto") -> float:
    """Corpus BLEU (sacrebleu, 4-grams, brevity penalty) in 0-100; Chinese text is split per character."""
    _check_pairs(predictions, references)
    import sacrebleu

    tokenize = "zh" if _resolve(lang, references) == "zh" else "13a"
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu: character 6-grams, beta 2) in 0-100; works the same for any script."""
    _check_pairs(predictions, references)
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


class _ChineseTokenizer:
    """rouge-score tokenizer for Chinese: each CJK character is a token, ASCII words stay whole."""

    def tokenize(self, text: str) -> list[str]:
        return _ZH_TOKEN.findall(text.lower())


def rouge(predictions: Sequence[str], references: Sequence[str], lang: Lang = "auto") -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over the pairs, in 0-100: {"rouge1", "rouge2", "rougeL"}.

    English: rouge-score's tokenizer (lower case, ASCII letters and digits) with Porter stemming.
    Chinese: character-level (every CJK character is one token).
    """
    _check_pairs(predictions, references)
    from rouge_score import rouge_scorer

    keys = ("rouge1", "rouge2", "rougeL")
    if _resolve(lang, references) == "zh":
        scorer = rouge_scorer.RougeScorer(list(keys), tokenizer=_ChineseTokenizer())
    else:
        scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        for k in keys:
            totals[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(predictions) for k, v in totals.items()}


def generation_metrics(predictions: Sequence[str], references: Sequence[str], lang: Lang = "auto",
                       metrics: Sequence[str] = ("bleu", "chrf", "rouge")) -> dict[str, float]:
    """Several generation metrics at once: any of "bleu", "chrf", "rouge" (-> rouge1, rouge2, rougeL)."""
    unknown = sorted(set(metrics) - {"bleu", "chrf", "rouge"})
    if unknown:
        raise DataError(f"unknown metrics {unknown}; choose among bleu, chrf, rouge.")
    lang = _resolve(lang, references) if references else "en"
    out: dict[str, float] = {}
    if "bleu" in metrics:
        out["bleu"] = bleu(predictions, references, lang)
    if "chrf" in metrics:
        out["chrf"] = chrf(predictions, references)
    if "rouge" in metrics:
        out.update(rouge(predictions, references, lang))
    return out


__all__ = ["bleu", "chrf", "rouge", "generation_metrics", "detect_lang"]
