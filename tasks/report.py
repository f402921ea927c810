"""Per-run report artifacts: figures, per-class table and the model card.

Pure functions: each takes plain arrays/DataFrames, writes one file atomically (a temporary file
in the same directory, then ``os.replace``) and returns its path; the training flow logs them to
MLflow. Nothing here imports TensorFlow, Prefect or MLflow, and matplotlib is imported lazily.

Figures are built with :class:`matplotlib.figure.Figure` rather than ``pyplot``: pyplot keeps a
global registry of open figures that is not thread-safe (Prefect runs tasks in threads) and leaks
unless every figure is closed; a bare ``Figure`` is freed like any other object.
"""

from __future__ import annotations

import math
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "ModelCardInfo",
    "per_class_metrics",
    "plot_confusion_matrix",
    "plot_learning_curves",
    "plot_misclassified_grid",
    "plot_stage_comparison",
    "render_model_card",
    "shrink_for_figure",
    "worst_misclassified",
    "write_per_class_outputs",
]

DPI = 120
MAX_WIDTH_IN = 12.0
#: Longest side an image is drawn from in a figure: twice a 3-inch grid cell at DPI. Drawing
#: sixteen 12-megapixel photos at full size took matplotlib 14.6 s.
FIGURE_IMAGE_MAX_SIDE = 2 * 3 * DPI
#: Above this many classes, per-cell numbers in the confusion matrix become unreadable.
ANNOTATE_MAX_CLASSES = 30
#: Tick labels longer than this are shortened in figures (the CSV and card keep full names).
MAX_LABEL_CHARS = 28

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
BLUE, ORANGE, GREEN, VERMILION, SKY, PURPLE, YELLOW = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#56B4E9",
    "#CC79A7",
    "#F0E442",
)
STAGE_COLOURS = (BLUE, VERMILION, GREEN, PURPLE, ORANGE, SKY, "#000000", YELLOW)
GREY = "#8C8C8C"
HIGHLIGHT = "#FFE08A"

PER_CLASS_COLUMNS = ["class", "precision", "recall", "f1", "support"]
HISTORY_COLUMNS = ["stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy"]


# --------------------------------------------------------------------------- helpers: files


