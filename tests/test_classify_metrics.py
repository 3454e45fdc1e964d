"""Classification metrics: a hand-computed example, agreement with scikit-learn, errors, the confusion PNG."""

from __future__ import annotations

import json
import random
import warnings

import pytest
from sklearn import metrics as skm

from zenlm.errors import DataError
from zenlm.evaluate import (
    ClassificationReport,
    classification_report,
    classification_report_from_names,
    confusion_matrix,
)
from zenlm.viz import plot_confusion_matrix

LABELS = ["cat", "dog", "bird"]
Y_TRUE = [0, 0, 0, 1, 1, 1, 2, 2]
Y_PRED = [0, 0, 1, 1, 1, 1, 2, 0]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- by hand

def test_hand_computed_example() -> None:
    # confusion (rows true, cols predicted):   cat  dog  bird   support
    #                                   cat     2    1    0        3
    #                                   dog     0    3    0        3
    #                                   bird    1    0    1        2
    # predicted (column sums):                  3    4    1
    # cat:  P = 2/3, R = 2/3, F1 = 2/3
    # dog:  P = 3/4, R = 3/3 = 1, F1 = 2 * 3/4 * 1 / (3/4 + 1) = 6/7
    # bird: P = 1/1 = 1, R = 1/2, F1 = 2 * 1 * 1/2 / (3/2) = 2/3
    # accuracy    = (2 + 3 + 1) / 8 = 3/4
    # macro P     = (2/3 + 3/4 + 1) / 3 = 29/36
    # macro R     = (2/3 + 1 + 1/2) / 3 = 13/18
    # macro F1    = (2/3 + 6/7 + 2/3) / 3 = 46/63
    # weighted F1 = (3 * 2/3 + 3 * 6/7 + 2 * 2/3) / 8 = 31/42
    r = classification_report(Y_TRUE, Y_PRED, LABELS)
    assert r.confusion == [[2, 1, 0], [0, 3, 0], [1, 0, 1]]
    assert confusion_matrix(Y_TRUE, Y_PRED, 3) == r.confusion
    assert r.labels == LABELS
    assert r.accuracy == pytest.approx(3 / 4)
    assert r.macro_precision == pytest.approx(29 / 36)
    assert r.macro_recall == pytest.approx(13 / 18)
    assert r.macro_f1 == pytest.approx(46 / 63)
    assert r.weighted_f1 == pytest.approx(31 / 42)
    expected = [("cat", 2 / 3, 2 / 3, 2 / 3, 3), ("dog", 3 / 4, 1.0, 6 / 7, 3), ("bird", 1.0, 1 / 2, 2 / 3, 2)]
    for row, (label, p, rec, f1, support) in zip(r.per_class, expected, strict=True):
        assert row["label"] == label
        assert row["precision"] == pytest.approx(p)
        assert row["recall"] == pytest.approx(rec)
        assert row["f1"] == pytest.approx(f1)
        assert row["support"] == support


def test_class_without_examples_or_predictions_counts_in_macro() -> None:
    # Same data plus a 4th class "fish" that is neither present nor predicted: P = R = F1 = 0 for it, and the
    # macro averages divide by 4: macro F1 = (46/63 * 3) / 4 = 23/42. Accuracy and weighted F1 do not change.
    r = classification_report(Y_TRUE, Y_PRED, [*LABELS, "fish"])
    assert r.per_class[3] == {"label": "fish", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert r.macro_f1 == pytest.approx(23 / 42)
    assert r.macro_precision == pytest.approx(29 / 36 * 3 / 4)
    assert r.accuracy == pytest.approx(3 / 4)
    assert r.weighted_f1 == pytest.approx(31 / 42)
    assert r.confusion[3] == [0, 0, 0, 0] and [row[3] for row in r.confusion] == [0, 0, 0, 0]


def test_from_names_matches_indices() -> None:
    by_index = classification_report(Y_TRUE, Y_PRED, LABELS)
    by_name = classification_report_from_names([LABELS[i] for i in Y_TRUE], [LABELS[i] for i in Y_PRED], LABELS)
    assert by_name == by_index


def test_to_dict_is_json() -> None:
    d = classification_report(Y_TRUE, Y_PRED, LABELS).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {"accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1", "per_class",
                      "confusion", "labels"}
    assert ClassificationReport(**d) == classification_report(Y_TRUE, Y_PRED, LABELS)


def test_format_has_labels_and_macro_f1() -> None:
    r = classification_report(Y_TRUE, Y_PRED, LABELS)
    text = r.format()
    for label in LABELS:
        assert label in text
    assert f"{r.macro_f1:.2f}" in text  # 0.73
    assert "macro avg" in text and "weighted avg" in text and "accuracy" in text
    assert f"{r.macro_f1:.4f}" in r.format(digits=4)


def test_format_aligns_chinese_labels() -> None:
    from zenlm.evaluate import _display_width

    r = classification_report_from_names(["正面", "负面", "中性", "正面"], ["正面", "负面", "正面", "正面"],
                                         ["正面", "负面", "中性"])
    lines = [line for line in r.format().splitlines() if line.strip()]
    assert "正面" in r.format() and "中性" in r.format()
    assert len({_display_width(line) for line in lines}) == 1  # every row ends in the support column


# ----------------------------------------------------------------------------------------- scikit-learn

def _random_case(seed: int) -> tuple[list[int], list[int], int]:
    """Random labels where class 0 has no examples and class C-1 is never predicted."""
    rng = random.Random(seed)
    c = rng.randint(3, 7)
    n = rng.randint(1, 60)
    y_true = [rng.randrange(1, c) for _ in range(n)]
    y_pred = [rng.randrange(0, c - 1) if rng.random() < 0.6 else t for t in y_true]
    y_pred = [c - 2 if p == c - 1 else p for p in y_pred]
    return y_true, y_pred, c


@pytest.mark.parametrize("seed", range(8))
def test_matches_sklearn(seed: int) -> None:
    y_true, y_pred, c = _random_case(seed)
    assert 0 not in y_true and c - 1 not in y_pred
    labels = [f"class{i}" for i in range(c)]
    r = classification_report(y_true, y_pred, labels)
    ids = list(range(c))
    p, rec, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=ids, average=None,
                                                              zero_division=0)
    assert [row["precision"] for row in r.per_class] == pytest.approx(list(p))
    assert [row["recall"] for row in r.per_class] == pytest.approx(list(rec))
    assert [row["f1"] for row in r.per_class] == pytest.approx(list(f1))
    assert [row["support"] for row in r.per_class] == list(support)
    macro = skm.precision_recall_fscore_support(y_true, y_pred, labels=ids, average="macro", zero_division=0)
    assert (r.macro_precision, r.macro_recall, r.macro_f1) == pytest.approx(macro[:3])
    weighted = skm.f1_score(y_true, y_pred, labels=ids, average="weighted", zero_division=0)
    assert r.weighted_f1 == pytest.approx(weighted)
    assert r.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert r.confusion == skm.confusion_matrix(y_true, y_pred, labels=ids).tolist()


