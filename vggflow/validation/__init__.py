"""Data validation: decide, file by file, what of a class-folder dataset is usable, and say why.

:func:`validate_dataset` walks ``DATA_DIR/<class>/...``, decodes every file by content with the
shared decoder (:mod:`vggflow.images`) in a process pool, and returns a manifest (one row per file)
and a JSON-able report (summary, issues by relative path, errors, warnings, drift). The report
format, the issue kinds, the manifest columns, the split rule and the near-duplicate rule are
documented in ``docs/validation.md``.

Modules, in the order a validation runs: :mod:`~vggflow.validation.scan` (the folder tree, no
decoding), :mod:`~vggflow.validation.decode` (worker processes), :mod:`~vggflow.validation.rules`
(duplicates, label conflicts, splits, near-duplicates, class sizes), :mod:`~vggflow.validation.drift`
(against the previous data version), :mod:`~vggflow.validation.dataset` (all of it, into the report)
and :mod:`~vggflow.validation.outputs` (files, summary, HTML); :mod:`~vggflow.validation.manifest`
holds the vocabulary they share, :mod:`~vggflow.validation.validated` what the pipeline receives.
"""

from vggflow.validation.dataset import validate_dataset
from vggflow.validation.manifest import (
    FORMAT_VERSION,
    ISSUE_KINDS,
    MANIFEST_COLUMNS,
    MANIFEST_DTYPES,
    SPLITS,
    ValidationResult,
    dataset_fingerprint,
    read_manifest,
)
from vggflow.validation.outputs import format_summary, render_html, report_json, write_validation_outputs
from vggflow.validation.rules import split_of, split_position
from vggflow.validation.validated import ValidatedData, ValidationOutputs

__all__ = [
    "FORMAT_VERSION",
    "ISSUE_KINDS",
    "MANIFEST_COLUMNS",
    "MANIFEST_DTYPES",
    "SPLITS",
    "ValidatedData",
    "ValidationOutputs",
    "ValidationResult",
    "dataset_fingerprint",
    "format_summary",
    "read_manifest",
    "render_html",
    "report_json",
    "split_of",
    "split_position",
    "validate_dataset",
    "write_validation_outputs",
]
