"""Data validation: decide, file by file, what of a class-folder dataset is usable, and say why.

``validate_dataset`` walks ``DATA_DIR/<class>/...``, decodes every file by content with the shared
decoder (:mod:`vggflow.images`) in a process pool, and returns a manifest (one row per file) and a
JSON-able report (summary, issues by relative path, errors, warnings, drift). It never raises for a
bad file: only a missing or class-less ``DATA_DIR`` is a :class:`~vggflow.errors.DataError`.

The report format, the issue kinds, the manifest columns, the split rule and the near-duplicate
rule are documented in ``docs/validation.md``; keep the two in sync.

The per-file work (hash, decode, RGB conversion, pHash) is :func:`vggflow.images.inspect_file`:
spawned workers import only that light module, never this one.
"""

from __future__ import annotations

import hashlib
import html
import json
import multiprocessing
import os
import stat
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from vggflow.config import DataConfig, ValidationConfig
from vggflow.errors import DataError, VggflowError
from vggflow.files import ROWS_COLUMNS
from vggflow.images import blank_inspection, inspect_files

#: Version of the report/manifest format documented in docs/validation.md.
FORMAT_VERSION = 1

SPLITS = ("train", "val", "test")
SPLIT_SALT = b"vggflow-split:"

#: Manifest columns, in order, with the dtypes `read_manifest` restores.
MANIFEST_DTYPES: dict[str, str] = {
    "path": "str",
    "label": "str",
    "split": "str",
    "sha256": "str",
    "width": "int64",
    "height": "int64",
    "mode": "str",
    "format": "str",
    "bytes": "int64",
    "status": "str",
    "phash": "str",
    "mean": "float64",
    "issues": "str",
}
MANIFEST_COLUMNS = tuple(MANIFEST_DTYPES)

#: Every issue kind → (the status of a file reported with it, what it means). Folder-level kinds
#: (`empty_class`, and hidden/junk/unreadable folders) have no manifest row; their status is "-".
ISSUE_KINDS: dict[str, tuple[str, str]] = {
    "empty": ("excluded", "zero-byte file"),
    "not_an_image": ("excluded", "an image extension, but the content is not a recognised image"),
    "unsupported_format": ("excluded", "an image format vggflow does not decode (e.g. HEIC, PSD, ICO)"),
    "corrupt": ("excluded", "truncated or corrupt image data"),
    "too_large": ("excluded", "more than max_pixels pixels: refused from the header, never allocated"),
    "too_small": ("excluded", "width or height below min_side"),
    "unreadable": ("excluded", "the file (or folder) cannot be read: permissions or I/O error"),
    "decoder_crash": ("excluded", "the decoding process died on this file (crash or out of memory)"),
    "outside_data_dir": ("excluded", "a symlink resolving outside DATA_DIR: never followed"),
    "broken_symlink": ("excluded", "a symlink whose target is missing or loops"),
    "not_a_regular_file": ("excluded", "a FIFO, socket or device: never opened"),
    "label_conflict": ("excluded", "the same content (sha256) under two or more labels: excluded from all"),
    "small_class": ("excluded", "its class has fewer than min_images_per_class usable images (drop_small_classes)"),
    "duplicate": ("duplicate", "the same content (sha256) as another file of the class, which is kept"),
    "os_junk": ("ignored", "OS or tool litter: .DS_Store, Thumbs.db, desktop.ini, ._*, __MACOSX/ ..."),
    "hidden": ("ignored", "a hidden file or folder (name starting with a dot): not scanned"),
    "non_image_file": ("ignored", "a non-image name (e.g. .txt, .csv) whose content is not an image"),
    "top_level_file": ("ignored", "a file directly in DATA_DIR, which is not a class folder"),
    "symlink_loop": ("ignored", "a symlinked folder pointing at one of its own parents: not descended"),
    "wrong_extension": ("ok", "usable, but the name's extension does not match the decoded format"),
    "near_duplicate": ("ok", "usable, but perceptually (pHash) almost identical to another usable image"),
    "empty_class": ("-", "a class folder with no candidate image files"),
}

#: Extensions (lower case) of the accepted formats → the Pillow formats they may legitimately hold.
IMAGE_EXTENSIONS: dict[str, frozenset[str]] = {
    **dict.fromkeys((".jpg", ".jpeg", ".jpe", ".jfif", ".mpo"), frozenset({"JPEG", "MPO"})),
    ".png": frozenset({"PNG"}),
    ".bmp": frozenset({"BMP"}),
    ".gif": frozenset({"GIF"}),
    ".webp": frozenset({"WEBP"}),
    **dict.fromkeys((".tif", ".tiff"), frozenset({"TIFF"})),
}
#: Image formats a user may well have dropped in, that the shared decoder does not accept.
OTHER_IMAGE_EXTENSIONS = frozenset(
    [
        ".heic",
        ".heif",
        ".avif",
        ".jxl",
        ".jp2",
        ".j2k",
        ".ico",
        ".icns",
        ".svg",
        ".psd",
        ".xcf",
        ".raw",
        ".cr2",
        ".cr3",
        ".nef",
        ".arw",
        ".dng",
        ".orf",
        ".rw2",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".pcx",
        ".dds",
        ".eps",
        ".exr",
        ".hdr",
    ]  # fmt: skip
)
#: Lower-case names of OS litter files (plus ``._*`` AppleDouble files and ``*:Zone.Identifier`` streams).
JUNK_FILE_NAMES = frozenset({".ds_store", "thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r"})
JUNK_DIR_NAMES = frozenset({"__macosx", "@eadir", "$recycle.bin", "system volume information"})

