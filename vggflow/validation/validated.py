"""What a validation hands to the rest of the pipeline: references to its outputs, and the data version."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from vggflow.tracking import DataVersion


class ValidationOutputs(BaseModel):
    """What one validation wrote (references, not data); recorded in its ``result.json``."""

    ok: bool
    summary: str
    fingerprint: str
    class_names: list[str]
    n_valid: int
    rows_file: Path
    rows_sha256: str
    files: dict[str, Path]


class ValidatedData(ValidationOutputs):
    """What the validation step hands to the rest of the flow: its outputs and the data version."""

    data_version: DataVersion
