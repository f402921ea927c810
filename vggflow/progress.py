"""Progress of long loops (feature extraction, scoring, epochs, prediction): the one place that reports it.

On a terminal (stderr is a TTY) a bar with the rate and the time left (``tqdm``); elsewhere (a
log file, a scheduled run, a pipe) plain log lines with a rate, about every 10% or every few
seconds, as a log reader wants them. ``vggflow -q`` turns bars off; ``-v`` logs every epoch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

#: Process-wide choices, set once by the command line (:func:`configure`).
_SETTINGS: dict[str, bool | None] = {"bars": None, "every_epoch": False}


def configure(bars: bool | None = None, every_epoch: bool = False) -> None:
    """Bars on/off (None: only on a terminal), and whether log lines report every epoch."""
    _SETTINGS.update(bars=bars, every_epoch=every_epoch)


def bars_shown() -> bool:
    """Whether loops draw a bar: when configured so, else when stderr is a terminal."""
    chosen = _SETTINGS["bars"]
    if chosen is not None:
        return chosen
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _run_logger_info() -> Callable[[str], None]:
    """The Prefect run logger's ``info`` inside a flow or task run, else a line on stderr."""
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        return get_run_logger().info
    except (ImportError, MissingContextError):
        return lambda line: print(line, file=sys.stderr)


def new_bar(total: int, label: str, unit: str):
    """A ``tqdm`` bar on stderr that disappears when closed (a summary line follows it)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


def progress_logger(
    label: str, every: float = 0.1, unit: str = "images", log: Callable[[str], None] | None = None
) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` for a loop over items: a bar, or a log line about every 10%.

    The last call (``done == total``) always logs one line with the overall rate.

    Args:
        label: what is being done ("feature extraction").
        every: fraction of the total between two log lines.
        unit: what is counted.
        log: where lines go (default: the Prefect run's logger, or stderr outside a run).
    """
    log = log or _run_logger_info()
    started = time.perf_counter()
    state: dict = {"next": every, "bar": None}

    def progress(done: int, total: int) -> None:
        rate = done / max(time.perf_counter() - started, 1e-9)
        if bars_shown() and done < total:
            if state["bar"] is None:
                state["bar"] = new_bar(total, label, unit)
            state["bar"].update(done - state["bar"].n)
            return
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None
        if done >= total or done / total >= state["next"]:
            log(f"{label}: {done}/{total} {unit} ({rate:.1f} {unit}/s)")
            state["next"] = done / total + every

    return progress


class EpochProgress:
    """Per-epoch progress of one training stage: a bar with the latest metrics, or throttled log lines.

    Log lines come at most one per ``every_seconds`` (plus the first epoch; every epoch with
    ``vggflow -v``), so a head that runs 40 epochs in 5 s logs two lines, not forty. Call
    :meth:`close` when the stage ends (early stopping ends it before the last epoch).
    """

    def __init__(self, stage: str, epochs: int, log: Callable[[str], None], every_seconds: float = 5.0) -> None:
        self.stage, self.epochs, self.log, self.every = stage, epochs, log, every_seconds
        self.bar = new_bar(epochs, f"stage {stage}", "epoch") if bars_shown() else None
        self.last = -every_seconds

    def __call__(self, epoch: int, logs: dict[str, float]) -> None:
        metrics = (
            f"loss {logs.get('loss', float('nan')):.4f} acc {logs.get('accuracy', float('nan')):.3f} "
            f"val_loss {logs.get('val_loss', float('nan')):.4f} val_acc {logs.get('val_accuracy', float('nan')):.3f}"
        )
        if self.bar is not None:
            self.bar.set_postfix_str(metrics, refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if epoch == 0 or _SETTINGS["every_epoch"] or now - self.last >= self.every:
            self.last = now
            self.log(f"stage {self.stage} epoch {epoch + 1}/{self.epochs}: {metrics}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ItemProgress:
    """A bar over the items a command prints one line for (``vggflow predict``): lines go above it.

    Without a bar (not a terminal, ``-q``) lines are printed as they are and nothing else is.
    """

    def __init__(self, total: int, label: str, unit: str) -> None:
        self.bar = new_bar(total, label, unit) if bars_shown() and total > 1 else None

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def print(self, line: str, file=None) -> None:
        """``print(line, file=file)``, clearing the bar first and drawing it again after."""
        file = file or sys.stdout
        if self.bar is None:
            print(line, file=file)
        else:
            self.bar.write(line, file=file)

    def __enter__(self) -> ItemProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
