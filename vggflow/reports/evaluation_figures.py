"""Figures and tables of the test split: confusion matrix, per-class metrics, worst mistakes.

Pure functions: each takes plain arrays/DataFrames, writes its file atomically (``vggflow.files``)
and returns the path; the evaluation step logs them to MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from vggflow.files import atomic_write_text
from vggflow.reports.figures import (
    BLUE,
    DPI,
    GREEN,
    MAX_WIDTH_IN,
    ORANGE,
    message_figure,
    new_figure,
    save_figure,
    short_label,
    tick_fontsize,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "FIGURE_IMAGE_MAX_SIDE",
    "PER_CLASS_COLUMNS",
    "per_class_metrics",
    "plot_confusion_matrix",
    "plot_misclassified_grid",
    "shrink_for_figure",
    "worst_misclassified",
    "write_per_class_outputs",
]

#: Longest side an image is drawn from in a figure: twice a 3-inch grid cell at the figures' DPI.
#: Drawing full-size photos costs seconds each and looks the same (BENCHMARKS.md, large photos).
FIGURE_IMAGE_MAX_SIDE = 2 * 3 * DPI
#: Above this many classes, per-cell numbers in the confusion matrix become unreadable.
ANNOTATE_MAX_CLASSES = 30

PER_CLASS_COLUMNS = ["class", "precision", "recall", "f1", "support"]


# --------------------------------------------------------------------------- confusion matrix


def plot_confusion_matrix(
    confusion: np.ndarray, class_names: list[str], path: Path, title: str = "Confusion matrix (test)"
) -> Path:
    """Plot counts and row-normalised (recall) confusion matrices in one PNG.

    The panels sit side by side up to 20 classes and are stacked above that, so each keeps
    enough room for its tick labels; above 30 classes cells are not annotated.

    Rows are true classes, columns predicted classes, so the diagonal of the normalised panel is
    per-class recall. Classes absent from the test split get a grey "no samples" row.

    Args:
        confusion: ``(n, n)`` counts, rows = true class, columns = predicted class.
        class_names: ``n`` names, in index order.
        path: PNG to write.
        title: figure title (the image count and accuracy are appended).

    Returns:
        ``path``.
    """
    counts = np.asarray(confusion)
    n = len(class_names)
    if counts.ndim != 2 or counts.shape != (n, n):
        raise ValueError(f"confusion has shape {counts.shape}, expected ({n}, {n}) for {n} class_names")
    if n == 0:
        return message_figure(path, title, "no classes")
    counts = counts.astype(float)
    support = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        percent = np.where(support > 0, 100 * counts / support, np.nan)
    total = counts.sum()
    accuracy = np.trace(counts) / total if total else float("nan")
    integral = bool(np.all(np.mod(counts, 1) == 0))

    # Side by side while cells stay legible; stacked (each panel full width) for many classes.
    stacked = n > 20
    if stacked:
        side = min(9.5, 4.0 + 0.07 * n)
        fig = new_figure(side + 3.0, 2 * (side + 1.6) + 0.6)
        axes = fig.subplots(2, 1)
    else:
        fig = new_figure(10.0 if n <= 6 else MAX_WIDTH_IN, 5.0 if n <= 6 else 6.4)
        axes = fig.subplots(1, 2)

    import matplotlib as mpl

    cmap = mpl.colormaps["Blues"].with_extremes(bad="#E6E6E6")
    labels = [short_label(name) for name in class_names]
    panels = (
        (axes[0], counts, "Counts", "images", None),
        (axes[1], percent, "Row-normalised: diagonal = recall", "% of the true class (row)", 100.0),
    )
    for index, (ax, values, panel_title, bar_label, vmax) in enumerate(panels):
        masked = np.ma.masked_invalid(values)
        top = vmax if vmax is not None else max(float(np.nanmax(values)), 1.0)
        image = ax.imshow(masked, cmap=cmap, vmin=0, vmax=top, interpolation="nearest", aspect="equal")
        colourbar = fig.colorbar(image, ax=ax, shrink=0.85 if not stacked else 0.7, pad=0.02)
        colourbar.set_label(bar_label, fontsize=9)
        colourbar.ax.tick_params(labelsize=8)
        ax.set_title(panel_title, fontsize=11)
        ax.set_xlabel("Predicted class", fontsize=10)
        _set_class_ticks(ax, labels, n)
        if index == 1 and not stacked:
            # Same rows as the left panel: repeating long names would only steal width.
            ax.tick_params(axis="y", labelleft=False)
        else:
            ax.set_ylabel("True class", fontsize=10)
        if n <= ANNOTATE_MAX_CLASSES:
            _annotate_cells(ax, values, top, n, percent=vmax is not None, integral=integral)
            if vmax is not None:
                for row in np.flatnonzero(support[:, 0] == 0):
                    ax.text((n - 1) / 2, row, "no test samples", ha="center", va="center", fontsize=7, color="#555555")

    accuracy_text = f"accuracy {accuracy:.1%}" if total else "no samples"
    fig.suptitle(f"{title}: {int(total) if integral else total:g} images, {n} classes, {accuracy_text}", fontsize=12)
    return save_figure(fig, path)


def _set_class_ticks(ax: Axes, labels: Sequence[str], n: int) -> None:
    size = tick_fontsize(n)
    ticks = np.arange(n)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    # 45° keeps short names readable; 90° packs many long names without overlap.
    rotation = 45 if n <= ANNOTATE_MAX_CLASSES else 90
    ax.set_xticklabels(labels, rotation=rotation, ha="right", rotation_mode="anchor", fontsize=size)
    ax.set_yticklabels(labels, fontsize=size)
    ax.tick_params(length=2)


def _annotate_cells(ax: Axes, values: np.ndarray, top: float, n: int, *, percent: bool, integral: bool) -> None:
    size = 12 if n <= 5 else 9 if n <= 10 else 7 if n <= 20 else 5.5
    for row in range(n):
        for col in range(n):
            value = values[row, col]
            # Zeros off the diagonal are noise at a glance; show the diagonal always.
            if not np.isfinite(value) or (value == 0 and row != col):
                continue
            if percent:
                # Whole percents fit small cells; "<1" keeps rare confusions from reading as 0.
                text = "<1" if 0 < value < 0.5 else f"{value:.0f}"
                text += "%" if n <= 6 else ""
            else:
                text = f"{int(value)}" if integral else f"{value:.3g}"
            colour = "white" if top and value / top > 0.55 else "#1A1A1A"
            ax.text(col, row, text, ha="center", va="center", fontsize=size, color=colour)


# --------------------------------------------------------------------------- per-class metrics


def per_class_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Precision, recall, F1 and support per class.

    Args:
        y_true: true class indices.
        y_pred: predicted class indices, same length.
        class_names: names of classes ``0..n-1``; every class gets a row, absent ones included.

    Returns:
        Columns ``class, precision, recall, f1, support``, one row per class in ``class_names``
        order; undefined ratios (no predictions / no samples) are 0.
    """
    from sklearn.metrics import precision_recall_fscore_support

    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    n = len(class_names)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.size} vs {y_pred.size}")
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        # sklearn silently ignores labels outside `labels`; an index mismatch must not vanish.
        if values.size and (values.min() < 0 or values.max() >= n):
            raise ValueError(f"{name} has class indices outside 0..{n - 1}")
    if y_true.size == 0:
        zeros = np.zeros(n)
        precision = recall = f1 = zeros
        support = np.zeros(n, dtype=int)
    else:
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=list(range(n)), zero_division=0
        )
    return pd.DataFrame(
        {
            "class": [str(name) for name in class_names],
            "precision": np.asarray(precision, dtype=float),
            "recall": np.asarray(recall, dtype=float),
            "f1": np.asarray(f1, dtype=float),
            "support": np.asarray(support, dtype=int),
        },
        columns=PER_CLASS_COLUMNS,
    )