#: Below this many files, decoding in-process beats paying for worker start-up (~1 s each).
SERIAL_BELOW = 200
#: Longest lists quoted inside one issue message.
MAX_QUOTED = 3


@dataclass(frozen=True, eq=False)  # eq=False: identity semantics, a DataFrame field is not hashable
class ValidationResult:
    """What validation found: a manifest of every file and the JSON report."""

    manifest: pd.DataFrame
    report: dict[str, Any]

    @property
    def usable(self) -> pd.DataFrame:
        """Rows with status ``ok``, sorted by path (what training reads)."""
        rows = self.manifest[self.manifest["status"] == "ok"]
        return rows.sort_values("path", kind="stable").reset_index(drop=True)

    @property
    def errors(self) -> list[str]:
        """Fatal dataset-level problems; empty when the dataset is usable."""
        return list(self.report.get("errors", []))

    @property
    def ok(self) -> bool:
        """True when the dataset is usable (≥ 2 classes, no fatal class-size problem)."""
        return not self.errors


# --------------------------------------------------------------------------------------------
# Scanning the folder tree (parent process, no decoding)
# --------------------------------------------------------------------------------------------


@dataclass
class _Scan:
    """The folder tree, before any file is opened."""

    jobs: list[tuple[str, str, str]] = field(default_factory=list)  # (rel path, label, path to open)
    rows: list[dict[str, Any]] = field(default_factory=list)  # files decided without decoding
    folder_issues: list[dict[str, str]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


def _junk_kind(name: str) -> str:
    """``os_junk``, ``hidden`` or "" for a directory entry name."""
    lowered = name.lower()
    if (
        lowered in JUNK_FILE_NAMES
        or lowered in JUNK_DIR_NAMES
        or name.startswith("._")
        or lowered.endswith(":zone.identifier")
    ):
        return "os_junk"
    if name.startswith("."):
        return "hidden"
    return ""


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _resolve(entry: os.DirEntry[str], root: str) -> tuple[str, str]:
    """Classify an entry as ``dir``, ``file``, ``special``, ``outside``, ``broken`` or ``unreadable``.

    Returns:
        (kind, real path). Symlinks are resolved and must stay inside ``root`` (itself resolved).
    """
    try:
        if entry.is_symlink():
            try:
                real = os.path.realpath(entry.path, strict=True)
            except OSError:  # missing target or a loop of links
                return "broken", ""
            if not _is_within(real, root):
                return "outside", real
            mode = os.stat(real).st_mode
        else:
            real = entry.path
            mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return "unreadable", ""
    if stat.S_ISDIR(mode):
        return "dir", real
    if stat.S_ISREG(mode):
        return "file", real
    return "special", real


def _row(path: str, label: str, status: str, kind: str = "", message: str = "") -> dict[str, Any]:
    """A manifest row with empty measurements, and its issue (if any)."""
    return {
        "path": path,
        "label": label,
        "split": "",
        "sha256": "",
        "width": 0,
        "height": 0,
        "mode": "",
        "format": "",
        "bytes": 0,
        "status": status,
        "phash": "",
        "mean": 0.0,
        "_issues": [(kind, message)] if kind else [],
    }


def _note_unfollowed(scan: _Scan, rel: str, label: str, kind: str, real: str) -> None:
    """Record an entry that is not scanned: a bad symlink or a special file."""
    if kind == "outside":
        scan.rows.append(_row(rel, label, "excluded", "outside_data_dir", f"symlink to {real}, outside DATA_DIR"))
    elif kind == "broken":
        scan.rows.append(_row(rel, label, "excluded", "broken_symlink", "symlink target is missing or loops"))
    elif kind == "special":
        scan.rows.append(_row(rel, label, "excluded", "not_a_regular_file", "FIFO, socket or device: not opened"))
    else:
        scan.rows.append(_row(rel, label, "excluded", "unreadable", "cannot stat this entry"))


def _scan_folder(scan: _Scan, folder: str, rel_folder: str, label: str, root: str, ancestors: frozenset[str]) -> None:
    """Collect the files of a class folder, recursively (nested folders keep their path)."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as err:
        scan.folder_issues.append(_issue(rel_folder, "unreadable", f"cannot list folder: {err.strerror}"))
        return
    for entry in entries:
        rel = f"{rel_folder}/{entry.name}"
        junk = _junk_kind(entry.name)
        if junk:
            if _is_dir_no_raise(entry):
                scan.folder_issues.append(_issue(rel, junk, "folder not scanned"))
            else:
                scan.rows.append(_row(rel, label, "ignored", junk, ISSUE_KINDS[junk][1]))
            continue
        kind, real = _resolve(entry, root)
        if kind == "dir":
            if real in ancestors:
                scan.rows.append(
                    _row(rel, label, "ignored", "symlink_loop", "symlink to a parent folder: not descended")
                )
            else:
                _scan_folder(scan, real, rel, label, root, ancestors | {real})
        elif kind == "file":
            scan.jobs.append((rel, label, real))
        else:
            _note_unfollowed(scan, rel, label, kind, real)


def _is_dir_no_raise(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _scan(data_dir: Path) -> _Scan:
    """Walk ``data_dir``: class folders, their files, and everything that is not a candidate image.

    Raises:
        DataError: ``data_dir`` is missing, not a folder, unreadable, or has no class folder.
    """
    if not data_dir.exists():
        raise DataError(f"data folder not found: {data_dir}")
    if not data_dir.is_dir():
        raise DataError(f"not a folder: {data_dir} (expected DATA_DIR/<class>/<image>)")
    root = os.path.realpath(data_dir)
    try:
        with os.scandir(root) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as err:
        raise DataError(f"cannot read the data folder {data_dir}: {err.strerror}") from None
    scan = _Scan()
    for entry in entries:
        junk = _junk_kind(entry.name)
        if junk:
            if _is_dir_no_raise(entry):
                scan.folder_issues.append(_issue(entry.name, junk, "folder not scanned"))
            else:
                scan.rows.append(_row(entry.name, "", "ignored", junk, ISSUE_KINDS[junk][1]))
            continue
        kind, real = _resolve(entry, root)
        if kind == "dir":
            scan.labels.append(entry.name)
            _scan_folder(scan, real, entry.name, entry.name, root, frozenset({root, real}))
        elif kind == "file":
            scan.rows.append(_row(entry.name, "", "ignored", "top_level_file", "not in a class folder"))
        else:
            _note_unfollowed(scan, entry.name, "", kind, real)
    if not scan.labels:
        loose = sum(1 for row in scan.rows if row["status"] == "ignored")
        hint = f"; it has {loose} loose file(s): put them in one folder per class" if loose else ""
        raise DataError(f"no class folders in {data_dir} (expected DATA_DIR/<class>/<image>){hint}")
    return scan


# --------------------------------------------------------------------------------------------
# Inspecting files (worker processes)
# --------------------------------------------------------------------------------------------


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


def _inspect_all(paths: Sequence[str], cfg: ValidationConfig) -> tuple[list[dict[str, Any]], list[str]]:
    """Inspect files serially for small jobs (or workers=1), else in a process pool."""
    workers = cfg.workers or os.cpu_count() or 1
    if workers <= 1 or len(paths) < SERIAL_BELOW or not _spawn_can_import_main():
        return inspect_files(paths, cfg.max_pixels, cfg.min_side), []
    return _inspect_parallel(paths, workers, cfg.max_pixels, cfg.min_side)


# --------------------------------------------------------------------------------------------
# File- and dataset-level rules (parent process)
# --------------------------------------------------------------------------------------------


def _issue(path: str, kind: str, message: str) -> dict[str, str]:
    return {"path": path, "kind": kind, "message": message}


def _quote(paths: Sequence[str]) -> str:
    """A short, readable list of paths for a message."""
    shown = ", ".join(paths[:MAX_QUOTED])
    return shown + (f" and {len(paths) - MAX_QUOTED} more" if len(paths) > MAX_QUOTED else "")


def _row_from_record(rel: str, label: str, record: dict[str, Any]) -> dict[str, Any]:
    """Turn a worker's record into a manifest row, deciding the file-level status."""
    row = _row(rel, label, "ok")
    for key in ("sha256", "bytes", "width", "height", "mode", "format", "phash", "mean"):
        row[key] = record[key]
    kind, message = record["kind"], record["message"]
    suffix = PurePosixPath(rel).suffix.lower()
    if kind in ("empty", "not_an_image") and suffix not in IMAGE_EXTENSIONS:
        if suffix in OTHER_IMAGE_EXTENSIONS and kind == "not_an_image":
            kind, message = "unsupported_format", f"{suffix} images cannot be decoded by vggflow"
        elif suffix not in OTHER_IMAGE_EXTENSIONS:
            # A README.txt or labels.csv is not a broken image: ignore it, but say so.
            kind, message = "non_image_file", f"{suffix or 'no extension'}, content: {message}"
    if kind:
        row["status"] = ISSUE_KINDS[kind][0]
        row["_issues"].append((kind, message))
        return row
    expected = IMAGE_EXTENSIONS.get(suffix)
    if expected is None or row["format"] not in expected:
        named = f"named {suffix}" if suffix else "no extension"
        row["_issues"].append(("wrong_extension", f"{named}, but the content is {row['format']}: decoded by content"))
    return row


def _resolve_exact_duplicates(rows: list[dict[str, Any]]) -> None:
    """Same content (sha256): kept once within a class, excluded everywhere across labels."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok":
            groups[row["sha256"]].append(row)
    for group in groups.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda r: r["path"])
        labels = sorted({r["label"] for r in group})
        if len(labels) > 1:
            for row in group:
                others = [o["path"] for o in group if o is not row]
                row["status"] = "excluded"
                row["_issues"].append(
                    ("label_conflict", f"same content under labels {', '.join(labels)}; also at {_quote(others)}")
                )
        else:
            kept = group[0]["path"]
            for row in group[1:]:
                row["status"] = "duplicate"
                row["_issues"].append(("duplicate", f"same content as {kept} (kept)"))


def split_position(content_sha256: str) -> float:
    """The split coordinate u in [0, 1) of a file, from its content hash alone."""
    digest = hashlib.sha256(SPLIT_SALT + content_sha256.encode("ascii")).hexdigest()
    return int(digest[:16], 16) / 2**64


def split_of(content_sha256: str, data_cfg: DataConfig) -> str:
    """The natural split of a file (before the tiny-class fix-up of :func:`validate_dataset`)."""
    u = split_position(content_sha256)
    if u < data_cfg.test_fraction:
        return "test"
    if u < data_cfg.test_fraction + data_cfg.val_fraction:
        return "val"
    return "train"


def _fill_empty_splits(rows: list[dict[str, Any]]) -> None:
    """Give each split of a class (≥ 3 images) at least one image, moving as few as possible.

    An empty test/val split takes the train image(s) with the smallest u (test first); if train
    has only one image, a split with ≥ 2 gives up the image nearest to the empty range instead.
    """
    members = {
        split: sorted((r for r in rows if r["split"] == split), key=lambda r: (r["_u"], r["path"])) for split in SPLITS
    }
    for target in ("train", "test", "val"):
        if members[target]:
            continue
        donor = next(s for s in ("train", "val", "test") if s != target and len(members[s]) >= 2)
        # Ranges by u: test lowest, val middle, train highest; move the donor's image nearest the target.
        take_highest = target == "train" or (target == "val" and donor == "test")
        moved = members[donor].pop(-1 if take_highest else 0)
        moved["split"] = target
        members[target].append(moved)


def _assign_splits(rows: list[dict[str, Any]], data_cfg: DataConfig) -> None:
    by_label: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok":
            row["_u"] = split_position(row["sha256"])
            row["split"] = split_of(row["sha256"], data_cfg)
            by_label[row["label"]].append(row)
    for members in by_label.values():
        if len(members) >= 3:
            _fill_empty_splits(members)


def _near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int, int]]:
    """All pairs (i < j, distance) of 64-bit hashes at Hamming distance ≤ ``max_distance``.

    Multi-index hashing: split the 64 bits into ``max_distance + 1`` blocks; by pigeonhole, two
    hashes that close agree exactly on at least one block, so only hashes sharing a block value
    are compared. Falls back to comparing all pairs when the blocks get too narrow to help.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    found: dict[tuple[int, int], int] = {}

    def compare(members: np.ndarray) -> None:
        for pos in range(len(members) - 1):
            first, rest = int(members[pos]), members[pos + 1 :]
            distances = np.bitwise_count(hashes[rest] ^ hashes[first])
            close = distances <= max_distance
            for other, distance in zip(rest[close].tolist(), distances[close].tolist()):
                found[(min(first, other), max(first, other))] = int(distance)

    n_blocks = max_distance + 1
    if n_blocks > 16:
        compare(np.arange(len(hashes)))
    else:
        bounds = np.linspace(0, 64, n_blocks + 1).round().astype(int)
        for low, high in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            values = (hashes >> np.uint64(low)) & np.uint64((1 << (high - low)) - 1)
            order = np.argsort(values, kind="stable")
            ordered = values[order]
            starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
            ends = np.r_[starts[1:], len(order)]
            for start, end in zip(starts.tolist(), ends.tolist()):
                if end - start > 1:
                    compare(np.sort(order[start:end]))
    return sorted((i, j, d) for (i, j), d in found.items())


def _report_near_duplicates(rows: list[dict[str, Any]], max_distance: int) -> list[str]:
    """Flag usable images within ``max_distance`` pHash bits of another; returns warnings."""
    usable = sorted((r for r in rows if r["status"] == "ok" and r["phash"]), key=lambda r: r["path"])
    if len(usable) < 2:
        return []
    pairs = _near_duplicate_pairs(np.array([int(r["phash"], 16) for r in usable], dtype=np.uint64), max_distance)
    parent = list(range(len(usable)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    nearest: dict[int, tuple[int, int]] = {}  # index → (distance, partner); ties → first path
    for i, j, distance in pairs:
        parent[find(j)] = find(i)
        for me, other in ((i, j), (j, i)):
            if me not in nearest or (distance, other) < nearest[me]:
                nearest[me] = (distance, other)
    groups: dict[int, list[int]] = defaultdict(list)
    for index in nearest:
        groups[find(index)].append(index)
    cross_label = cross_split = 0
    for members in groups.values():
        labels = sorted({usable[i]["label"] for i in members})
        splits = sorted({usable[i]["split"] for i in members})
        cross_label += len(labels) > 1
        cross_split += len(splits) > 1
        extra = (f"; labels differ: {', '.join(labels)}" if len(labels) > 1 else "") + (
            f"; spans splits {', '.join(splits)}" if len(splits) > 1 else ""
        )
        for index in members:
            distance, partner = nearest[index]
            usable[index]["_issues"].append(
                (
                    "near_duplicate",
                    f"looks like {usable[partner]['path']} (pHash distance {distance}; group of {len(members)}){extra}",
                )
            )
    warnings = []
    if groups:
        warnings.append(
            f"{len(nearest)} usable images form {len(groups)} near-duplicate group(s) (pHash distance <= "
            f"{max_distance})"
        )
    if cross_split:
        warnings.append(f"{cross_split} near-duplicate group(s) span train/val/test: possible evaluation leakage")
    if cross_label:
        warnings.append(f"{cross_label} near-duplicate group(s) span labels: possible label noise")
    return warnings


def _apply_class_rules(
    rows: list[dict[str, Any]], labels: list[str], cfg: ValidationConfig
) -> tuple[list[str], list[str], list[dict[str, str]]]:
    """Empty and small classes, class count and balance; returns (errors, warnings, folder issues)."""
    errors: list[str] = []
    warnings: list[str] = []
    folder_issues: list[dict[str, str]] = []
    candidates = Counter(r["label"] for r in rows if r["label"] and r["status"] != "ignored")
    empty = [label for label in labels if candidates[label] == 0]
    for label in empty:
        folder_issues.append(_issue(label, "empty_class", "class folder without any candidate image file: not a class"))
    if empty:
        warnings.append(f"{len(empty)} empty class folder(s) ignored: {_quote(empty)}")
    counts = Counter(r["label"] for r in rows if r["status"] == "ok")
    small = [label for label in labels if label not in empty and counts[label] < cfg.min_images_per_class]
    if small:
        described = ", ".join(f"{label} ({counts[label]})" for label in small)
        if cfg.drop_small_classes:
            for row in rows:
                if row["status"] == "ok" and row["label"] in small:
                    row["status"] = "excluded"
                    row["_issues"].append(
                        (
                            "small_class",
                            f"class {row['label']} has {counts[row['label']]} usable image(s) < "
                            f"min_images_per_class={cfg.min_images_per_class}",
                        )
                    )
            warnings.append(f"classes below min_images_per_class={cfg.min_images_per_class} excluded: {described}")
        else:
            errors.append(
                f"classes below min_images_per_class={cfg.min_images_per_class} usable images: {described} "
                "(add images, or set validation.drop_small_classes: true to exclude them)"
            )
    usable_classes = sorted({r["label"] for r in rows if r["status"] == "ok"})
    if len(usable_classes) < 2:
        found = f": {', '.join(usable_classes)}" if usable_classes else ""
        errors.append(
            f"fewer than 2 usable classes (found {len(usable_classes)}{found}); a classifier needs at least 2"
        )
    return errors, warnings, folder_issues


def _imbalance_ratio(class_counts: dict[str, int]) -> float | None:
    values = [n for n in class_counts.values() if n > 0]
    return round(max(values) / min(values), 3) if values else None


# --------------------------------------------------------------------------------------------
# Drift against the previous data version
# --------------------------------------------------------------------------------------------


def _shares(values: pd.Series) -> dict[str, float]:
    counts = values.astype(str).value_counts()
    total = float(counts.sum())
    return {str(key): float(n) / total for key, n in counts.items()} if total else {}


def _linf(current: dict[str, float], previous: dict[str, float]) -> float:
    keys = set(current) | set(previous)
    return round(max((abs(current.get(k, 0.0) - previous.get(k, 0.0)) for k in keys), default=0.0), 4)


def _compare_to_previous(
    current: pd.DataFrame, previous: pd.DataFrame, threshold: float
) -> tuple[dict[str, Any], list[str]]:
    """TFDV-style drift: class shares, image sizes, mode/format mix and brightness; warnings only.

    Categorical distributions (classes, modes, formats) use the L-infinity distance of their shares;
    median width/height use the relative change; median brightness the change as a share of 255.
    """
    if "status" in previous.columns:
        previous = previous[previous["status"].astype(str) == "ok"]
    if "label" not in previous.columns or previous.empty:
        return {"compared": False}, ["drift not computed: the previous manifest has no usable rows with labels"]
    warnings: list[str] = []
    drift: dict[str, Any] = {
        "compared": True,
        "previous_n_valid": int(len(previous)),
        "current_n_valid": int(len(current)),
    }
    now, before = _shares(current["label"]), _shares(previous["label"])
    classes = {}
    for label in sorted(set(now) | set(before)):
        change = now.get(label, 0.0) - before.get(label, 0.0)
        classes[label] = {
            "previous": round(before.get(label, 0.0), 4),
            "current": round(now.get(label, 0.0), 4),
            "change": round(change, 4),
        }
        if abs(change) > threshold:
            warnings.append(f"drift: class {label} share {before.get(label, 0.0):.1%} -> {now.get(label, 0.0):.1%}")
    drift["class_shares"] = classes
    drift["class_linf"] = _linf(now, before)
    drift["new_classes"] = sorted(set(now) - set(before))
    drift["missing_classes"] = sorted(set(before) - set(now))
    if drift["new_classes"]:
        warnings.append(f"drift: new class(es) since the previous version: {_quote(drift['new_classes'])}")
    if drift["missing_classes"]:
        warnings.append(f"drift: class(es) gone since the previous version: {_quote(drift['missing_classes'])}")
    stats: dict[str, Any] = {}
    for column in ("width", "height", "mean"):
        was, now_value = _median(previous, column), _median(current, column)
        if was is None or now_value is None:
            continue
        if column == "mean":  # brightness: the change as a share of the 0..255 range
            change = (now_value - was) / 255.0
            stats["median_brightness"] = {
                "previous": round(was, 2),
                "current": round(now_value, 2),
                "change_of_255": round(change, 4),
            }
            if abs(change) > threshold:
                warnings.append(f"drift: median brightness {was:.1f} -> {now_value:.1f} (of 255)")
            continue
        change = (now_value - was) / was if was else 0.0
        stats[f"median_{column}"] = {"previous": was, "current": now_value, "relative_change": round(change, 4)}
        if abs(change) > threshold:
            warnings.append(f"drift: median {column} {was:g} -> {now_value:g} px ({change:+.0%})")
    for column in ("mode", "format"):
        if column in previous.columns and len(current):
            now_mix, before_mix = _shares(current[column]), _shares(previous[column])
            distance = _linf(now_mix, before_mix)
            stats[f"{column}_mix"] = {
                "previous": {k: round(v, 4) for k, v in sorted(before_mix.items())},
                "current": {k: round(v, 4) for k, v in sorted(now_mix.items())},
                "linf": distance,
            }
            if distance > threshold:
                warnings.append(
                    f"drift: image {column} mix changed (L-inf {distance:.2f}): {_mix(before_mix)} -> {_mix(now_mix)}"
                )
    drift["stats"] = stats
    if "sha256" in previous.columns:
        before_hashes, now_hashes = set(previous["sha256"].astype(str)), set(current["sha256"])
        drift["n_added"] = len(now_hashes - before_hashes)
        drift["n_removed"] = len(before_hashes - now_hashes)
    return drift, warnings


def _median(frame: pd.DataFrame, column: str) -> float | None:
    """Median of a numeric column, or None when missing or unreadable (an older manifest)."""
    if column not in frame.columns or frame.empty:
        return None
    value = float(pd.to_numeric(frame[column], errors="coerce").median())
    return None if value != value else value  # NaN


def _mix(shares: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.0%}" for key, value in sorted(shares.items(), key=lambda kv: -kv[1])[:4])


# --------------------------------------------------------------------------------------------
# The public entry points
# --------------------------------------------------------------------------------------------


def validate_dataset(
    data_dir: Path,
    data_cfg: DataConfig,
    cfg: ValidationConfig,
    previous_manifest: pd.DataFrame | None = None,
) -> ValidationResult:
    """Validate an image-folder dataset: every file decoded, classified and reported.

    Args:
        data_dir: ``DATA_DIR/<class>/<image>``; nested folders inside a class belong to that class.
        data_cfg: the split fractions.
        cfg: what is excluded, what is fatal, how many worker processes.
        previous_manifest: the manifest of the previous data version (the champion's), for drift.

    Returns:
        The manifest and report; ``result.ok`` is False when the dataset is not usable.

    Raises:
        DataError: only when ``data_dir`` is missing, not a folder, unreadable or has no class folder.
    """
    data_dir = Path(data_dir)
    scan = _scan(data_dir)
    records, notes = _inspect_all([real for _, _, real in scan.jobs], cfg)
    rows = list(scan.rows)
    rows.extend(_row_from_record(rel, label, record) for (rel, label, _), record in zip(scan.jobs, records))
    rows.sort(key=lambda r: r["path"])
    _resolve_exact_duplicates(rows)
    errors, warnings, class_issues = _apply_class_rules(rows, scan.labels, cfg)
    warnings[:0] = notes
    _assign_splits(rows, data_cfg)
    warnings.extend(_report_near_duplicates(rows, cfg.near_duplicate_distance))

    manifest = _manifest_frame(rows)
    usable = manifest[manifest["status"] == "ok"]
    class_counts = {str(k): int(v) for k, v in sorted(usable["label"].value_counts().items())}
    imbalance = _imbalance_ratio(class_counts)
    if imbalance is not None and imbalance > cfg.imbalance_warning_ratio:
        warnings.append(f"class imbalance: the largest class has {imbalance:g}x the images of the smallest")
    drift: dict[str, Any] | None = None
    if previous_manifest is not None:
        drift, drift_warnings = _compare_to_previous(usable, previous_manifest, cfg.drift_threshold)
        warnings.extend(drift_warnings)

    issues = [_issue(r["path"], kind, message) for r in rows for kind, message in r["_issues"]]
    issues.extend(scan.folder_issues)
    issues.extend(class_issues)
    issues.sort(key=lambda i: (i["path"], i["kind"]))
    statuses = Counter(manifest["status"])
    report: dict[str, Any] = {
        "summary": {
            "n_files": int(len(manifest)),
            "n_valid": int(statuses["ok"]),
            "n_excluded": int(statuses["excluded"] + statuses["duplicate"]),
            "classes": class_counts,
            "n_duplicate": int(statuses["duplicate"]),
            "n_ignored": int(statuses["ignored"]),
            "imbalance_ratio": imbalance,
            "splits": {split: int((usable["split"] == split).sum()) for split in SPLITS},
            "issue_counts": dict(sorted(Counter(i["kind"] for i in issues).items())),
        },
        "issues": issues,
        "errors": errors,
        "warnings": warnings,
        "drift": drift,
        "data_dir": str(data_dir),
        "format_version": FORMAT_VERSION,
        # Without `workers`: how the work was spread must not change the report.
        "settings": {
            "validation": cfg.model_dump(mode="json", exclude={"workers"}),
            "val_fraction": data_cfg.val_fraction,
            "test_fraction": data_cfg.test_fraction,
        },
    }
    return ValidationResult(manifest=manifest, report=report)


def _manifest_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    data = {column: [r[column] for r in rows] for column in MANIFEST_COLUMNS if column != "issues"}
    data["issues"] = [";".join(kind for kind, _ in r["_issues"]) for r in rows]
    frame = pd.DataFrame(data, columns=list(MANIFEST_COLUMNS))
    return frame.astype(MANIFEST_DTYPES) if len(frame) else frame.astype(MANIFEST_DTYPES, errors="ignore")


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a ``manifest.csv`` back with its dtypes (labels like ``1`` or ``NA`` stay strings)."""
    frame = pd.read_csv(
        path,
        dtype=MANIFEST_DTYPES,
        keep_default_na=False,
        na_values=[],
        encoding="utf-8",
        encoding_errors="surrogateescape",
    )
    return frame


def dataset_fingerprint(result: ValidationResult) -> str:
    """sha256 over the sorted (path, label, split, sha256) of usable rows: the key of downstream caches."""
    usable = result.usable
    rows = sorted(zip(usable["path"], usable["label"], usable["split"], usable["sha256"]))
    payload = json.dumps([list(row) for row in rows], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


# --------------------------------------------------------------------------------------------
# Outputs: files and the one-screen summary
# --------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path``."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def report_json(report: dict[str, Any]) -> str:
    """The report as JSON text (UTF-8; odd bytes in file names survive as ``\\udcXX`` escapes)."""
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


def write_validation_outputs(result: ValidationResult, out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``manifest.csv`` and ``report.html`` to ``out_dir``, each atomically.

    Returns:
        ``{"report": ..., "manifest": ..., "html": ...}`` paths.

    Raises:
        VggflowError: ``out_dir`` cannot be created or written.
    """
    out_dir = Path(out_dir)
    # backslashreplace turns an undecodable file-name byte into a valid JSON \udcXX escape.
    report_bytes = report_json(result.report).encode("utf-8", errors="backslashreplace")
    html_bytes = render_html(result).encode("utf-8", errors="backslashreplace")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return {
            "report": _atomic_write(out_dir / "report.json", lambda tmp: tmp.write_bytes(report_bytes)),
            "manifest": _atomic_write(
                out_dir / "manifest.csv",
                # surrogateescape writes undecodable file-name bytes back as they are on disk.
                lambda tmp: result.manifest.to_csv(tmp, index=False, encoding="utf-8", errors="surrogateescape"),
            ),
            "html": _atomic_write(out_dir / "report.html", lambda tmp: tmp.write_bytes(html_bytes)),
        }
    except OSError as err:
        raise VggflowError(f"cannot write the validation report to {out_dir}: {err.strerror or err}") from None


_STATUS_RANK = {"excluded": 0, "duplicate": 1, "-": 2, "ok": 3, "ignored": 4}


def _top_kinds(report: dict[str, Any]) -> list[tuple[str, int, str]]:
    """(kind, count, first path) for each issue kind: what costs images first, then by count."""
    first: dict[str, str] = {}
    for issue in report["issues"]:
        first.setdefault(issue["kind"], issue["path"])
    counts = Counter(i["kind"] for i in report["issues"])

    def rank(kind: str) -> int:
        return _STATUS_RANK.get(ISSUE_KINDS.get(kind, ("-", ""))[0], 2)

    return [(kind, n, first[kind]) for kind, n in sorted(counts.items(), key=lambda kv: (rank(kv[0]), -kv[1], kv[0]))]


def _wrap(items: Sequence[str], width: int = 92, indent: str = "    ") -> list[str]:
    lines, line = [], indent
    for item in items:
        if len(line) + len(item) + 2 > width and line.strip():
            lines.append(line.rstrip().rstrip(","))
            line = indent
        line += item + ", "
    if line.strip():
        lines.append(line.rstrip().rstrip(","))
    return lines


def format_summary(result: ValidationResult, report_path: Path | str | None = None) -> str:
    """The one-screen human summary: verdict, counts, classes, top issue kinds, errors, warnings."""
    report, summary = result.report, result.report["summary"]
    verdict = "usable" if result.ok else "NOT USABLE"
    lines = [f"Data validation of {report.get('data_dir', 'the data folder')}: {verdict}"]
    lines.append(
        f"  {summary['n_files']:,} files: {summary['n_valid']:,} valid, {summary['n_excluded']:,} excluded "
        f"({summary.get('n_duplicate', 0):,} duplicates), {summary.get('n_ignored', 0):,} ignored"
    )
    classes = summary["classes"]
    ratio = summary.get("imbalance_ratio")
    lines.append(f"  {len(classes)} classes" + (f", imbalance ratio {ratio:g}:" if ratio else ":"))
    items = [f"{label} {n:,}" for label, n in classes.items()]
    if len(items) > 10:  # keep it to one screen: the smallest and largest classes matter most
        ordered = sorted(classes.items(), key=lambda kv: (kv[1], kv[0]))
        items = (
            [f"{k} {v:,}" for k, v in ordered[:4]]
            + [f"... {len(items) - 8} more ..."]
            + [f"{k} {v:,}" for k, v in ordered[-4:]]
        )
    lines.extend(_wrap(items)[:2])
    splits = summary.get("splits", {})
    if splits:
        lines.append("  splits: " + ", ".join(f"{name} {n:,}" for name, n in splits.items()))
    kinds = _top_kinds(report)
    if kinds:
        lines.append("  issues (kind: count, e.g. first path):")
        for kind, n, path in kinds[:7]:
            lines.append(f"    {kind:<20} {n:>6,}  e.g. {path}")
        rest = _wrap([f"{kind} {n:,}" for kind, n, _ in kinds[7:]], indent="    also: ") if kinds[7:] else []
        lines.extend(rest[:1] + [line.replace("    also: ", "          ", 1) for line in rest[1:2]])
        if len(rest) > 2:
            lines[-1] += ", ..."
    for label, messages in (("ERROR", result.errors), ("warning", report.get("warnings", []))):
        for message in messages[:3]:
            lines.append(f"  {label}: {message}")
        if len(messages) > 3:
            lines.append(f"  ... {len(messages) - 3} more {label.lower()}s in the report")
    if report_path is not None:
        lines.append(f"  full report: {report_path}")
    return "\n".join(lines)


_HTML_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}
td.n{text-align:right}.bad{color:#b00020;font-weight:bold}.ok{color:#1b5e20;font-weight:bold}
code{font-size:12px}
"""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{value:,}</td>' if isinstance(value, int) else f"<td>{html.escape(str(value))}</td>"
            for value in row
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def render_html(result: ValidationResult, max_issues: int = 2000) -> str:
    """A one-page HTML report: summary, class counts, errors/warnings, drift, issues."""
    report, summary = result.report, result.report["summary"]
    verdict = '<span class="ok">usable</span>' if result.ok else '<span class="bad">NOT USABLE</span>'
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>vggflow data validation</title>",
        f"<style>{_HTML_STYLE}</style></head><body>",
        f"<h1>Data validation of <code>{html.escape(str(report.get('data_dir', '')))}</code>: {verdict}</h1>",
        _table(
            ("files", "valid", "excluded", "duplicates", "ignored", "imbalance ratio"),
            [
                (
                    summary["n_files"],
                    summary["n_valid"],
                    summary["n_excluded"],
                    summary.get("n_duplicate", 0),
                    summary.get("n_ignored", 0),
                    summary.get("imbalance_ratio") or "-",
                )
            ],
        ),
    ]
    if result.errors:
        parts.append(
            "<h2>Errors</h2><ul>" + "".join(f"<li class='bad'>{html.escape(e)}</li>" for e in result.errors) + "</ul>"
        )
    if report.get("warnings"):
        parts.append(
            "<h2>Warnings</h2><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"]) + "</ul>"
        )
    splits_by_class: dict[str, Counter[str]] = defaultdict(Counter)
    usable = result.usable
    for label, split in zip(usable["label"], usable["split"]):
        splits_by_class[label][split] += 1
    parts.append("<h2>Classes</h2>")
    parts.append(
        _table(
            ("class", "valid", *SPLITS),
            [(label, n, *(splits_by_class[label][s] for s in SPLITS)) for label, n in summary["classes"].items()],
        )
    )
    drift = report.get("drift")
    if drift and drift.get("compared"):
        parts.append("<h2>Drift against the previous data version</h2>")
        parts.append(
            _table(
                ("class", "previous share", "current share", "change"),
                [
                    (label, f"{v['previous']:.1%}", f"{v['current']:.1%}", f"{v['change']:+.1%}")
                    for label, v in drift["class_shares"].items()
                ],
            )
        )
        stats = [(name, json.dumps(value, ensure_ascii=False)) for name, value in drift.get("stats", {}).items()]
        if stats:
            parts.append("<p></p>" + _table(("statistic", "previous → current"), stats))
    issues = report["issues"]
    parts.append(f"<h2>Issues ({len(issues):,})</h2>")
    kinds = _top_kinds(report)
    if kinds:
        parts.append(
            _table(
                ("kind", "count", "status", "meaning"),
                [(k, n, ISSUE_KINDS.get(k, ("?", ""))[0], ISSUE_KINDS.get(k, ("", ""))[1]) for k, n, _ in kinds],
            )
        )
    parts.append(
        "<p></p>"
        + _table(("path", "kind", "message"), [(i["path"], i["kind"], i["message"]) for i in issues[:max_issues]])
    )
    if len(issues) > max_issues:
        parts.append(f"<p>... {len(issues) - max_issues:,} more issues in report.json</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------- Prefect task shells
# (imported here, at the end, so the decoding workers above never pay for importing Prefect)

from prefect import task  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from vggflow.caching import cached_task  # noqa: E402


class ValidatedData(BaseModel):
    """What the validation task hands to the rest of the flow (references, not data)."""

    ok: bool
    summary: str
    fingerprint: str
    class_names: list[str]
    n_valid: int
    rows_file: Path
    rows_sha256: str
    files: dict[str, Path]


def _validation_outputs_valid(parameters: dict[str, Any]) -> bool:
    """All outputs present, and the rows training reads match the checksum recorded with them."""
    from vggflow.hashing import file_sha256

    out_dir = Path(parameters["out_dir"]) / parameters["cache_key"]
    if not all(
        (out_dir / name).is_file() for name in ("report.json", "manifest.csv", "report.html", "rows.csv", "result.json")
    ):
        return False
    try:
        recorded = json.loads((out_dir / "result.json").read_text())["rows_sha256"]
    except (OSError, ValueError, KeyError):
        return False
    return file_sha256(out_dir / "rows.csv") == recorded


def validation_cache_key(data_cfg: DataConfig, cfg: ValidationConfig, previous_manifest: Path | None, dvc) -> str:
    """Key of a validation: the data version, the config and the previous manifest (drift).

    The data version is DVC's md5 when ``data/`` matches ``data.dvc`` (so a ``dvc pull`` that
    rewrites the same files keeps the key); otherwise the folder's listing (names, sizes, mtimes).
    """
    from vggflow.caching import directory_fingerprint
    from vggflow.hashing import stable_hash

    version = dvc.md5 if dvc.md5 and dvc.matches else directory_fingerprint(Path(data_cfg.dir))
    previous = _file_digest(previous_manifest) if previous_manifest else None
    return stable_hash(version, str(Path(data_cfg.dir).resolve()), data_cfg, cfg, previous)


def _file_digest(path: Path) -> str:
    from vggflow.hashing import file_sha256

    return file_sha256(path)


def run_validation(
    data_cfg: DataConfig, cfg: ValidationConfig, out_dir: Path, previous_manifest: Path | None
) -> ValidatedData:
    """Validate, write report/manifest/HTML plus the usable rows (``rows.csv``) into ``out_dir``."""
    from vggflow.files import atomic_write_text
    from vggflow.hashing import file_sha256

    previous = read_manifest(previous_manifest) if previous_manifest else None
    result = validate_dataset(Path(data_cfg.dir), data_cfg, cfg, previous)
    files = write_validation_outputs(result, out_dir)
    rows_file = out_dir / "rows.csv"
    # Each image's size too: a dataset whose images all share one is decoded in whole groups.
    atomic_write_text(rows_file, result.usable[list(ROWS_COLUMNS)].to_csv(index=False))
    validated = ValidatedData(
        ok=result.ok,
        summary=format_summary(result),
        fingerprint=dataset_fingerprint(result),
        class_names=sorted(result.usable["label"].unique().tolist()),
        n_valid=len(result.usable),
        rows_file=rows_file,
        rows_sha256=file_sha256(rows_file),
        files=files,
    )
    atomic_write_text(out_dir / "result.json", validated.model_dump_json(indent=1))
    return validated


@cached_task("validate-data", _validation_outputs_valid)
def validate_data_task(
    data_cfg: DataConfig, cfg: ValidationConfig, out_dir: Path, previous_manifest: Path | None, cache_key: str
) -> ValidatedData:
    """Prefect shell: validate the data folder (cached by its file listing + config)."""
    validated = run_validation(data_cfg, cfg, Path(out_dir) / cache_key, previous_manifest)
    print(validated.summary)
    return validated


@task(name="dvc-state", retries=2, retry_delay_seconds=3)
def dvc_state_task(data_cfg: DataConfig):
    """Prefect shell: DVC's md5 of the data and whether data/ matches it (DVC I/O: retried)."""
    from vggflow.tracking import dvc_state

    return dvc_state(data_cfg.dvc_file, data_cfg.dir)


@task(name="fetch-champion-manifest", retries=2, retry_delay_seconds=5)
def fetch_champion_manifest_task(model_name: str, dest: Path) -> Path | None:
    """Prefect shell: the current champion's data manifest (for drift warnings), or None."""
    from vggflow.tracking import champion_manifest

    return champion_manifest(model_name, Path(dest))
