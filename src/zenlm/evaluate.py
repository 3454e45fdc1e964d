"""Evaluation metrics.

Language-model scores come from the mean cross-entropy ``loss`` in nats per token:

    perplexity    = exp(loss)                                   the effective number of equally likely choices
    bits per byte = loss / ln 2 / (UTF-8 bytes per token)       comparable across tokenizers

Generation metrics compare system outputs ("predictions") with human references, one reference per output
(free generation, where an output has no reference of its own, is scored by :func:`reference_set_bleu` and
:func:`self_bleu`, written out below).
They are computed by the standard packages, so the numbers match published ones:

* BLEU and chrF: ``sacrebleu`` (corpus level; its ``zh`` tokeniser for Chinese targets, ``13a`` otherwise)
* ROUGE-1/2/L:   ``rouge-score`` (mean F1 over the outputs; Porter stemming for English; for Chinese every
  CJK character is one token, since rouge-score's own tokeniser keeps only ASCII letters and digits)

All scores are percentages (0-100).

Classification metrics (accuracy, per-class and macro precision/recall/F1, the confusion matrix) are written
out by hand below, so the formulas can be read next to the code. They are fractions (0-1), as in
scikit-learn, and agree with ``sklearn.metrics`` used with ``zero_division=0``.
"""

from __future__ import annotations

import bisect
import math
import operator
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from zenlm.errors import DataError

Lang = Literal["auto", "en", "zh"]

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
# a CJK character, or a run of ASCII letters/digits (rouge-score's idea of an English word)
_ZH_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]|[a-z0-9]+")


def perplexity(loss: float) -> float:
    """exp(loss) for a mean cross-entropy in nats per token (capped at exp(50) so a diverged run still prints)."""
    return math.exp(min(loss, 50.0))


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """A mean cross-entropy in nats per token as bits per UTF-8 byte of text: loss / ln 2 / bytes_per_token."""
    return loss / math.log(2) / bytes_per_token


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


# ------------------------------------------------------------------------------------------------------------
# BLEU of free generation (no one reference per output): written out, since every output is scored against a
# whole set of sentences. sacrebleu gives the same numbers (tests/test_seqgan.py) but would re-read the whole
# reference set for every output.
#
#   p_n  = sum_h sum_{g in ngrams_n(h)} min(count_h(g), max_{r in R_h} count_r(g))  /  sum_h |ngrams_n(h)|
#   BP   = 1 if c > r else exp(1 - r / c)      c = sum_h |h|,  r = sum_h (the length in R_h closest to |h|,
#                                              the shorter one on a tie)
#   BLEU = 100 * BP * exp(1/N sum_{n=1..N} log p_n)          (N = 4; a p_n with no match is smoothed as
#                                              sacrebleu's "exp" method does: 1 / (2^k * total_n) for the k-th)
#
# reference_set_bleu: R_h = the reference set for every output (quality: do the outputs use the n-grams of
# real text?). self_bleu: R_h = the other outputs (Zhu et al. 2018's diversity score: high = repetitive).
# ------------------------------------------------------------------------------------------------------------


def _words(text: str, lang: Literal["en", "zh"]) -> list[str]:
    return list("".join(text.split())) if lang == "zh" else text.split()


def _ngram_counts(words: Sequence[str], n: int) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        out[g] = out.get(g, 0) + 1
    return out


def _closest(lengths: Sequence[int], h: int) -> int:
    """The length in ``lengths`` (sorted, non-empty) closest to h, the shorter one on a tie."""
    i = bisect.bisect_left(lengths, h)
    if i == len(lengths):
        return lengths[-1]
    if i == 0 or lengths[i] == h:
        return lengths[i]
    return lengths[i - 1] if h - lengths[i - 1] <= lengths[i] - h else lengths[i]


def _bleu_from_stats(matches: list[int], totals: list[int], hyp_len: int, ref_len: int) -> float:
    if hyp_len == 0:
        return 0.0
    log_p, smooth = 0.0, 1.0
    for m, t in zip(matches, totals, strict=True):
        if t == 0:
            return 0.0
        if m == 0:
            smooth *= 2
            log_p += math.log(1.0 / (smooth * t))
        else:
            log_p += math.log(m / t)
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / hyp_len)
    return 100.0 * bp * math.exp(log_p / len(matches))


