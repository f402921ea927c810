"""What every report figure is drawn with: palette, sizes, headless figures and atomic PNG writes.

Figures are built with :class:`matplotlib.figure.Figure` rather than ``pyplot``: pyplot keeps a
global registry of open figures that is not thread-safe (Prefect runs tasks in threads) and leaks
unless every figure is closed; a bare ``Figure`` is freed like any other object. matplotlib is
imported when the first figure is made, never on import.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vggflow.files import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120
MAX_WIDTH_IN = 12.0
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


def new_figure(width: float, height: float) -> Figure:
    """A headless figure (inches) not registered with pyplot: nothing to close, nothing to leak."""
    import matplotlib

    # Agg so that nothing (ours or a later pyplot import) tries a display. Skipped when pyplot is
    # already in use: switching backends then would close the caller's open figures.
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(min(width, MAX_WIDTH_IN), height), dpi=DPI, layout="constrained")


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically and free its artists; returns ``path``."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=DPI)
    finally:
        fig.clear()  # drop artists now rather than waiting for the cyclic GC
    return atomic_write_bytes(path, buffer.getvalue())


def message_figure(path: Path, title: str, message: str) -> Path:
    """A small figure that says why there is nothing to plot (a missing file looks like a bug)."""
    fig = new_figure(6.0, 2.0)
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.45, message, ha="center", va="center", fontsize=12, color="#444444")
    return save_figure(fig, path)


def short_label(label: str, limit: int = MAX_LABEL_CHARS) -> str:
    """Shorten a long label in the middle: prefixes and suffixes both tend to distinguish classes."""
    label = str(label).replace("\n", " ")
    if len(label) <= limit:
        return label
    head = (limit - 1) * 3 // 5
    tail = limit - 1 - head
    return f"{label[:head]}…{label[-tail:]}"


def tick_fontsize(n: int) -> float:
    """Font size of ``n`` class names along one axis: smaller as they crowd."""
    if n <= 10:
        return 10
    if n <= 20:
        return 8.5
    if n <= 40:
        return 7
    if n <= 70:
        return 6
    return 5
