"""BLEU, chrF and ROUGE against values computed by hand."""

from __future__ import annotations

import math

import pytest

from zenlm.errors import DataError
from zenlm.evaluate import bleu, chrf, detect_lang, generation_metrics, rouge


def test_bleu_by_hand():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3; same length, so no brevity penalty
    pred, ref = "the cat sat on the mat", "the cat sat on a mat"
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert bleu([pred], [ref], lang="en") == pytest.approx(expected, abs=0.01)
    assert bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)


def test_bleu_chinese_is_scored_per_character():
    # 我爱北京天安门 vs 我爱北京的天安门: precisions 7/7, 5/6, 3/5, 1/4; brevity penalty exp(1 - 8/7)
    pred, ref = "我爱北京天安门", "我爱北京的天安门"
    expected = 100 * math.exp(1 - 8 / 7) * (1 * 5 / 6 * 3 / 5 * 1 / 4) ** 0.25
    assert bleu([pred], [ref]) == pytest.approx(expected, abs=0.01)  # language detected from the references
    assert bleu([pred], [ref], lang="zh") == pytest.approx(expected, abs=0.01)
    assert bleu([pred], [ref], lang="en") == 0.0  # without the zh tokeniser a sentence is one "word"


def test_rouge_by_hand():
    r = rouge(["the cat sat"], ["the cat sat on the mat"], lang="en")
    # ROUGE-1: 3 matches, P = 3/3, R = 3/6 -> F = 2/3;  ROUGE-2: 2 matches, P = 2/2, R = 2/5 -> F = 4/7
    assert r["rouge1"] == pytest.approx(100 * 2 / 3, abs=1e-6)
    assert r["rouge2"] == pytest.approx(100 * 4 / 7, abs=1e-6)
    assert r["rougeL"] == pytest.approx(100 * 2 / 3, abs=1e-6)  # LCS = 3
    # stemming: "cats" matches "cat"
    assert rouge(["cats"], ["cat"], lang="en")["rouge1"] == pytest.approx(100.0)
    # the mean over pairs
    two = rouge(["a b", "x"], ["a b", "y"], lang="en")
    assert two["rouge1"] == pytest.approx(50.0)


def test_rouge_chinese_characters():
    r = rouge(["我爱北京"], ["我爱上海"])
    assert r["rouge1"] == pytest.approx(50.0)  # 我, 爱 of 4 characters each
    assert r["rouge2"] == pytest.approx(100 / 3)  # 我爱 of 3 bigrams each
    mixed = rouge(["GPU 训练"], ["gpu 训练 快"], lang="zh")  # ASCII words stay whole, lower-cased
    assert mixed["rouge1"] == pytest.approx(100 * 2 * 1 * 0.75 / 1.75)


def test_chrf_bounds_and_generation_metrics():
    assert chrf(["hello world"], ["hello world"]) == pytest.approx(100.0)
    assert chrf(["aaaa"], ["zzzz"]) == pytest.approx(0.0)
    m = generation_metrics(["the cat sat"], ["the cat sat on the mat"], lang="en")
    assert set(m) == {"bleu", "chrf", "rouge1", "rouge2", "rougeL"}
    assert generation_metrics(["x"], ["x"], metrics=["rouge"]) .keys() == {"rouge1", "rouge2", "rougeL"}


def test_detect_lang():
    assert detect_lang(["我们今天去北京"]) == "zh"
    assert detect_lang(["hello there", "GPU"]) == "en"
    assert detect_lang([""]) == "en"


@pytest.mark.parametrize("preds,refs", [(["a"], ["a", "b"]), ([], []), ("abc", ["abc"])])
def test_bad_inputs(preds, refs):
    with pytest.raises(DataError):
        bleu(preds, refs)
    with pytest.raises(DataError):
        rouge(preds, refs)


def test_unknown_metric_or_language():
    with pytest.raises(DataError, match="unknown metrics"):
        generation_metrics(["a"], ["a"], metrics=["meteor"])
    with pytest.raises(DataError, match="not supported"):
        rouge(["a"], ["a"], lang="fr")  # type: ignore[arg-type]
