"""File- and dataset-level rules: statuses, duplicates, label conflicts, splits, near-duplicates, class sizes.

Each rule works on the manifest rows (dicts, before they become a DataFrame) and records what it
decided in each row's ``_issues``. The split rule and the near-duplicate rule are documented in
``docs/validation.md``.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from vggflow.config import DataConfig, ValidationConfig
from vggflow.validation.manifest import ISSUE_KINDS, SPLITS, issue_entry, new_row, quote_paths
from vggflow.validation.scan import IMAGE_EXTENSIONS, OTHER_IMAGE_EXTENSIONS

#: Hashed before a file's sha256 to give its split coordinate (the split rule in docs/validation.md).
SPLIT_SALT = b"vggflow-split:"


def row_from_record(rel: str, label: str, record: dict[str, Any]) -> dict[str, Any]:
    """Turn a worker's record into a manifest row, deciding the file-level status."""
    row = new_row(rel, label, "ok")
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


def resolve_exact_duplicates(rows: list[dict[str, Any]]) -> None:
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
                    ("label_conflict", f"same content under labels {', '.join(labels)}; also at {quote_paths(others)}")
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


def assign_splits(rows: list[dict[str, Any]], data_cfg: DataConfig) -> None:
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


def report_near_duplicates(rows: list[dict[str, Any]], max_distance: int) -> list[str]:
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


def apply_class_rules(
    rows: list[dict[str, Any]], labels: list[str], cfg: ValidationConfig
) -> tuple[list[str], list[str], list[dict[str, str]]]:
    """Empty and small classes, class count and balance; returns (errors, warnings, folder issues)."""
    errors: list[str] = []
    warnings: list[str] = []
    folder_issues: list[dict[str, str]] = []
    candidates = Counter(r["label"] for r in rows if r["label"] and r["status"] != "ignored")
    empty = [label for label in labels if candidates[label] == 0]
    for label in empty:
        folder_issues.append(
            issue_entry(label, "empty_class", "class folder without any candidate image file: not a class")
        )
    if empty:
        warnings.append(f"{len(empty)} empty class folder(s) ignored: {quote_paths(empty)}")
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


def imbalance_ratio(class_counts: dict[str, int]) -> float | None:
    values = [n for n in class_counts.values() if n > 0]
    return round(max(values) / min(values), 3) if values else None
