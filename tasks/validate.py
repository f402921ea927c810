"""Step 1: validate the data folder — what is usable, the report, and the data version.

The flow calls :func:`validate_data` once. It runs three Prefect tasks: the champion's manifest
(``fetch-champion-manifest``, for drift warnings), DVC's state of the data (``dvc-state``) and the
validation itself (``validate-data``, cached). It stops the run with a :class:`DataError` when the
data is not usable. The validation is done by :mod:`vggflow.validation`; this module owns its cache
key and its output folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from vggflow.caching import cached_task, code_version, directory_fingerprint
from vggflow.config import Config, DataConfig, ValidationConfig
from vggflow.errors import DataError
from vggflow.files import ROWS_COLUMNS, atomic_write_text
from vggflow.hashing import file_sha256, stable_hash
from vggflow.tracking import DvcState, champion_manifest, dvc_state
from vggflow.validation import (
    ValidatedData,
    ValidationOutputs,
    dataset_fingerprint,
    format_summary,
    read_manifest,
    validate_dataset,
    write_validation_outputs,
)

#: Files one validation writes into its folder; all must be intact for a cached result to be reused.
OUTPUT_FILES = ("report.json", "manifest.csv", "report.html", "rows.csv", "result.json")


def validation_cache_key(
    data_cfg: DataConfig, cfg: ValidationConfig, previous_manifest: Path | None, dvc: DvcState
) -> str:
    """Key of a validation: the data version, the config, the previous manifest (drift) and the code.

    The data version is DVC's md5 when ``data/`` matches ``data.dvc`` (so a ``dvc pull`` that
    rewrites the same files keeps the key); otherwise the folder's listing (names, sizes, mtimes).
    """
    version = dvc.md5 if dvc.md5 and dvc.matches else directory_fingerprint(Path(data_cfg.dir))
    previous = file_sha256(previous_manifest) if previous_manifest else None
    return stable_hash(version, str(Path(data_cfg.dir).resolve()), data_cfg, cfg, previous, code_version(__name__))


def run_validation(
    data_cfg: DataConfig, cfg: ValidationConfig, out_dir: Path, previous_manifest: Path | None
) -> ValidationOutputs:
    """Validate, write report/manifest/HTML plus the usable rows (``rows.csv``) into ``out_dir``."""
    previous = read_manifest(previous_manifest) if previous_manifest else None
    result = validate_dataset(Path(data_cfg.dir), data_cfg, cfg, previous)
    files = write_validation_outputs(result, out_dir)
    rows_file = out_dir / "rows.csv"
    # Each image's size too: a dataset whose images all share one is decoded in whole groups.
    atomic_write_text(rows_file, result.usable[list(ROWS_COLUMNS)].to_csv(index=False))
    outputs = ValidationOutputs(
        ok=result.ok,
        summary=format_summary(result),
        fingerprint=dataset_fingerprint(result),
        class_names=sorted(result.usable["label"].unique().tolist()),
        n_valid=len(result.usable),
        rows_file=rows_file,
        rows_sha256=file_sha256(rows_file),
        files=files,
    )
    atomic_write_text(out_dir / "result.json", outputs.model_dump_json(indent=1))
    return outputs


def _validation_outputs_valid(parameters: dict[str, Any]) -> bool:
    """All outputs present, and the rows training reads match the checksum recorded with them."""
    out_dir = Path(parameters["out_dir"]) / parameters["cache_key"]
    if not all((out_dir / name).is_file() for name in OUTPUT_FILES):
        return False
    try:
        recorded = json.loads((out_dir / "result.json").read_text())["rows_sha256"]
    except (OSError, ValueError, KeyError):
        return False
    return file_sha256(out_dir / "rows.csv") == recorded


@cached_task("validate-data", lambda p: p["cache_key"], _validation_outputs_valid)
def validate_data_task(
    data_cfg: DataConfig, cfg: ValidationConfig, out_dir: Path, previous_manifest: Path | None, cache_key: str
) -> ValidationOutputs:
    """Prefect shell: validate the data folder into ``out_dir/<cache_key>`` (cached by that key)."""
    outputs = run_validation(data_cfg, cfg, Path(out_dir) / cache_key, previous_manifest)
    print(outputs.summary)
    return outputs


@task(name="dvc-state", retries=2, retry_delay_seconds=3)
def dvc_state_task(data_cfg: DataConfig) -> DvcState:
    """Prefect shell: DVC's md5 of the data and whether data/ matches it (DVC I/O: retried)."""
    return dvc_state(data_cfg.dvc_file, data_cfg.dir)


@task(name="fetch-champion-manifest", retries=2, retry_delay_seconds=5)
def fetch_champion_manifest_task(model_name: str, dest: Path) -> Path | None:
    """Prefect shell: the current champion's data manifest (for drift warnings), or None."""
    return champion_manifest(model_name, Path(dest))


def validate_data(cfg: Config) -> ValidatedData:
    """The validation step: validate ``cfg.data.dir`` into ``cfg.work_dir / "validation"``.

    A re-run on the same data, config, champion manifest and DVC state reuses the validation;
    a changed file makes a new one.

    Raises:
        DataError: the data is not usable (the message is the validation summary).
    """
    previous_manifest = fetch_champion_manifest_task(cfg.registry.model_name, cfg.work_dir / "champion")
    dvc = dvc_state_task(cfg.data)
    outputs = validate_data_task(
        cfg.data,
        cfg.validation,
        cfg.work_dir / "validation",
        previous_manifest,
        cache_key=validation_cache_key(cfg.data, cfg.validation, previous_manifest, dvc),
    )
    if not outputs.ok:
        raise DataError(outputs.summary)
    return ValidatedData(**outputs.model_dump(), data_version=dvc.version(outputs.fingerprint))
