"""The validation report's vocabulary: issue kinds, manifest columns, and the result of a validation.

The report format, the issue kinds and the manifest columns are documented in
``docs/validation.md``; keep the two in sync (a test checks every kind and column is listed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

#: Version of the report/manifest format documented in docs/validation.md.
FORMAT_VERSION = 1

#: The splits, in the order reports list them.
SPLITS = ("train", "val", "test")

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


def new_row(path: str, label: str, status: str, kind: str = "", message: str = "") -> dict[str, Any]:
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


def issue_entry(path: str, kind: str, message: str) -> dict[str, str]:
    """One entry of the report's ``issues`` list."""
    return {"path": path, "kind": kind, "message": message}


def quote_paths(paths: Sequence[str]) -> str:
    """A short, readable list of paths for a message."""
    shown = ", ".join(paths[:MAX_QUOTED])
    return shown + (f" and {len(paths) - MAX_QUOTED} more" if len(paths) > MAX_QUOTED else "")


def manifest_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The manifest: one row per file, :data:`MANIFEST_COLUMNS` with their dtypes, issue kinds joined by ``;``."""
    data = {column: [r[column] for r in rows] for column in MANIFEST_COLUMNS if column != "issues"}
    data["issues"] = [";".join(kind for kind, _ in r["_issues"]) for r in rows]
    frame = pd.DataFrame(data, columns=list(MANIFEST_COLUMNS))
    return frame.astype(MANIFEST_DTYPES) if len(frame) else frame.astype(MANIFEST_DTYPES, errors="ignore")


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a ``manifest.csv`` back with its dtypes (labels like ``1`` or ``NA`` stay strings)."""
    return pd.read_csv(
        path,
        dtype=MANIFEST_DTYPES,
        keep_default_na=False,
        na_values=[],
        encoding="utf-8",
        encoding_errors="surrogateescape",
    )


def dataset_fingerprint(result: ValidationResult) -> str:
    """sha256 over the sorted (path, label, split, sha256) of usable rows: the key of downstream caches."""
    usable = result.usable
    rows = sorted(zip(usable["path"], usable["label"], usable["split"], usable["sha256"]))
    payload = json.dumps([list(row) for row in rows], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()
