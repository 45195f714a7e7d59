"""The report's figures, drawn with matplotlib's object-oriented API (no pyplot, no global backend).

matplotlib is an optional dependency (extra ``plot``); it is imported when a figure is drawn.
Every function writes one PNG atomically (temporary file in the same folder, then a rename) and
returns its path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from recognite._atomic import atomic_path
from recognite.data.images import read_image

DPI = 100
POSITIVE_COLOR = "#2ca02c"
NEGATIVE_COLOR = "#d62728"
THRESHOLD_COLOR = "#222222"
CURVE_COLORS = ("#1f77b4", "#ff7f0e", "#9467bd", "#8c564b")


def _figure(width: float, height: float, layout: str | None = "constrained") -> Any:
    """A new matplotlib ``Figure`` (Agg canvas) of ``width x height`` inches."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "Reports need the optional dependency matplotlib: pip install 'recognite[plot]'"
        ) from exc
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def check_matplotlib() -> None:
    """Raise the ``ImportError`` of :func:`_figure` now when matplotlib is missing."""
    _figure(1, 1)


def _save(fig: Any, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return Path(path)


def range_digits(span: float) -> int:
    """Decimals (3 to 6) that resolve differences of about ``span / 100``.

    >>> range_digits(1.5), range_digits(0.0004), range_digits(0.0)
    (3, 6, 6)
    """
    if not math.isfinite(span) or span <= 0:
        return 6
    return int(min(6, max(3, math.ceil(-math.log10(span)) + 2)))


def distinct_digits(values: Sequence[float]) -> int:
    """The fewest decimals (3 to 6) that keep distinct ``values`` distinct when rounded.

    >>> distinct_digits([0.5, 0.25]), distinct_digits([0.999941, 0.999949])
    (3, 5)
    """
    finite = sorted({float(v) for v in values if math.isfinite(float(v))})
    for digits in range(3, 7):
        if len({round(v, digits) for v in finite}) == len(finite):
            return digits
    return 6


def _thin(x: np.ndarray, y: np.ndarray, max_points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ``max_points`` evenly spaced points of a long curve (first and last kept)."""
    if x.size <= max_points:
        return x, y
    keep = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(int))
    return x[keep], y[keep]


def plot_pr_curves(
    path: str | os.PathLike,
    pooled_recall: np.ndarray,
    pooled_precision: np.ndarray,
    pooled_ap: float,
    grid_recall: np.ndarray,
    mean_precision: np.ndarray,
    mean_ap: float,
    operating_point: tuple[float, float] | None = None,
    threshold: float | None = None,
    threshold_span: Sequence[float] | None = None,
    chance_precision: float | None = None,
) -> Path:
    """Precision-recall curves: all query-gallery pairs pooled, and the mean of per-query curves.

    Args:
        path: Output PNG.
        pooled_recall: ``(N,)`` recall of the pooled curve (any order matching the precision).
        pooled_precision: ``(N,)`` precision of the pooled curve.
        pooled_ap: Its average precision (shown in the legend).
        grid_recall: ``(R,)`` recall levels of the mean curve.
        mean_precision: ``(R,)`` mean interpolated precision at those levels.
        mean_ap: mAP of the queries (shown in the legend).
        operating_point: ``(recall, precision)`` of the pooled curve at the threshold, if any.
        threshold: The calibrated threshold (shown in the legend of the operating point).
        threshold_span: Scores whose range sets the decimals shown for the threshold.
        chance_precision: Precision of a random ranking of the pooled pairs (fraction of
            positive pairs), drawn as a dotted line.
    """
    fig = _figure(6.4, 4.8)
    ax = fig.add_subplot()
    x, y = _thin(np.asarray(pooled_recall), np.asarray(pooled_precision))
    ax.plot(x, y, drawstyle="steps-post", color=CURVE_COLORS[0], lw=2,
            label=f"all pairs pooled (AP {pooled_ap:.3f})")
    ax.plot(grid_recall, mean_precision, color=CURVE_COLORS[1], lw=2, ls="--",
            label=f"mean of per-query curves (mAP {mean_ap:.3f})")
    if operating_point is not None:
        digits = range_digits(float(np.ptp(np.asarray(threshold_span)))) if threshold_span is not None else 3
        label = "calibrated threshold" + (f" {threshold:.{digits}f}" if threshold is not None else "")
        ax.plot(*operating_point, "o", ms=9, mfc="none", mec=THRESHOLD_COLOR, mew=2,
                label=f"{label} (P {operating_point[1]:.2f}, R {operating_point[0]:.2f})")
    if chance_precision is not None and math.isfinite(chance_precision):
        ax.axhline(chance_precision, color="#777777", ls=":", lw=1.5,
                   label=f"random ranking (pooled) {chance_precision:.3f}")
    ax.set(xlim=(0, 1.01), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title="Precision-recall: retrieving the gallery items of the query's label")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=9, framealpha=0.9)
    return _save(fig, path)


def plot_cmc(path: str | os.PathLike, cmc: Sequence[float], chance: Sequence[float] | None = None) -> Path:
    """Cumulative matching characteristic: fraction of queries with a correct item in the top ``r``.

    Args:
        path: Output PNG.
        cmc: ``(R,)`` curve, ``cmc[r - 1]`` for rank ``r``.
        chance: ``(R,)`` the expected curve of a random gallery order, drawn dotted.
    """
    cmc = np.asarray(cmc, dtype=float)
    ranks = np.arange(1, cmc.size + 1)
    fig = _figure(6.4, 4.4)
    ax = fig.add_subplot()
    ax.plot(ranks, cmc, marker="o", ms=4, color=CURVE_COLORS[0], lw=2, label="queries matched within rank r")
    if chance is not None:
        ax.plot(ranks, np.asarray(chance, dtype=float), color="#777777", ls=":", lw=1.5, label="random ranking")
    for r in (1, 5, 10, 20):
        if r <= cmc.size and math.isfinite(cmc[r - 1]):
            below = cmc[r - 1] > 0.85  # keep the label inside the axes
            ax.annotate(f"top-{r}: {cmc[r - 1]:.3f}", (r, cmc[r - 1]), textcoords="offset points",
                        xytext=(0, -16 if below else 9), ha="center", fontsize=9,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.set(xlim=(0.5, cmc.size + 0.5), ylim=(0, 1.02), xlabel="rank r",
           ylabel="fraction of queries", title="CMC: is a correct gallery item among the first r?")
    ax.set_xticks(ranks if cmc.size <= 20 else np.linspace(1, cmc.size, 11).round())
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    return _save(fig, path)


def plot_score_histograms(
    path: str | os.PathLike,
    hard_pos: np.ndarray,
    hard_neg: np.ndarray,
    pos_pairs: np.ndarray,
    neg_pairs: np.ndarray,
    threshold: float | None = None,
    metric: str = "cosine",
    num_pos_pairs: int | None = None,
    num_neg_pairs: int | None = None,
) -> Path:
    """Histograms of positive vs negative similarity scores, with the open-set threshold.

    Left: per query, the hardest positive (its lowest-scoring gallery item of the same label) and
    the hardest negative (its highest-scoring item of another label). Right: all query-gallery
    pairs (a sample when there are many). Each histogram sums to 1 (bar height = fraction of its
    scores in the bin), since negatives vastly outnumber positives.

    Args:
        path: Output PNG.
        hard_pos: ``(Q_pos,)`` hardest-positive scores.
        hard_neg: ``(Q_neg,)`` hardest-negative scores.
        pos_pairs: Scores of (a sample of) all positive pairs.
        neg_pairs: Scores of (a sample of) all negative pairs.
        threshold: The calibrated open-set threshold (accept when score ``>=`` it).
        metric: The similarity's name, for the axis label.
        num_pos_pairs: Total number of positive pairs (when ``pos_pairs`` is a sample).
        num_neg_pairs: Total number of negative pairs (when ``neg_pairs`` is a sample).
    """
    arrays = [np.asarray(a, dtype=float) for a in (hard_pos, hard_neg, pos_pairs, neg_pairs)]
    arrays = [a[np.isfinite(a)] for a in arrays]
    values = np.concatenate([a for a in arrays if a.size] or [np.zeros(1)])
    low, high = float(values.min()), float(values.max())
    if threshold is not None and math.isfinite(threshold):
        low, high = min(low, threshold), max(high, threshold)
    pad = 0.02 * (high - low) if high > low else 0.5
    bins = np.linspace(low - pad, high + pad, 51)
    digits = range_digits(high - low)
    fig = _figure(11.0, 4.2)
    axes = fig.subplots(1, 2, sharex=True)
    panels = (
        ("Hardest positive vs hardest negative, per query", arrays[0], arrays[1],
         "hardest positive", "hardest negative", None, None),
        ("All query-gallery pairs", arrays[2], arrays[3], "positive pairs", "negative pairs",
         num_pos_pairs, num_neg_pairs),
    )
    for ax, (title, pos, neg, pos_name, neg_name, pos_total, neg_total) in zip(axes, panels):
        for data, name, color, total in ((neg, neg_name, NEGATIVE_COLOR, neg_total),
                                         (pos, pos_name, POSITIVE_COLOR, pos_total)):
            if data.size == 0:
                continue
            count = f"n={data.size:,}" if total is None or total == data.size else f"{data.size:,} of {total:,}"
            ax.hist(data, bins=bins, weights=np.full(data.size, 1.0 / data.size), histtype="stepfilled",
                    alpha=0.45, color=color, edgecolor=color, lw=1.2, label=f"{name} ({count})")
        if threshold is not None and math.isfinite(threshold):
            ax.axvline(threshold, color=THRESHOLD_COLOR, ls="--", lw=1.5, label=f"threshold {threshold:.{digits}f}")
        ax.set(title=title, xlabel=f"{metric} similarity", ylabel="fraction of scores in the bin")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8.5)
    return _save(fig, path)


def plot_training_curves(path: str | os.PathLike, history: Sequence[dict[str, Any]], best_epoch: int | None = None) -> Path:
    """Validation metrics and training loss per epoch (from ``metrics.csv``; epoch 0 = untrained).

    Args:
        path: Output PNG.
        history: Rows with ``epoch`` and any of ``mAP``, ``top1``, ``top5``, ``MAP@R``,
            ``train_loss`` (numbers, or empty / ``None``).
        best_epoch: Epoch of the checkpoint the report is about (marked).
    """
    def column(key: str) -> tuple[np.ndarray, np.ndarray]:
        pairs = [(float(r["epoch"]), _number(r.get(key))) for r in history]
        pairs = [(e, v) for e, v in pairs if v is not None]
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    fig = _figure(11.0, 3.8)
    ax_metrics, ax_loss = fig.subplots(1, 2)
    # Distinct markers and dashes: with one reference per label top-1 and MAP@R coincide.
    styles = (("mAP", "o", "-"), ("top1", "s", "--"), ("top5", "^", "-"), ("MAP@R", "x", ":"))
    highest = 0.0
    for (key, marker, dash), color in zip(styles, CURVE_COLORS):
        epochs, values = column(key)
        if values.size:
            ax_metrics.plot(epochs, values, marker=marker, ms=6, lw=2, ls=dash, color=color, label=key)
            highest = max(highest, float(values.max()))
    if best_epoch is not None:
        ax_metrics.axvline(best_epoch, color=THRESHOLD_COLOR, ls=":", lw=1.2, label=f"checkpoint (epoch {best_epoch})")
    top = 1.02 if highest > 0.6 else min(1.02, max(0.1, 1.3 * highest))
    ax_metrics.set(ylim=(0, top), xlabel="epoch (0 = before training)", ylabel="validation metric",
                   title="Validation on unseen labels")
    ax_metrics.grid(alpha=0.3)
    ax_metrics.legend(loc="best", fontsize=8.5, ncols=2, framealpha=0.9)
    epochs, loss = column("train_loss")
    if loss.size:
        ax_loss.plot(epochs, loss, marker="o", ms=4, lw=2, color=CURVE_COLORS[3], label="training loss")
        ax_loss.legend(loc="upper right", fontsize=8.5)
    else:
        ax_loss.text(0.5, 0.5, "no training loss logged", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set(xlabel="epoch", ylabel="mean loss over the epoch", title="Training loss")
    ax_loss.grid(alpha=0.3)
    all_epochs = [float(r["epoch"]) for r in history]
    for ax in (ax_metrics, ax_loss):
        ax.xaxis.get_major_locator().set_params(integer=True)
        if all_epochs:
            ax.set_xlim(min(all_epochs) - 0.25, max(all_epochs) + 0.25)
    return _save(fig, path)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@dataclass
class RetrievedItem:
    """One cell of the worst-queries grid."""

    image_path: str
    label: str
    score: float | None = None
    correct: bool | None = None
    note: str = ""
    rank: int | None = None


def _thumbnail(image_path: str, size: int) -> np.ndarray:
    try:
        with read_image(image_path) as image:
            image.thumbnail((size, size), Image.Resampling.BICUBIC)
            if max(image.size) < size:  # enlarge tiny images so they are visible
                scale = size / max(image.size)
                new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image = image.resize(new_size, Image.Resampling.NEAREST if scale >= 3 else Image.Resampling.BICUBIC)
            return np.asarray(image)
    except (OSError, ValueError):  # unreadable: a grey square in the grid
        return np.full((size, size, 3), 200, dtype=np.uint8)


def _short(text: str, limit: int = 21) -> str:
    """Shorten in the middle, keeping both ends (labels like ``Alphabet/character12`` differ at the end).

    >>> _short("Malayalam/character12", 15)
    'Malayal…acter12'
    """
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    tail = limit - 1 - head
    return text[:head] + "…" + text[-tail:]


def plot_retrieval_grid(
    path: str | os.PathLike,
    rows: Sequence[tuple[RetrievedItem, Sequence[RetrievedItem]]],
    title: str = "Worst queries and their top gallery items",
    thumb_size: int = 128,
) -> Path:
    """A grid: each row is a query image followed by its best gallery items.

    Correct items (the query's label) are framed green, wrong ones red; each shows its rank (its
    ``rank``, or its position), label and score. The query cell shows its label and ``note`` (e.g.
    its AP). Rows may differ in length (e.g. a last item showing the first correct item further down).

    Args:
        path: Output PNG.
        rows: ``(query, retrieved)`` pairs, ``retrieved`` best first.
        title: Figure title.
        thumb_size: Longest side of the thumbnails in pixels before layout.
    """
    if not rows:
        raise ValueError("rows must hold at least one query.")
    num_cols = 1 + max(len(items) for _, items in rows)
    has_extra = any(items and items[-1].rank is not None and items[-1].rank != len(items) for _, items in rows)
    gap = 0.35 if has_extra else 0.0  # sets a far-down item apart from the top-k
    digits = distinct_digits([item.score for _, items in rows for item in items if item.score is not None])
    # Fixed layout (constrained layout is slow for many axes): square cells, room for 3 text lines.
    cell, text_height, title_height, margin = 1.5, 0.62, 0.5, 0.08
    width = num_cols * (cell + 2 * margin) + gap
    height = title_height + len(rows) * (cell + text_height)
    fig = _figure(width, height, layout=None)
    fig.suptitle(title, fontsize=12, y=1 - 0.12 / height, va="top")
    for r, (query, items) in enumerate(rows):
        cells = [(query, "query")] + [(item, f"#{item.rank or i + 1}") for i, item in enumerate(items)]
        top = height - title_height - r * (cell + text_height)
        for c, (item, kind) in enumerate(cells):
            left = c * (cell + 2 * margin) + margin + (gap if c == num_cols - 1 else 0.0)
            ax = fig.add_axes((left / width, (top - cell) / height, cell / width, cell / height))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(_thumbnail(item.image_path, thumb_size))
            ax.set_aspect("auto")
            if kind == "query":
                color, line_width, weight, text_color = "#1f3b73", 3.0, "bold", "black"
                text = f"QUERY\n{_short(item.label)}" + (f"\n{item.note}" if item.note else "")
            else:
                color = POSITIVE_COLOR if item.correct else NEGATIVE_COLOR
                line_width, weight, text_color = 4.0, "normal", color
                score = f"score {item.score:.{digits}f}" if item.score is not None else ""
                mark = "correct" if item.correct else "wrong"
                text = f"{kind} {mark}" + (f" {item.note}" if item.note else "") + f"\n{_short(item.label)}\n{score}"
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(line_width)
            ax.text(0.5, -0.04, text, transform=ax.transAxes, ha="center", va="top", fontsize=8,
                    color=text_color, fontweight=weight, linespacing=1.15)
    return _save(fig, path)