def reference_set_bleu(predictions: Sequence[str], references: Sequence[str], lang: Lang = "auto",
                       max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` (0-100) of ``predictions``, each scored against the whole ``references`` set (see
    the comment above); words are split at spaces, Chinese per character."""
    if isinstance(predictions, str) or isinstance(references, str) or not predictions or not references:
        raise DataError("give non-empty lists of predictions and of references.")
    lang = _resolve(lang, references)
    refs = [_words(r, lang) for r in references]
    best: list[dict[tuple[str, ...], int]] = [{} for _ in range(max_n)]
    for words in refs:
        for n in range(max_n):
            for g, c in _ngram_counts(words, n + 1).items():
                if c > best[n].get(g, 0):
                    best[n][g] = c
    lengths = sorted(len(w) for w in refs)
    matches, totals, hyp_len, ref_len = [0] * max_n, [0] * max_n, 0, 0
    for text in predictions:
        words = _words(text, lang)
        hyp_len, ref_len = hyp_len + len(words), ref_len + _closest(lengths, len(words))
        for n in range(max_n):
            counts = _ngram_counts(words, n + 1)
            matches[n] += sum(min(c, best[n].get(g, 0)) for g, c in counts.items())
            totals[n] += sum(counts.values())
    return _bleu_from_stats(matches, totals, hyp_len, ref_len)


def self_bleu(texts: Sequence[str], lang: Lang = "auto", max_n: int = 4) -> float:
    """Corpus BLEU-``max_n`` (0-100) of each text against all the other texts: how much a set of generated
    sentences repeats itself (100: every sentence's n-grams occur in another one)."""
    if isinstance(texts, str) or len(texts) < 2:
        raise DataError("self-BLEU needs a list of at least two texts.")
    lang = _resolve(lang, texts)
    docs = [_words(t, lang) for t in texts]
    counts = [[_ngram_counts(w, n + 1) for n in range(max_n)] for w in docs]
    # per n-gram the two largest counts in any text and the text holding the largest: the most any *other*
    # text holds is the first unless text i holds it, then the second
    top: list[dict[tuple[str, ...], tuple[int, int, int]]] = [{} for _ in range(max_n)]
    for i, per_n in enumerate(counts):
        for n, cn in enumerate(per_n):
            for g, c in cn.items():
                c1, who, c2 = top[n].get(g, (0, -1, 0))
                top[n][g] = (c, i, c1) if c > c1 else (c1, who, max(c2, c))
    lengths = sorted(len(w) for w in docs)
    matches, totals, hyp_len, ref_len = [0] * max_n, [0] * max_n, 0, 0
    for i, words in enumerate(docs):
        others = list(lengths)
        others.remove(len(words))
        hyp_len, ref_len = hyp_len + len(words), ref_len + _closest(others, len(words))
        for n in range(max_n):
            for g, c in counts[i][n].items():
                c1, who, c2 = top[n][g]
                matches[n] += min(c, c2 if who == i else c1)
            totals[n] += sum(counts[i][n].values())
    return _bleu_from_stats(matches, totals, hyp_len, ref_len)


# ------------------------------------------------------------------------------------------------------------
# Classification metrics, written out by hand.
#
# With C classes and N examples, the confusion matrix M (C x C) counts M[t][p] = how many examples of true
# class t were predicted as class p. Every other score is read off it:
#
#   TP_c        = M[c][c]                            (true class c, predicted c)
#   support_c   = sum_p M[c][p]        (row sum)     (examples whose true class is c)
#   predicted_c = sum_t M[t][c]        (column sum)  (examples predicted as c)
#   precision_c = TP_c / predicted_c                 (0 when c is never predicted)
#   recall_c    = TP_c / support_c                   (0 when c has no examples)
#   F1_c        = 2 P_c R_c / (P_c + R_c)            (0 when P_c + R_c = 0)
#   accuracy    = sum_c TP_c / N                     (trace over total)
#   macro X     = (1/C) sum_c X_c                    (every class counts the same, rare or not)
#   weighted F1 = sum_c support_c F1_c / N           (classes count by their number of examples)
#
# The zero conventions are scikit-learn's ``zero_division=0``.
# ------------------------------------------------------------------------------------------------------------


def _safe_div(num: float, den: float) -> float:
    return num / den if den else 0.0


def _as_index(value: object, what: str, position: int, n_classes: int) -> int:
    try:
        i = operator.index(value)  # accepts int, numpy ints and one-element integer tensors; refuses floats
    except TypeError:
        raise DataError(f"{what} {value!r} (example {position}) is not an integer class index; pass class "
                        "indices 0, 1, ... or use classification_report_from_names for label strings.") from None
    if not 0 <= i < n_classes:
        raise DataError(f"{what} index {i} (example {position}) is not one of the {n_classes} classes "
                        f"(0..{n_classes - 1}); check that the label list matches the model's outputs.")
    return i


def _check_indices(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> tuple[list[int], list[int]]:
    if n_classes < 1:
        raise DataError("need at least one class; pass the labels the model was trained on.")
    if len(y_true) != len(y_pred):
        raise DataError(f"{len(y_true)} true labels but {len(y_pred)} predictions; "
                        "give exactly one prediction per example.")
    if len(y_true) == 0:
        raise DataError("no examples to score; give at least one (true label, prediction) pair.")
    true = [_as_index(v, "label", i, n_classes) for i, v in enumerate(y_true)]
    pred = [_as_index(v, "prediction", i, n_classes) for i, v in enumerate(y_pred)]
    return true, pred


def _check_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str):
        raise DataError("pass the class labels as a list of strings, not one string.")
    names = list(labels)
    if not names:
        raise DataError("need at least one class label; pass the labels the model was trained on.")
    if len(set(names)) != len(names):
        dupes = sorted({str(x) for x in names if names.count(x) > 1})
        raise DataError(f"class labels {dupes} appear more than once; give each class one unique label.")
    return names


def _shown(names: Sequence[object], limit: int = 20) -> str:
    """The list of names for an error message, cut short when it is long."""
    head = ", ".join(repr(x) for x in names[:limit])
    return head + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> list[list[int]]:
    """Count ``matrix[t][p]`` = number of examples of true class t that were predicted as class p.

    Args:
        y_true: (N,) true class indices in 0..n_classes-1.
        y_pred: (N,) predicted class indices in 0..n_classes-1.
        n_classes: C; a class absent from both lists still gets its (all-zero) row and column.

    Returns:
        (C, C) nested list of ints: rows are true classes, columns predicted classes. Row c sums to the support
        of class c, column c to the number of predictions of class c, the diagonal holds the correct ones.

    Raises:
        DataError: empty or unequal-length inputs, n_classes < 1, or an index outside 0..n_classes-1.
    """
    true, pred = _check_indices(y_true, y_pred, n_classes)
    matrix = [[0] * n_classes for _ in range(n_classes)]
    for t, p in zip(true, pred, strict=True):
        matrix[t][p] += 1
    return matrix


def _class_scores(matrix: list[list[int]], c: int, label: str) -> dict:
    """Precision, recall, F1 and support of class c, read off the (C, C) confusion matrix."""
    tp = matrix[c][c]
    support = sum(matrix[c])  # row c: examples whose true class is c
    predicted = sum(row[c] for row in matrix)  # column c: examples predicted as c
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    return {"label": label, "precision": precision, "recall": recall, "f1": f1, "support": support}


def _display_width(text: str) -> int:
    """Terminal columns taken by ``text``: wide (e.g. Chinese) characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _table_row(name: str, scores: Sequence[float | None], support: int, width: int, digits: int) -> str:
    cells = "".join(" " * 11 if x is None else f"{x:>11.{digits}f}" for x in scores)
    return " " * (width - _display_width(name)) + name + cells + f"{support:>11}"


@dataclass
class ClassificationReport:
    """Scores of a classifier on N examples of C classes, as fractions in 0-1 (formulas above).

    ``per_class[c]`` is ``{"label", "precision", "recall", "f1", "support"}`` for class c, ``confusion`` the
    (C, C) confusion matrix (rows true, columns predicted) and ``labels[c]`` the name of class c. Macro scores
    are unweighted means over all C classes; ``weighted_f1`` weights each class's F1 by its support.
    """

    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    weighted_f1: float
    per_class: list[dict]
    confusion: list[list[int]]
    labels: list[str]

    def to_dict(self) -> dict:
        """The report as plain floats, ints, strings and lists, ready for ``json.dumps``."""
        return asdict(self)

    def format(self, digits: int = 2) -> str:
        """A text table like scikit-learn's ``classification_report``, with ``digits`` decimals.

        One row per class (precision, recall, f1-score, support), then accuracy, the macro average and the
        support-weighted average. Columns stay aligned for Chinese labels too (wide characters count twice).
        """
        n = sum(row["support"] for row in self.per_class)

        def weighted(key: str) -> float:
            return _safe_div(sum(row[key] * row["support"] for row in self.per_class), n)

        rows = [(r["label"], (r["precision"], r["recall"], r["f1"]), r["support"]) for r in self.per_class]
        summary = [("accuracy", (None, None, self.accuracy), n),
                   ("macro avg", (self.macro_precision, self.macro_recall, self.macro_f1), n),
                   ("weighted avg", (weighted("precision"), weighted("recall"), self.weighted_f1), n)]
        width = max(_display_width(name) for name, _, _ in rows + summary)
        header = " " * width + "".join(f"{h:>11}" for h in ("precision", "recall", "f1-score", "support"))
        body = [_table_row(name, scores, support, width, digits) for name, scores, support in rows]
        tail = [_table_row(name, scores, support, width, digits) for name, scores, support in summary]
        return "\n".join([header, "", *body, "", *tail])


def classification_report(y_true: Sequence[int], y_pred: Sequence[int],
                          labels: Sequence[str]) -> ClassificationReport:
    """Accuracy, per-class and macro precision/recall/F1, weighted F1 and the confusion matrix.

    Args:
        y_true: (N,) true class indices into ``labels``.
        y_pred: (N,) predicted class indices into ``labels``.
        labels: (C,) class names, class c is ``labels[c]``. Every class counts in the macro averages, also one
            with no examples (its recall and F1 are 0), so macro scores are comparable across test sets.

    Raises:
        DataError: no examples, unequal lengths, no or duplicate labels, or an index outside 0..C-1.
    """
    names = _check_labels(labels)
    matrix = confusion_matrix(y_true, y_pred, len(names))
    per_class = [_class_scores(matrix, c, str(name)) for c, name in enumerate(names)]
    n = sum(row["support"] for row in per_class)

    def macro(key: str) -> float:
        return sum(row[key] for row in per_class) / len(per_class)

    return ClassificationReport(
        accuracy=sum(matrix[c][c] for c in range(len(names))) / n,
        macro_precision=macro("precision"),
        macro_recall=macro("recall"),
        macro_f1=macro("f1"),
        weighted_f1=sum(row["f1"] * row["support"] for row in per_class) / n,
        per_class=per_class,
        confusion=matrix,
        labels=[str(name) for name in names],
    )


def _names_to_indices(values: Sequence[str], index: dict, what: str, problem: str, advice: str) -> list[int]:
    unknown = [(i, v) for i, v in enumerate(values) if v not in index]
    if unknown:
        found = sorted({str(v) for _, v in unknown})
        known = _shown(list(index))
        raise DataError(f"{what} {_shown(found)} (first at example {unknown[0][0]}) {problem}; "
                        f"the {len(index)} known labels are: {known}. {advice}")
    return [index[v] for v in values]


def classification_report_from_names(true_names: Sequence[str], pred_names: Sequence[str],
                                     labels: Sequence[str]) -> ClassificationReport:
    """:func:`classification_report` on label strings instead of class indices.

    Args:
        true_names: (N,) the true label of each example; each must be one of ``labels``.
        pred_names: (N,) the predicted label of each example; each must be one of ``labels``.
        labels: (C,) the labels the model was trained on, in the order of its outputs.

    Raises:
        DataError: as :func:`classification_report`, and when a true label was not seen in training or a
            prediction is not one of ``labels``.
    """
    if isinstance(true_names, str) or isinstance(pred_names, str):
        raise DataError("pass lists of labels (one per example), not a single string.")
    names = _check_labels(labels)
    index = {name: c for c, name in enumerate(names)}
    y_true = _names_to_indices(true_names, index, "true label(s)", "were not seen in training",
                               "Drop or relabel those examples, or retrain with these labels.")
    y_pred = _names_to_indices(pred_names, index, "predicted label(s)", "are not among the model's labels",
                               "Predictions must come from the label list the model was trained with.")
    return classification_report(y_true, y_pred, names)


__all__ = ["perplexity", "bits_per_byte", "bleu", "chrf", "rouge", "generation_metrics", "detect_lang", "confusion_matrix",
           "ClassificationReport", "classification_report", "classification_report_from_names",
           "reference_set_bleu", "self_bleu"]
