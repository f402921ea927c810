"""Progress of long loops (feature extraction, scoring) as log lines with a rate."""

from __future__ import annotations

import time
from collections.abc import Callable


def progress_logger(label: str, every: float = 0.1) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` that logs to the Prefect run about every 10%, not every batch."""
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    started = time.perf_counter()
    state = {"next": every}

    def progress(done: int, total: int) -> None:
        if done >= total or done / total >= state["next"]:
            rate = done / max(time.perf_counter() - started, 1e-9)
            logger.info(f"{label}: {done}/{total} images ({rate:.1f} images/s)")
            state["next"] = done / total + every

    return progress