def _atomic_write(path: Path, write: Callable[[IO[Any]], None], *, binary: bool) -> Path:
    """Write ``path`` via a temporary sibling and ``os.replace``; readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling on the same filesystem, so os.replace is atomic; opened with "x" (not
    # mkstemp) so the final file gets normal umask permissions instead of 0600.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        if binary:
            handle: IO[Any] = open(tmp, "xb")
        else:
            handle = open(tmp, "x", encoding="utf-8", newline="")
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _new_figure(width: float, height: float) -> Figure:
    """A headless figure not registered with pyplot (nothing to close, nothing to leak)."""
    import matplotlib

    # Agg so that nothing (ours or a later pyplot import) tries a display. Skipped when pyplot is
    # already in use: switching backends then would close the caller's open figures.
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, MAX_WIDTH_IN), height), dpi=DPI, layout="constrained")


def _save_figure(fig: Figure, path: Path) -> Path:
    try:
        return _atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI), binary=True)
    finally:
        fig.clear()  # drop artists now rather than waiting for the cyclic GC


def _message_figure(path: Path, title: str, message: str) -> Path:
    """A small figure that says why there is nothing to plot (a missing file looks like a bug)."""
    fig = _new_figure(6.0, 2.0)
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.45, message, ha="center", va="center", fontsize=12, color="#444444")
    return _save_figure(fig, path)


def _short(label: str, limit: int = MAX_LABEL_CHARS) -> str:
    """Shorten a long label in the middle: prefixes and suffixes both tend to distinguish classes."""
    label = str(label).replace("\n", " ")
    if len(label) <= limit:
        return label
    head = (limit - 1) * 3 // 5
    tail = limit - 1 - head
    return f"{label[:head]}…{label[-tail:]}"


def _tick_fontsize(n: int) -> float:
    if n <= 10:
        return 10
    if n <= 20:
        return 8.5
    if n <= 40:
        return 7
    if n <= 70:
        return 6
    return 5


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
        return _message_figure(path, title, "no classes")
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
        fig = _new_figure(side + 3.0, 2 * (side + 1.6) + 0.6)
        axes = fig.subplots(2, 1)
    else:
        fig = _new_figure(10.0 if n <= 6 else MAX_WIDTH_IN, 5.0 if n <= 6 else 6.4)
        axes = fig.subplots(1, 2)

    import matplotlib as mpl

    cmap = mpl.colormaps["Blues"].with_extremes(bad="#E6E6E6")
    labels = [_short(name) for name in class_names]
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
    return _save_figure(fig, path)


def _set_class_ticks(ax: Axes, labels: Sequence[str], n: int) -> None:
    size = _tick_fontsize(n)
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
    csv_path = _atomic_write(
        csv_path, lambda fh: table.to_csv(fh, index=False, float_format="%.4f", lineterminator="\n"), binary=False
    )
    return csv_path, _plot_per_class(table, png_path)


def _plot_per_class(table: pd.DataFrame, path: Path) -> Path:
    title = "Per-class precision, recall and F1 (test)"
    n = len(table)
    if n == 0:
        return _message_figure(path, title, "no classes")
    per_class_in = 0.45 if n <= 10 else 0.3 if n <= 30 else 0.2
    fig = _new_figure(9.0, max(3.2, 1.6 + n * per_class_in))
    ax = fig.subplots()
    positions = np.arange(n)
    bar = 0.27
    series = (("precision", BLUE), ("recall", ORANGE), ("f1", GREEN))
    for offset, (column, colour) in zip((-bar, 0.0, bar), series, strict=True):
        label = "F1" if column == "f1" else column
        ax.barh(positions + offset, table[column].to_numpy(dtype=float), height=bar, color=colour, label=label)
    macro_f1 = float(table["f1"].mean())
    ax.axvline(macro_f1, color="#333333", linestyle="--", linewidth=1, label=f"macro F1 = {macro_f1:.3f}")
    labels = [f"{_short(name)} (n={int(s)})" for name, s in zip(table["class"], table["support"], strict=True)]
    ax.set_yticks(positions)
    ax.set_yticklabels(labels, fontsize=_tick_fontsize(n) if n > 10 else 9.5)
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
    return _save_figure(fig, path)


# --------------------------------------------------------------------------- learning curves


def plot_learning_curves(history: pd.DataFrame, chosen_stage: str, path: Path) -> Path:
    """Plot loss and accuracy over all stages on one global epoch axis.

    Each stage has its own colour; training is dashed, validation solid. Dotted vertical lines
    separate stages (named above the plot) and the chosen stage's span is shaded. Stages with no
    rows (skipped) are simply absent.

    Args:
        history: columns ``stage, epoch, loss, accuracy, val_loss, val_accuracy``; ``epoch`` is
            0-based within its stage; stages are plotted in order of first appearance. Missing
            metric columns or values are left out of the plot.
        chosen_stage: the stage whose weights were kept.
        path: PNG to write.

    Returns:
        ``path``.
    """
    missing = [c for c in ("stage", "epoch") if c not in history.columns]
    if missing:
        raise ValueError(f"history lacks columns: {', '.join(missing)}")
    # Keras omits val_* when there is no validation data: plot what exists rather than fail the run.
    history = history.assign(**{c: np.nan for c in HISTORY_COLUMNS if c not in history.columns})
    title = f"Learning curves (chosen stage: {chosen_stage})"
    if history.empty:
        return _message_figure(path, title, "no training epochs recorded")

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.transforms import blended_transform_factory

    stages = [str(s) for s in pd.unique(history["stage"].astype(str))]
    spans: list[tuple[str, float, float, pd.DataFrame]] = []
    offset = 0
    for stage in stages:
        rows = history[history["stage"].astype(str) == stage].sort_values("epoch", kind="stable")
        length = int(rows["epoch"].max()) + 1
        rows = rows.assign(global_epoch=offset + rows["epoch"].to_numpy(dtype=int) + 1)  # 1-based like Keras logs
        spans.append((stage, offset + 0.5, offset + length + 0.5, rows))
        offset += length
    total_epochs = offset

    fig = _new_figure(10.0, 7.2)
    loss_ax, acc_ax = fig.subplots(2, 1, sharex=True)
    colours = {stage: STAGE_COLOURS[i % len(STAGE_COLOURS)] for i, stage in enumerate(stages)}
    marker_size = 3.5 if total_epochs <= 60 else 0  # markers make one-epoch stages visible
    for ax, metric, label in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "accuracy")):
        for stage, start, end, rows in spans:
            if stage == chosen_stage:
                ax.axvspan(start, end, color=HIGHLIGHT, alpha=0.55, linewidth=0, zorder=0)
            for column, style in ((metric, "--"), (f"val_{metric}", "-")):
                values = rows[["global_epoch", column]].dropna()
                ax.plot(
                    values["global_epoch"],
                    values[column],
                    linestyle=style,
                    color=colours[stage],
                    marker="o",
                    markersize=marker_size,
                    linewidth=1.6,
                )
        for _, start, _, _ in spans[1:]:
            ax.axvline(start, color=GREY, linestyle=":", linewidth=1.2)
        ax.set_ylabel(label, fontsize=10)
        ax.grid(color="#E5E5E5", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.tick_params(labelsize=9)
    acc_ax.set_xlim(0.5, total_epochs + 0.5)
    acc_ax.set_xlabel("epoch (global, across stages)", fontsize=10)
    if total_epochs <= 30:
        acc_ax.set_xticks(range(1, total_epochs + 1))
    else:
        from matplotlib.ticker import MaxNLocator

        acc_ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    # Stage names above the top panel; rotated when the span is too narrow for the name.
    axes_width_in = fig.get_figwidth() - 1.3
    on_top = blended_transform_factory(loss_ax.transData, loss_ax.transAxes)
    for stage, start, end, _ in spans:
        span_in = (end - start) / max(total_epochs, 1) * axes_width_in
        narrow = span_in < 0.075 * len(stage) + 0.1
        loss_ax.text(
            (start + end) / 2,
            1.02,
            stage,
            transform=on_top,
            ha="center" if not narrow else "left",
            va="bottom",
            rotation=0 if not narrow else 60,
            rotation_mode="anchor",
            fontsize=9,
            fontweight="bold" if stage == chosen_stage else "normal",
            color=colours[stage],
        )

    handles: list[Any] = [Patch(color=colours[s], label=s) for s in stages]
    handles += [
        Line2D([], [], color="#333333", linestyle="--", label="train"),
        Line2D([], [], color="#333333", linestyle="-", label="validation"),
    ]
    if chosen_stage in stages:
        handles.append(Patch(color=HIGHLIGHT, alpha=0.55, label=f"chosen: {chosen_stage}"))
    else:
        title += " (no epochs recorded for it)"
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 8), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=12)
    return _save_figure(fig, path)


# --------------------------------------------------------------------------- stage comparison


def plot_stage_comparison(stages: pd.DataFrame, metric: str, chosen_stage: str, path: Path) -> Path:
    """Bar chart of one metric per stage, the chosen stage highlighted, values printed on the bars.

    Args:
        stages: columns ``stage`` and ``metric``, one row per stage in training order; a missing
            value (skipped stage) is shown as "skipped".
        metric: column to plot, e.g. ``val_accuracy`` or ``val_loss``.
        chosen_stage: stage to highlight.
        path: PNG to write.

    Returns:
        ``path``.
    """
    for column in ("stage", metric):
        if column not in stages.columns:
            raise ValueError(f"stages lacks column {column!r}")
    lower_is_better = "loss" in metric.lower()
    title = f"Best {metric} per stage ({'lower' if lower_is_better else 'higher'} is better)"
    if stages.empty:
        return _message_figure(path, title, "no stages")

    names = [str(s) for s in stages["stage"]]
    values = pd.to_numeric(stages[metric], errors="coerce").to_numpy(dtype=float)
    n = len(names)
    fig = _new_figure(max(6.0, 2.0 + 1.1 * n), 4.8)
    ax = fig.subplots()
    positions = np.arange(n)
    chosen = np.array([name == chosen_stage for name in names])
    colours = [ORANGE if c else SKY for c in chosen]
    heights = np.nan_to_num(values, nan=0.0)
    bars = ax.bar(positions, heights, color=colours, edgecolor=["#333333" if c else "none" for c in chosen], width=0.65)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 1.0
    if "accuracy" in metric.lower() or "f1" in metric.lower():
        top = max(top, 1.0)
    ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)
    for rect, value, is_chosen in zip(bars, values, chosen, strict=True):
        text = "skipped" if not np.isfinite(value) else f"{value:.3f}"
        ax.text(
            rect.get_x() + rect.get_width() / 2,
            rect.get_height() + top * 0.01,
            text,
            ha="center",
            va="bottom",
            fontsize=9,
            fontweight="bold" if is_chosen else "normal",
        )
    labels = [_short(name, 18) + ("\n(chosen)" if c else "") for name, c in zip(names, chosen, strict=True)]
    long_names = n > 6 or max(len(x) for x in names) > 10
    ax.set_xticks(positions)
    ax.set_xticklabels(
        labels,
        rotation=30 if long_names else 0,
        ha="right" if long_names else "center",
        rotation_mode="anchor",
        fontsize=9,
    )
    ax.set_ylabel(metric, fontsize=10)
    ax.set_xlabel("stage (training order)", fontsize=10)
    ax.tick_params(axis="y", labelsize=9)
    ax.grid(axis="y", color="#E5E5E5", linewidth=0.6)
    ax.set_axisbelow(True)
    suffix = f"; chosen: {chosen_stage}" if chosen.any() else f"; chosen stage {chosen_stage!r} not in table"
    fig.suptitle(title[:-1] + suffix + ")", fontsize=12)
    return _save_figure(fig, path)


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
        return _message_figure(path, title, "no misclassified test images")
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    cell = min(3.0, max(MAX_WIDTH_IN / columns, 6.0 / columns))
    fig = _new_figure(max(6.0, columns * cell), rows * (cell + 0.45) + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False)).ravel()
    # Wrap long titles at roughly the cell width (about 0.075 in per character at 8 pt).
    chars = max(12, int(cell / 0.075))
    for ax in axes:
        # No ticks and no frame, rather than `set_axis_off()`: placing each title then still
        # measured the hidden tick labels, a third of this figure's time (~0.15 s for 16 images).
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
    return _save_figure(fig, path)


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
    return "\n".join(_short(part, width) for part in (true_part + " /", pred_part))


# --------------------------------------------------------------------------- model card


@dataclass(kw_only=True, eq=False)
class ModelCardInfo:
    """Everything the model card says about one trained model.

    Attributes:
        model_name: registered model name.
        version: registered version, or None when not registered.
        run_id: MLflow run id of the training run.
        created: creation time, as text.
        data_version: DVC md5 (or other id) of the training data.
        data_matches_dvc: whether the data on disk matched the DVC file; None = not checked.
        class_counts: ``{label: count}`` or, better, ``{label: {split: count}}``.
        image_size: square input side in pixels.
        backbone_weights: ``imagenet``, a weights path or ``none``.
        random_init: True when the backbone had no pretrained weights.
        freeze_configuration: keys ``stage, first_trainable_layer, trainable_layers,
            trainable_params, learning_rate``.
        stage_results: one dict per stage: ``stage, best_val_accuracy, best_val_loss, epochs``
            (``val_accuracy``/``val_loss`` accepted too).
        test_metrics: e.g. ``{"accuracy": 0.91, "macro_f1": 0.90}``.
        per_class: :func:`per_class_metrics` output, or a list of such rows.
        promotion: keys ``decision, reason, metric, candidate_metric, champion_metric, delta``
            (extra keys are shown as-is), or None when no gate ran.
        config_yaml: the effective configuration.
        git_commit: commit of the code that trained the model.
        git_dirty: whether the working tree had uncommitted changes.
    """

    model_name: str
    version: str | None = None
    run_id: str
    created: str
    data_version: str
    data_matches_dvc: bool | None = None
    class_counts: Mapping[str, int] | Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    image_size: int
    backbone_weights: str
    random_init: bool
    freeze_configuration: Mapping[str, Any] = field(default_factory=dict)
    stage_results: list[Mapping[str, Any]] = field(default_factory=list)
    test_metrics: Mapping[str, float] = field(default_factory=dict)
    per_class: pd.DataFrame | list[Mapping[str, Any]] = field(default_factory=list)
    promotion: Mapping[str, Any] | None = None
    config_yaml: str = ""
    git_commit: str = "unknown"
    git_dirty: bool = False


RANDOM_INIT_WARNING = (
    "the backbone was randomly initialised (no ImageNet weights): this model is for pipeline demonstration only"
)
_SPLIT_ORDER = ("train", "val", "validation", "test")
# Characters that would end a table cell or start emphasis, code, links or HTML in a name. An
# underscore inside a word (block5_conv1) is literal in GitHub/CommonMark, so only the others are.
_MD_SPECIAL = re.compile(r"([\\|*`\[\]<>#])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def _md(text: Any) -> str:
    """Escape a value for inline Markdown, including inside a table cell."""
    flat = str(text).replace("\r", " ").replace("\n", " ")
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), flat)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return "n/a"
        if value != 0 and (abs(value) < 10 ** -(digits - 1) or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        shown = ", ".join(str(v) for v in value[:6])
        return f"{len(value)} ({shown}{', …' if len(value) > 6 else ''})"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table; every cell escaped, so every row has the same ``|`` count."""
    align = align or ["l"] * len(header)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "| " + " | ".join(marks[a] for a in align) + " |"]
    for row in rows:
        cells = list(row)
        if len(cells) != len(header):
            raise ValueError(f"table row has {len(cells)} cells, header has {len(header)}")
        lines.append("| " + " | ".join(c if isinstance(c, _Raw) else _md(c) for c in cells) + " |")
    return "\n".join(lines)