# --------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize(("y_true", "y_pred", "labels", "match"), [
    ([], [], LABELS, "no examples"),
    ([0, 1], [0], LABELS, "2 true labels but 1 predictions"),
    ([0, 1], [0, 7], LABELS, "prediction index 7 .* not one of the 3 classes"),
    ([0, 3], [0, 1], LABELS, "label index 3 .* not one of the 3 classes"),
    ([0, -1], [0, 1], LABELS, "label index -1"),
    ([0, 1.5], [0, 1], LABELS, "not an integer class index"),
    ([0], [0], [], "at least one class label"),
    ([0], [0], ["a", "b", "a"], "more than once"),
    ([0], [0], "abc", "list of strings"),
])
def test_report_errors(y_true: list, y_pred: list, labels: list, match: str) -> None:
    with pytest.raises(DataError, match=match):
        classification_report(y_true, y_pred, labels)


def test_confusion_matrix_errors() -> None:
    with pytest.raises(DataError, match="at least one class"):
        confusion_matrix([0], [0], 0)
    with pytest.raises(DataError, match="not one of the 2 classes"):
        confusion_matrix([0, 2], [0, 1], 2)


def test_unseen_true_label_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="not seen in training") as info:
        classification_report_from_names(["cat", "zebra"], ["cat", "dog"], LABELS)
    message = str(info.value)
    assert "'zebra'" in message and "example 1" in message
    assert all(f"'{label}'" in message for label in LABELS)


def test_unknown_predicted_label_and_string_inputs() -> None:
    with pytest.raises(DataError, match="predicted label.*'fish'"):
        classification_report_from_names(["cat", "dog"], ["cat", "fish"], LABELS)
    with pytest.raises(DataError, match="not a single string"):
        classification_report_from_names("cat", "cat", LABELS)


# ------------------------------------------------------------------------------------------------ plot

def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000


@pytest.mark.parametrize("normalize", [False, True])
def test_plot_confusion_matrix_png(tmp_path, normalize: bool) -> None:
    r = classification_report(Y_TRUE, Y_PRED, [*LABELS, "fish"])
    out = plot_confusion_matrix(r.confusion, r.labels, tmp_path / "plots" / "cm.png", normalize=normalize,
                                title="test")
    assert out == tmp_path / "plots" / "cm.png"
    _assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["cm.png"]  # no temporary file left behind


def test_plot_confusion_matrix_chinese_labels(tmp_path) -> None:
    r = classification_report_from_names(["正面", "负面", "中性"], ["正面", "中性", "中性"], ["正面", "负面", "中性"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing")  # no CJK font on the test machine
        out = plot_confusion_matrix(r.confusion, r.labels, str(tmp_path / "cm_zh.png"))
    _assert_png(out)


def test_plot_confusion_matrix_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="square"):
        plot_confusion_matrix([[1, 2], [3]], ["a", "b"], tmp_path / "x.png")
    with pytest.raises(DataError, match="3 labels for a 2x2"):
        plot_confusion_matrix([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_loss_curve_labels_what_the_loss_is_averaged_over(tmp_path, monkeypatch) -> None:
    import matplotlib.axes

    from zenlm.viz import plot_loss_curve

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 2.5, "val_loss": 2.7}]) + "\n")
    labels: list[str] = []
    real = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel",
                        lambda self, label, *a, **k: (labels.append(label), real(self, label, *a, **k))[1])
    for per in ("token", "masked token"):
        png = plot_loss_curve(metrics, tmp_path / f"{per}.png", per=per)
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert labels == ["loss (nats / token)", "loss (nats / masked token)"]
