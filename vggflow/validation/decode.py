"""Decoding every candidate file, in worker processes, surviving decoders that crash.

The per-file work (hash, decode, RGB conversion, pHash) is :func:`vggflow.images.inspect_file`.
Workers are spawned and import only that light module, never this package, so they start fast.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from vggflow.config import ValidationConfig
from vggflow.images import blank_inspection, inspect_files

#: Below this many files, decoding in the calling process is faster than starting worker processes.
SERIAL_BELOW = 200

#: A worker's unit of work: (paths, max_pixels, min_side) → one inspection record per path.
ChunkFn = Callable[[Sequence[str], int, int], list[dict[str, Any]]]


def _crash_record() -> dict[str, Any]:
    record = blank_inspection()
    record.update(kind="decoder_crash", message="the decoding process died on this file (crash or out of memory)")
    return record


def _inspect_isolated(
    paths: Sequence[str], max_pixels: int, min_side: int, chunk_fn: ChunkFn
) -> list[dict[str, Any]] | None:
    """Inspect files one per task in a one-process pool, restarted whenever a file kills it.

    Returns:
        The records, or None when no worker process can start at all (nothing was inspected).
    """
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
    try:
        # os.getpid pickles by reference to a stdlib module: a pure "can workers start?" probe.
        pool.submit(os.getpid).result(timeout=300)
    except Exception:
        pool.shutdown(wait=True, cancel_futures=True)
        return None
    records: list[dict[str, Any]] = []
    try:
        for path in paths:
            if pool is None:
                pool = ProcessPoolExecutor(max_workers=1, mp_context=context)
            try:
                records.append(pool.submit(chunk_fn, [path], max_pixels, min_side).result()[0])
            except BrokenProcessPool:
                records.append(_crash_record())
                pool.shutdown(wait=True, cancel_futures=True)
                pool = None
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return records


def _spawn_can_import_main() -> bool:
    """False when spawned workers would fail to re-import ``__main__`` (e.g. a script read from stdin)."""
    main = sys.modules.get("__main__")
    if main is None or getattr(getattr(main, "__spec__", None), "name", None):
        return True  # run as a module (python -m ..., pytest, a console script's module): importable by name
    main_path = getattr(main, "__file__", None)
    return main_path is None or os.path.isfile(main_path)


def _inspect_parallel(
    paths: Sequence[str], workers: int, max_pixels: int, min_side: int, chunk_fn: ChunkFn = inspect_files
) -> tuple[list[dict[str, Any]], list[str]]:
    """Inspect files in a process pool, in chunks; results are in the order of ``paths``.

    If a worker dies (a decoder segfault, the OOM killer), the unfinished chunks are redone one
    file at a time in isolation, so only the culprit is reported as ``decoder_crash``. If workers
    cannot run at all, the unfinished files are inspected in this process instead.

    Returns:
        (records, notes): notes say how the work had to be redone, for the report's warnings.
    """
    # ~8 chunks per worker balances load; bounds keep IPC overhead and stragglers small.
    size = int(min(256, max(16, len(paths) // (workers * 8))))
    chunks = [list(paths[start : start + size]) for start in range(0, len(paths), size)]
    results: list[list[dict[str, Any]] | None] = [None] * len(chunks)
    # spawn, not fork: the caller may be a threaded flow runner (or have TensorFlow loaded). A
    # worker imports only chunk_fn's module (vggflow.images), so it starts fast.
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=context) as pool:
            futures = {pool.submit(chunk_fn, chunk, max_pixels, min_side): index for index, chunk in enumerate(chunks)}
            for future in as_completed(futures):
                try:
                    results[futures[future]] = future.result()
                except BrokenProcessPool:
                    pass  # redone below
    except BrokenProcessPool:
        pass
    unfinished = [index for index, done in enumerate(results) if done is None]
    if not unfinished:
        return [record for done in results for record in done or []], []
    left = [path for index in unfinished for path in chunks[index]]
    redone = _inspect_isolated(left, max_pixels, min_side, chunk_fn)
    if redone is None:
        note = "worker processes could not start; files were decoded in the main process"
        redone = chunk_fn(left, max_pixels, min_side)
    else:
        note = "a decoding process died; the unfinished files were redone one by one"
    records = iter(redone)
    for index in unfinished:
        results[index] = [next(records) for _ in chunks[index]]
    return [record for done in results for record in done or []], [note]


def inspect_all(paths: Sequence[str], cfg: ValidationConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Inspect files serially for small jobs (or workers=1), else in a process pool."""
    workers = cfg.workers or os.cpu_count() or 1
    if workers <= 1 or len(paths) < SERIAL_BELOW or not _spawn_can_import_main():
        return inspect_files(paths, cfg.max_pixels, cfg.min_side), []
    return _inspect_parallel(paths, workers, cfg.max_pixels, cfg.min_side)
