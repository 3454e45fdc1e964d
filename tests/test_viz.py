"""Plots: Chinese labels are drawn with a font that has them, and nothing floods the terminal."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from matplotlib import font_manager
from matplotlib.ft2font import FT2Font

from zenlm import viz

LABELS = ["体育", "财经", "科技"]
MATRIX = [[5, 1, 0], [0, 6, 1], [1, 0, 7]]


def test_chinese_labels_get_a_font_that_draws_them(tmp_path: Path) -> None:
    fonts = viz.cjk_fonts()
    assert fonts, "no CJK font found: `make install` installs fonts-wqy-microhei"
    path = font_manager.findfont(font_manager.FontProperties(family=fonts[0]), fallback_to_default=False)
    face = FT2Font(path)
    assert all(face.get_char_index(ord(ch)) for label in LABELS for ch in label)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = viz.plot_confusion_matrix(MATRIX, LABELS, tmp_path / "c.png")
    assert out.stat().st_size > 1000
    assert not [w for w in caught if "Glyph" in str(w.message)]


def test_without_a_cjk_font_one_line_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(viz, "cjk_fonts", lambda: ())
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="zenlm.viz"):
        warnings.simplefilter("always")
        viz.plot_confusion_matrix(MATRIX, LABELS, tmp_path / "c.png")
    assert not [w for w in caught if "Glyph" in str(w.message)]  # matplotlib's per-character warnings
    lines = [r.getMessage() for r in caplog.records if r.name == "zenlm.viz"]
    assert len(lines) == 1 and "fonts-wqy-microhei" in lines[0]
