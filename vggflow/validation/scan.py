"""Scanning the folder tree: class folders, candidate files, OS litter and unsafe entries (no decoding).

Symlinks are resolved and followed only inside ``DATA_DIR``; FIFOs, sockets and devices are never
opened; hidden files and OS litter are reported as ignored rather than decoded.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vggflow.errors import DataError
from vggflow.validation.manifest import ISSUE_KINDS, issue_entry, new_row

#: Extensions (lower case) of the accepted formats → the Pillow formats they may legitimately hold.
IMAGE_EXTENSIONS: dict[str, frozenset[str]] = {
    **dict.fromkeys((".jpg", ".jpeg", ".jpe", ".jfif", ".mpo"), frozenset({"JPEG", "MPO"})),
    ".png": frozenset({"PNG"}),
    ".bmp": frozenset({"BMP"}),
    ".gif": frozenset({"GIF"}),
    ".webp": frozenset({"WEBP"}),
    **dict.fromkeys((".tif", ".tiff"), frozenset({"TIFF"})),
}
# fmt: off
#: Image formats a user may well have dropped in, that the shared decoder does not accept.
OTHER_IMAGE_EXTENSIONS = frozenset({
    ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".ico", ".icns", ".svg", ".psd", ".xcf", ".raw", ".cr2",
    ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".pcx", ".dds", ".eps",
    ".exr", ".hdr",
})
# fmt: on
#: Lower-case names of OS litter files (plus ``._*`` AppleDouble files and ``*:Zone.Identifier`` streams).
JUNK_FILE_NAMES = frozenset({".ds_store", "thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r"})
JUNK_DIR_NAMES = frozenset({"__macosx", "@eadir", "$recycle.bin", "system volume information"})


@dataclass
class Scan:
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


def _note_unfollowed(scan: Scan, rel: str, label: str, kind: str, real: str) -> None:
    """Record an entry that is not scanned: a bad symlink or a special file."""
    if kind == "outside":
        scan.rows.append(new_row(rel, label, "excluded", "outside_data_dir", f"symlink to {real}, outside DATA_DIR"))
    elif kind == "broken":
        scan.rows.append(new_row(rel, label, "excluded", "broken_symlink", "symlink target is missing or loops"))
    elif kind == "special":
        scan.rows.append(new_row(rel, label, "excluded", "not_a_regular_file", "FIFO, socket or device: not opened"))
    else:
        scan.rows.append(new_row(rel, label, "excluded", "unreadable", "cannot stat this entry"))


def _scan_folder(scan: Scan, folder: str, rel_folder: str, label: str, root: str, ancestors: frozenset[str]) -> None:
    """Collect the files of a class folder, recursively (nested folders keep their path)."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as err:
        scan.folder_issues.append(issue_entry(rel_folder, "unreadable", f"cannot list folder: {err.strerror}"))
        return
    for entry in entries:
        rel = f"{rel_folder}/{entry.name}"
        junk = _junk_kind(entry.name)
        if junk:
            if _is_dir_no_raise(entry):
                scan.folder_issues.append(issue_entry(rel, junk, "folder not scanned"))
            else:
                scan.rows.append(new_row(rel, label, "ignored", junk, ISSUE_KINDS[junk][1]))
            continue
        kind, real = _resolve(entry, root)
        if kind == "dir":
            if real in ancestors:
                scan.rows.append(
                    new_row(rel, label, "ignored", "symlink_loop", "symlink to a parent folder: not descended")
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


def scan_data_dir(data_dir: Path) -> Scan:
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
    scan = Scan()
    for entry in entries:
        junk = _junk_kind(entry.name)
        if junk:
            if _is_dir_no_raise(entry):
                scan.folder_issues.append(issue_entry(entry.name, junk, "folder not scanned"))
            else:
                scan.rows.append(new_row(entry.name, "", "ignored", junk, ISSUE_KINDS[junk][1]))
            continue
        kind, real = _resolve(entry, root)
        if kind == "dir":
            scan.labels.append(entry.name)
            _scan_folder(scan, real, entry.name, entry.name, root, frozenset({root, real}))
        elif kind == "file":
            scan.rows.append(new_row(entry.name, "", "ignored", "top_level_file", "not in a class folder"))
        else:
            _note_unfollowed(scan, entry.name, "", kind, real)
    if not scan.labels:
        loose = sum(1 for row in scan.rows if row["status"] == "ignored")
        hint = f"; it has {loose} loose file(s): put them in one folder per class" if loose else ""
        raise DataError(f"no class folders in {data_dir} (expected DATA_DIR/<class>/<image>){hint}")
    return scan