class _Raw(str):
    """A cell that is already Markdown (e.g. bold), not to be escaped; must not contain ``|``."""


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in mapping and mapping[key] is not None:
            return mapping[key]
    return None


def _per_class_rows(per_class: pd.DataFrame | list[Mapping[str, Any]]) -> pd.DataFrame:
    return per_class if isinstance(per_class, pd.DataFrame) else pd.DataFrame(list(per_class))


def _counts_table(class_counts: Mapping[str, Any]) -> tuple[str, int | None, int]:
    """Class-count table, the number of training images (None if unknown) and the total."""
    if not class_counts:
        return "_No class counts were recorded._", None, 0
    nested = all(isinstance(v, Mapping) for v in class_counts.values())
    if not nested:
        total = sum(int(v) for v in class_counts.values())
        rows = [(label, _fmt(int(count))) for label, count in class_counts.items()]
        rows.append((_Raw("**total**"), _Raw(f"**{_fmt(total)}**")))
        return _table(["class", "images"], rows, ["l", "r"]), None, total
    seen = {split for counts in class_counts.values() for split in counts}
    splits = [s for s in _SPLIT_ORDER if s in seen] + sorted(seen.difference(_SPLIT_ORDER))
    rows = []
    for label, counts in class_counts.items():
        cells = [_fmt(int(counts.get(split, 0))) for split in splits]
        rows.append([label, *cells, _fmt(sum(int(v) for v in counts.values()))])
    split_totals = [sum(int(c.get(split, 0)) for c in class_counts.values()) for split in splits]
    total = sum(split_totals)
    rows.append([_Raw("**total**"), *(_Raw(f"**{_fmt(t)}**") for t in split_totals), _Raw(f"**{_fmt(total)}**")])
    train = split_totals[splits.index("train")] if "train" in splits else None
    return _table(["class", *splits, "total"], rows, ["l"] + ["r"] * (len(splits) + 1)), train, total