def write_per_class_outputs(table: pd.DataFrame, csv_path: Path, png_path: Path) -> tuple[Path, Path]:
    """Write the per-class table as CSV and as a grouped horizontal bar chart.

    Args:
        table: output of :func:`per_class_metrics`.
        csv_path: CSV to write (full class names, 4 decimals).
        png_path: PNG to write: precision/recall/F1 bars per class, in table order, top to bottom.

    Returns:
        ``(csv_path, png_path)``.
    """
    missing = [c for c in PER_CLASS_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"per-class table lacks columns: {', '.join(missing)}")
    table = table[PER_CLASS_COLUMNS]
    csv_path = atomic_write_text(csv_path, table.to_csv(index=False, float_format="%.4f", lineterminator="\n"))
    return csv_path, _plot_per_class(table, png_path)


def _plot_per_class(table: pd.DataFrame, path: Path) -> Path:
    title = "Per-class precision, recall and F1 (test)"
    n = len(table)
    if n == 0:
        return message_figure(path, title, "no classes")
    per_class_in = 0.45 if n <= 10 else 0.3 if n <= 30 else 0.2
    fig = new_figure(9.0, max(3.2, 1.6 + n * per_class_in))
    ax = fig.subplots()
    positions = np.arange(n)
    bar = 0.27
    series = (("precision", BLUE), ("recall", ORANGE), ("f1", GREEN))
    for offset, (column, colour) in zip((-bar, 0.0, bar), series, strict=True):
        label = "F1" if column == "f1" else column
        ax.barh(positions + offset, table[column].to_numpy(dtype=float), height=bar, color=colour, label=label)
    macro_f1 = float(table["f1"].mean())
    ax.axvline(macro_f1, color="#333333", linestyle="--", linewidth=1, label=f"macro F1 = {macro_f1:.3f}")
    labels = [f"{short_label(name)} (n={int(s)})" for name, s in zip(table["class"], table["support"], strict=True)]
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=tick_fontsize(n) if n > 10 else 9.5)
    ax.invert_yaxis()  # first class on top, like the table
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, 1.0)
    ax.set_xticks(np.linspace(0, 1, 11))
    ax.tick_params(axis="x", labelsize=9)
    ax.grid(axis="x", color="#DDDDDD", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.set_xlabel("score", fontsize=10)
    for position, support in zip(positions, table["support"], strict=True):
        if int(support) == 0:
            ax.text(0.01, position, "no test samples: all scores 0", va="center", fontsize=8, color="#555555")
    fig.legend(loc="outside lower center", ncols=4, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=12)
    return save_figure(fig, path)

    return save_figure(fig, path)


# --------------------------------------------------------------------------- misclassified images


def worst_misclassified(y_true: np.ndarray, probabilities: np.ndarray, limit: int) -> list[int]:
    """Indices of misclassified samples, most confident mistakes first.

    Args:
        y_true: ``(n,)`` true class indices.
        probabilities: ``(n, classes)`` predicted probabilities; the prediction is the argmax.
        limit: at most this many indices are returned.

    Returns:
        Sample indices sorted by decreasing confidence of the (wrong) prediction; ties keep
        sample order.
    """
    y_true = np.asarray(y_true).ravel()
    probabilities = np.asarray(probabilities, dtype=float)
    if limit <= 0 or y_true.size == 0:
        return []
    if probabilities.ndim != 2 or probabilities.shape[0] != y_true.size:
        raise ValueError(f"probabilities must be ({y_true.size}, classes), got {probabilities.shape}")
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    order = np.argsort(-confidence[wrong], kind="stable")
    return [int(i) for i in wrong[order][:limit]]


def plot_misclassified_grid(
    images: list[np.ndarray],
    true_labels: list[str],
    predicted_labels: list[str],
    confidences: list[float],
    path: Path,
    columns: int = 4,
) -> Path:
    """A grid of misclassified images, each titled ``true: X / pred: Y (87%)``.

    Args:
        images: uint8 RGB (or greyscale) arrays of any sizes, e.g. the worst mistakes first.
        true_labels: true class name per image.
        predicted_labels: predicted class name per image.
        confidences: probability of the predicted class, in ``[0, 1]``.
        path: PNG to write; an empty list writes a small "no misclassified test images" figure.
        columns: images per row.

    Returns:
        ``path``.
    """
    n = len(images)
    if not (len(true_labels) == len(predicted_labels) == len(confidences) == n):
        raise ValueError("images, true_labels, predicted_labels and confidences must have the same length")
    title = "Most confident test mistakes"
    if n == 0:
        return message_figure(path, title, "no misclassified test images")
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    cell = min(3.0, max(MAX_WIDTH_IN / columns, 6.0 / columns))
    fig = new_figure(max(6.0, columns * cell), rows * (cell + 0.45) + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    # Wrap long titles at roughly the cell width (about 0.075 in per character at 8 pt).
    chars = max(12, int(cell / 0.075))
    for ax in axes:
        # No ticks and no frame, rather than `set_axis_off()`: with hidden axes, placing each title
        # still measures the hidden tick labels, a large share of this figure's drawing time.
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(False)
    for ax, image, true, pred, conf in zip(axes, images, true_labels, predicted_labels, confidences, strict=False):
        pixels = shrink_for_figure(_as_rgb(image))
        small = max(pixels.shape[:2]) < 96
        # Nearest keeps small images (e.g. 28x28) crisp instead of blurring them when enlarged.
        ax.imshow(pixels, interpolation="nearest" if small else "antialiased")
        ax.set_title(_wrap_title(f"true: {true} / pred: {pred} ({conf:.0%})", chars), fontsize=8, color="#A0001B")
    fig.suptitle(f"{title} ({n} shown, highest confidence first)", fontsize=12)
    return save_figure(fig, path)


def shrink_for_figure(pixels: np.ndarray, max_side: int = FIGURE_IMAGE_MAX_SIDE) -> np.ndarray:
    """``pixels`` (uint8, H x W [x C]) scaled down to at most ``max_side`` on its longest side.

    Smaller images come back unchanged; larger ones are reduced by Pillow (box filter, then
    bilinear), which looks the same at a figure's resolution as drawing the original.
    """
    if max(pixels.shape[:2]) <= max_side:
        return pixels
    from PIL import Image

    image = Image.fromarray(pixels)
    image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(image)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    pixels = np.asarray(image)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image, got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return pixels


def _wrap_title(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    true_part, _, pred_part = text.partition(" / ")
    return "\n".join(short_label(part, width) for part in (true_part + " /", pred_part))
