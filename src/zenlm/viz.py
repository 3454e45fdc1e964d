"""Pictures of training and evaluation: loss curves and confusion matrices (matplotlib, PNG, no display needed)."""

from __future__ import annotations

import functools
import json
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from zenlm.errors import DataError  # noqa: E402
from zenlm.fileio import atomic_path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file: JSON objects with a whole-number "step" (other lines, cut short by a
    crash or broken by an edit, are skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            out.append(record)
    return out


def plot_loss_curve(metrics_path: str | Path, out_png: str | Path, title: str | None = None, *,
                    per: str = "token") -> Path:
    """Plot train and validation loss against step; returns the PNG path. ``per``: what one loss value is
    averaged over, for the y label "loss (nats / per)": token (causal LM), masked token (MLM), target token
    (seq2seq), example (classification)."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", lw=1.5, ms=4)
        best = min(v for _, v in val)
        ax.axhline(best, color="grey", lw=0.6, ls="--")
        ax.annotate(f"best val {best:.3f}", (val[-1][0], best), textcoords="offset points", xytext=(-90, 6))
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (nats / {per})")
    ax.set_title(title or Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save_atomic(fig, out_png)


# CJK fonts that may be installed (`make install` adds Debian's fonts-wqy-microhei where apt is available); used
# first when a label has characters DejaVu Sans lacks. Without any, matplotlib would draw empty boxes and print
# a "missing glyph" warning per character: zenlm says so once instead, in one line.
_CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
              "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Arial Unicode MS")
_CJK_FILES = re.compile(r"(wqy|notosanscjk|notoserifcjk|sourcehan|simhei|msyh|pingfang|heiti|arialuni)", re.I)
log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def cjk_fonts() -> tuple[str, ...]:
    """Installed font families that can draw Chinese, best first. Looks in matplotlib's font list and then
    in the system's font folders directly: matplotlib caches its list, so a font installed after the cache was
    written (e.g. by `make install`) would otherwise stay invisible."""
    known = {f.name for f in font_manager.fontManager.ttflist}
    if not any(name in known for name in _CJK_FONTS):
        for path in font_manager.findSystemFonts():
            if _CJK_FILES.search(Path(path).name):
                try:
                    font_manager.fontManager.addfont(path)
                except (OSError, RuntimeError, ValueError):
                    continue
        known = {f.name for f in font_manager.fontManager.ttflist}
    return tuple(name for name in _CJK_FONTS if name in known)


def _font_families(labels: Sequence[str]) -> list[str]:
    """Sans-serif families to draw ``labels`` with: installed CJK fonts first when a label needs them."""
    default = list(plt.rcParams["font.sans-serif"])
    if all(ch.isascii() for label in labels for ch in label):
        return default
    found = cjk_fonts()
    if not found and any(_is_cjk(ch) for label in labels for ch in label):
        log.warning("no font that can draw Chinese is installed, so the plot's Chinese labels show as boxes; "
                    "install one (Debian/Ubuntu: apt install fonts-wqy-microhei, or fonts-noto-cjk)")
    return list(found) + default


def _is_cjk(ch: str) -> bool:
    return "\u2e80" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff" or "\uff00" <= ch <= "\uffef"


def _check_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> list[list[float]]:
    rows = [[float(x) for x in row] for row in matrix]
    if not rows or any(len(row) != len(rows) for row in rows):
        raise DataError("the confusion matrix must be square (C rows of C counts) with at least one class.")
    if len(labels) != len(rows):
        raise DataError(f"{len(labels)} labels for a {len(rows)}x{len(rows)} confusion matrix; "
                        "give one label per class, in the matrix's order.")
    return rows


def _save_atomic(fig: Figure, path: str | Path) -> Path:
    """Save ``fig`` as a PNG at ``path`` via a temporary file and a rename; creates parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], labels: Sequence[str], path: str | Path, *,
                          normalize: bool = False, title: str | None = None) -> Path:
    """Draw a confusion matrix as a heatmap PNG at ``path`` and return the path.

    Args:
        matrix: (C, C) counts, ``matrix[t][p]`` = examples of true class t predicted as p (rows true, y axis;
            columns predicted, x axis), as from :func:`zenlm.evaluate.confusion_matrix`.
        labels: (C,) class names for both axes.
        path: where to write the PNG (parent directories are created; written atomically).
        normalize: divide each row by its sum, so a cell is the fraction of true class t predicted as p
            (its diagonal is the recall of each class); a row with no examples stays 0.
        title: the figure title (default "confusion matrix").
    """
    rows = _check_matrix(matrix, labels)
    n = len(rows)
    if normalize:
        rows = [[x / total for x in row] if (total := sum(row)) else [0.0] * n for row in rows]
    size = min(4.0 + 0.5 * n, 20.0)
    with plt.rc_context({"font.sans-serif": _font_families(labels)}), warnings.catch_warnings():
        # a missing glyph was already reported once, above; matplotlib would repeat it per character
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
        image = ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        if n <= 30:  # beyond that the numbers no longer fit in the cells
            top = max(max(row) for row in rows)
            for t, row in enumerate(rows):
                for p, value in enumerate(row):
                    text = f"{value:.2f}" if normalize else f"{int(value)}"
                    ax.text(p, t, text, ha="center", va="center", fontsize=8,
                            color="white" if top and value > top / 2 else "black")
        ax.set_xticks(range(n), [str(x) for x in labels], rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(n), [str(x) for x in labels])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix"))
        fig.tight_layout()
        return _save_atomic(fig, path)
