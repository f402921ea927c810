"""Validating a dataset: scan, decode, apply the rules, compare with the previous version, report.

:func:`validate_dataset` never raises for a bad file: each one gets a manifest row and its issues.
Only a missing or class-less ``DATA_DIR`` is a :class:`~vggflow.errors.DataError`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from vggflow.config import DataConfig, ValidationConfig
from vggflow.validation.decode import inspect_all
from vggflow.validation.drift import compare_to_previous
from vggflow.validation.manifest import FORMAT_VERSION, SPLITS, ValidationResult, issue_entry, manifest_frame
from vggflow.validation.rules import (
    apply_class_rules,
    assign_splits,
    imbalance_ratio,
    report_near_duplicates,
    resolve_exact_duplicates,
    row_from_record,
)
from vggflow.validation.scan import scan_data_dir


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
    scan = scan_data_dir(data_dir)
    records, notes = inspect_all([real for _, _, real in scan.jobs], cfg)
    rows = list(scan.rows)
    rows.extend(row_from_record(rel, label, record) for (rel, label, _), record in zip(scan.jobs, records))
    rows.sort(key=lambda r: r["path"])
    resolve_exact_duplicates(rows)
    errors, warnings, class_issues = apply_class_rules(rows, scan.labels, cfg)
    warnings[:0] = notes
    assign_splits(rows, data_cfg)
    warnings.extend(report_near_duplicates(rows, cfg.near_duplicate_distance))

    manifest = manifest_frame(rows)
    usable = manifest[manifest["status"] == "ok"]
    class_counts = {str(k): int(v) for k, v in sorted(usable["label"].value_counts().items())}
    imbalance = imbalance_ratio(class_counts)
    if imbalance is not None and imbalance > cfg.imbalance_warning_ratio:
        warnings.append(f"class imbalance: the largest class has {imbalance:g}x the images of the smallest")
    drift: dict[str, Any] | None = None
    if previous_manifest is not None:
        drift, drift_warnings = compare_to_previous(usable, previous_manifest, cfg.drift_threshold)
        warnings.extend(drift_warnings)

    issues = [issue_entry(r["path"], kind, message) for r in rows for kind, message in r["_issues"]]
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
