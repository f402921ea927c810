"""Checks that run before any expensive work (the data folder, disk space) and what preflight resolves."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel

from vggflow.errors import DataError, VggflowError

#: A saved VGG19 classifier is ~80 MB; keep room for one per stage plus the logged model.
CHECKPOINT_BYTES = 85_000_000


class Preflight(BaseModel):
    """What the checks resolved: the weights every step loads and the MLflow experiment."""

    weights: object  # vggflow.model.ResolvedWeights (kept loose: importing it imports Keras)
    experiment_id: str
    tracking_uri: str


def check_data_dir(data_dir: Path) -> None:
    """The data folder exists and is a readable directory."""
    if not data_dir.exists():
        hint = " Run `dvc pull` to restore the demo data." if data_dir.name == "data" else ""
        raise DataError(f"data folder not found: {data_dir}.{hint} Give another folder with --data DIR.")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is not a folder: expected DIR/<class>/<image files>")


def required_bytes(n_images: int, feature_bytes_per_image: int, n_checkpoints: int) -> int:
    """Disk needed by a run: cached arrays plus classifier checkpoints, with 20% headroom."""
    return int(1.2 * (n_images * feature_bytes_per_image + n_checkpoints * CHECKPOINT_BYTES))


def check_disk_space(folder: Path, needed: int) -> None:
    """Fail when ``folder``'s filesystem has less than ``needed`` bytes free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise VggflowError(
            f"not enough disk space in {folder.resolve()}: {free / 1e9:.1f} GB free, about {needed / 1e9:.1f} GB "
            "needed for the feature cache and checkpoints. Free space, or set work_dir / features.cache_dir "
            "elsewhere, or lower finetune.prefix_cache_max_gb."
        )