def _code_fence(text: str) -> str:
    """A backtick fence longer than any backtick run inside ``text``."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_model_card(info: ModelCardInfo) -> str:
    """Render the model card as Markdown (also the registered model version's description).

    Args:
        info: what to say.

    Returns:
        Markdown with sections Summary, Intended use, Limitations, Training data, Training
        procedure, Evaluation, Promotion decision and Reproduce.
    """
    per_class = _per_class_rows(info.per_class)
    class_names = (
        [str(c) for c in per_class["class"]] if "class" in per_class.columns else [str(c) for c in info.class_counts]
    )
    n_classes = len(class_names)
    counts_md, train_images, total_images = _counts_table(info.class_counts)
    test_images = int(per_class["support"].sum()) if "support" in per_class.columns else None
    freeze = info.freeze_configuration
    chosen = freeze.get("stage")
    version = f"version {info.version}" if info.version else "not registered"
    out: list[str] = [f"# Model card: {_md(info.model_name)} ({_md(version)})", ""]
    out.append(f"MLflow run `{info.run_id}` · created {_md(info.created)} · data version `{info.data_version}`")
    out.append("")
    if info.random_init:
        out += [f"> **WARNING: {RANDOM_INIT_WARNING}.**", ""]

    # Summary --------------------------------------------------------------------------------
    shown = ", ".join(_md(c) for c in class_names[:8]) + (f", … ({n_classes} in all)" if n_classes > 8 else "")
    trained_on = (
        f"{_fmt(train_images)} training images" if train_images is not None else f"{_fmt(total_images)} labelled images"
    )
    if info.random_init:
        backbone = "a randomly initialised VGG19 backbone"
    elif info.backbone_weights.lower() == "imagenet":
        backbone = "an ImageNet-pretrained VGG19 backbone"
    else:
        backbone = f"a VGG19 backbone (weights: {_md(info.backbone_weights)})"
    metrics_text = ", ".join(f"{_md(k)} {_fmt(v)}" for k, v in info.test_metrics.items()) or "no recorded metrics"
    summary = (
        f"An image classifier that assigns each image to one of {n_classes} classes ({shown}). "
        f"It was trained by transfer learning on {backbone}, on {trained_on} resized to "
        f"{info.image_size}×{info.image_size} px, with staged fine-tuning; the kept freeze configuration "
        f"is stage `{chosen if chosen is not None else 'unknown'}`. "
        f"On the held-out test split{f' ({_fmt(test_images)} images)' if test_images is not None else ''} "
        f"it scores {metrics_text}."
    )
    if info.promotion:
        summary += f" Promotion decision: **{_md(info.promotion.get('decision', 'unknown'))}**."
    out += ["## Summary", "", summary, ""]

    # Intended use ---------------------------------------------------------------------------
    out += [
        "## Intended use",
        "",
        f"- Classifying images that resemble the training data (same source, framing and kind of content) "
        f"into exactly one of the {n_classes} classes listed under *Training data*.",
        "- Comparing training runs and freeze configurations of this pipeline in MLflow.",
        "- Not intended for decisions about people, for safety-critical use, or for images unlike the training data.",
        "",
    ]

    # Limitations ----------------------------------------------------------------------------
    limits: list[str] = []
    if info.random_init:
        limits.append(f"**{RANDOM_INIT_WARNING[0].upper() + RANDOM_INIT_WARNING[1:]}.**")
    if train_images is not None:
        only = "only " if train_images < 1000 else ""
        limits.append(f"Trained on {only}{_fmt(train_images)} images ({_fmt(total_images)} across all splits).")
    else:
        limits.append(f"Trained on a subset of {_fmt(total_images)} labelled images (all splits together).")
    if test_images:
        limits.append(
            f"Test metrics come from {_fmt(test_images)} images of one random split: one image changes "
            f"accuracy by {100 / test_images:.2g} percentage points; no confidence intervals were computed."
        )
    limits += [
        f"Inputs are resized to {info.image_size}×{info.image_size} px RGB; fine detail lost at that size cannot be "
        f"used.",
        "Closed label set: an image of a class outside the label set is still forced into one of the "
        f"{n_classes} classes; there is no “unknown” or reject option.",
        "No calibration check: the predicted probabilities were not calibrated or checked; do not read "
        "a confidence of 0.9 as a 90% chance of being right.",
        "No robustness, bias or subgroup evaluation was done.",
    ]
    if info.data_matches_dvc is False:
        limits.append(
            "**The data on disk did not match the DVC-tracked version:** the training data cannot be "
            "recovered from the git commit alone."
        )
    elif info.data_matches_dvc is None:
        limits.append("The training data was not checked against the DVC-tracked version.")
    if info.git_dirty:
        limits.append("The code had uncommitted changes: the git commit alone does not reproduce this model.")
    if not info.random_init and info.backbone_weights.lower() == "imagenet":
        limits.append("The backbone inherits the biases (and licence terms) of its ImageNet pre-training.")
    out += ["## Limitations", "", *(f"- {line}" for line in limits), ""]

    # Training data --------------------------------------------------------------------------
    match = {True: "yes", False: "**no**", None: "not checked"}[info.data_matches_dvc]
    out += [
        "## Training data",
        "",
        f"- Data version (DVC md5): `{info.data_version}`",
        f"- Matches the DVC-tracked version: {match}",
        "",
        counts_md,
        "",
    ]

    # Training procedure ---------------------------------------------------------------------
    weights = "none (random initialisation)" if info.random_init else info.backbone_weights
    out += [
        "## Training procedure",
        "",
        f"- Backbone: VGG19 convolutional base, weights: {_md(weights)}",
        f"- Input: {info.image_size}×{info.image_size} px RGB",
        "- Method: train a new classification head on frozen features (stage `head`), then unfreeze the "
        "base from deeper to shallower blocks in stages, each starting from the best weights so far; the "
        "best stage on the validation split is kept.",
        "",
        "**Kept freeze configuration**",
        "",
    ]
    freeze_labels = {
        "stage": "stage",
        "first_trainable_layer": "first trainable layer",
        "trainable_layers": "trainable layers",
        "trainable_params": "trainable parameters",
        "learning_rate": "learning rate",
    }
    freeze_rows = [(freeze_labels.get(k, k), _fmt_freeze(k, v)) for k, v in _ordered(freeze, freeze_labels)]
    out += [_table(["setting", "value"], freeze_rows) if freeze_rows else "_Not recorded._", ""]
    out += ["**Stages**", ""]
    stage_rows = []
    for result in info.stage_results:
        name = str(result.get("stage", "?"))
        epochs = result.get("epochs")
        skipped = epochs in (0, None) and _first(result, "best_val_accuracy", "val_accuracy") is None
        stage_rows.append(
            [
                _Raw(f"**{_md(name)}** (kept)") if name == chosen else name,
                _fmt(_first(result, "best_val_accuracy", "val_accuracy")),
                _fmt(_first(result, "best_val_loss", "val_loss")),
                "skipped" if skipped else _fmt(epochs),
            ]
        )
    out += [
        _table(["stage", "best val_accuracy", "best val_loss", "epochs"], stage_rows, ["l", "r", "r", "r"])
        if stage_rows
        else "_No stage results were recorded._",
        "",
    ]

    # Evaluation -----------------------------------------------------------------------------
    out += ["## Evaluation", "", f"Test split{f', {_fmt(test_images)} images' if test_images is not None else ''}.", ""]
    metric_rows = [(k, _fmt(v)) for k, v in info.test_metrics.items()]
    out += [_table(["metric", "value"], metric_rows, ["l", "r"]) if metric_rows else "_No test metrics._", ""]
    if not per_class.empty:
        columns = [c for c in PER_CLASS_COLUMNS if c in per_class.columns]
        rows = [[_fmt_cell(c, row[c]) for c in columns] for _, row in per_class.iterrows()]
        out += ["**Per class**", "", _table(columns, rows, ["l"] + ["r"] * (len(columns) - 1)), ""]

    # Promotion ------------------------------------------------------------------------------
    out += ["## Promotion decision", ""]
    if info.promotion:
        promotion = dict(info.promotion)
        known = [
            ("decision", ("decision",)),
            ("reason", ("reason",)),
            ("metric", ("metric", "primary_metric")),
            ("candidate (this model)", ("candidate_metric", "candidate")),
            ("champion", ("champion_metric", "champion")),
            ("delta (candidate − champion)", ("delta",)),
        ]
        rows, used = [], set()
        for label, keys in known:
            present = [k for k in keys if k in promotion]
            used.update(present)
            if not present:
                continue
            value = promotion[present[0]]
            if label == "champion" and value is None:
                text = "none (no champion yet)"
            elif label.startswith("delta") and isinstance(value, (int, float)) and math.isfinite(value):
                text = f"{value:+.4f}"
            else:
                text = _fmt(value)
            rows.append((label, text))
        rows += [(k, _fmt(v)) for k, v in promotion.items() if k not in used]
        out += [_table(["field", "value"], rows), ""]
    else:
        out += ["No promotion gate ran for this model (registration only, or promotion disabled).", ""]

    # Reproduce ------------------------------------------------------------------------------
    dirty = (
        "**yes: uncommitted changes were present, so this commit alone does not reproduce the model**"
        if info.git_dirty
        else "no"
    )
    if info.data_matches_dvc is False:
        data_hint = (
            f"**the training data (version `{info.data_version}`) did not match `data.dvc` at that commit**, "
            "so `dvc pull` restores different data"
        )
    else:
        data_hint = f"`dvc pull` at that commit restores data version `{info.data_version}`"
    out += [
        "## Reproduce",
        "",
        f"- Git commit: `{info.git_commit}`",
        f"- Uncommitted changes: {dirty}",
        f"- Data: {data_hint}",
        "",
        "```bash",
        f"git checkout {info.git_commit}",
        "dvc pull",
        "vggflow train --config config.yaml   # config.yaml: the configuration below (also logged with the run)",
        "```",
        "",
    ]
    config = info.config_yaml.rstrip("\n")
    if config:
        fence = _code_fence(config)
        out += [
            "<details>",
            "<summary>Effective configuration (config.yaml)</summary>",
            "",
            f"{fence}yaml",
            config,
            fence,
            "",
            "</details>",
            "",
        ]
    return "\n".join(out)


def _ordered(mapping: Mapping[str, Any], first: Mapping[str, str]) -> list[tuple[str, Any]]:
    keys = [k for k in first if k in mapping] + [k for k in mapping if k not in first]
    return [(k, mapping[k]) for k in keys]


def _fmt_freeze(key: str, value: Any) -> str:
    if key == "learning_rate" and isinstance(value, (int, float)):
        return f"{value:g}"
    return _fmt(value)


def _fmt_cell(column: str, value: Any) -> str:
    if column == "class":
        return str(value)
    if column == "support" and value is not None and not pd.isna(value):
        return _fmt(int(value))
    return _fmt(value)
