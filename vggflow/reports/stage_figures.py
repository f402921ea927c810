"""Figures of the training stages: learning curves across stages and the stage comparison.

Pure functions: each takes a DataFrame, writes one PNG atomically (``vggflow.files``) and returns
its path; the registration step logs them to MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vggflow.reports.figures import (
    GREY,
    HIGHLIGHT,
    ORANGE,
    SKY,
    STAGE_COLOURS,
    message_figure,
    new_figure,
    save_figure,
    short_label,
)

__all__ = ["HISTORY_COLUMNS", "plot_learning_curves", "plot_stage_comparison"]

HISTORY_COLUMNS = ["stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy"]


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
        return message_figure(path, title, "no training epochs recorded")

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

    fig = new_figure(10.0, 7.2)
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
    return save_figure(fig, path)


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
        return message_figure(path, title, "no stages")

    names = [str(s) for s in stages["stage"]]
    values = pd.to_numeric(stages[metric], errors="coerce").to_numpy(dtype=float)
    n = len(names)
    fig = new_figure(max(6.0, 2.0 + 1.1 * n), 4.8)
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
    labels = [short_label(name, 18) + ("\n(chosen)" if c else "") for name, c in zip(names, chosen, strict=True)]
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
    return save_figure(fig, path)
