"""Step 2, features: run the frozen VGG19 base once over every training and validation image.

The article's Example 1 runs the frozen base on every image in every epoch; its output never
changes, so it is computed once per (dataset, backbone, image size), cached on disk
(``vggflow/feature_cache.py``), and the head trains on it. The same pass stores each fine-tuning
stage's frozen-prefix output (``block4_pool`` for a ``block5`` stage, …) that the stage plan
(``vggflow/stages.py``) says is worth caching, so stages do not recompute their frozen lower
blocks every epoch either. The test images are not part of this pass: which of their outputs is
useful depends on the stage chosen later (``tasks/evaluate.py``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from vggflow.caching import cached_task
from vggflow.checks import check_disk_space, required_bytes
from vggflow.config import Config
from vggflow.feature_cache import (
    FeatureSet,
    bytes_per_image,
    cached_rows,
    extract_features,
    feature_cache_key,
    layer_cache_dir,
    verified_layers,
)
from vggflow.files import ROWS_COLUMNS, atomic_write_text, read_rows
from vggflow.precision import resolve_precision
from vggflow.progress import progress_logger
from vggflow.stages import plan_prefix_caches, prefix_layers

if TYPE_CHECKING:
    from vggflow.model import ResolvedWeights
    from vggflow.validation import ValidatedData


def compute_features(
    rows: pd.DataFrame,
    data_dir: Path,
    weights: ResolvedWeights,
    image_size: int,
    batch_size: int,
    cache_dir: Path,
    fingerprint: str,
    layers: list[str],
    class_names: list[str],
    progress=None,
    precision: str = "float32",
) -> FeatureSet:
    """Load the base and make sure the wanted layers are cached for the train and val rows.

    Returns:
        A reference to the cached arrays (``rows_file`` lists their rows, in order).
    """
    from vggflow.model import build_base, set_aside_base
    from vggflow.precision import FLOAT32, dtype_policy

    rows = cached_rows(rows)
    directory = layer_cache_dir(cache_dir, fingerprint, weights.identity, image_size, precision)
    started = time.perf_counter()
    wanted = set(layers) | {"avg_pool"}
    missing = sorted(wanted - verified_layers(directory, rows))
    if missing:
        check_disk_space(Path(cache_dir), required_bytes(len(rows), bytes_per_image(layers, image_size), 0))
        with dtype_policy(precision):
            base = build_base(weights, image_size)
        extract_features(rows, data_dir, base, missing, image_size, batch_size, directory, progress)
        if precision == FLOAT32:
            set_aside_base(base, weights, image_size)  # the head's classifier needs the same, untouched base
    rows_file = directory / "rows.csv"
    listing = rows[[c for c in ROWS_COLUMNS if c in rows.columns]].to_csv(index=False)
    # Rewritten when it differs: the folder may hold the rows of another validation of the same data.
    if not rows_file.is_file() or rows_file.read_text() != listing:
        atomic_write_text(rows_file, listing)
    return FeatureSet(
        directory=directory,
        key=feature_cache_key(fingerprint, weights.identity, image_size, layers, precision),
        layers=sorted(wanted),
        rows_file=rows_file,
        class_names=class_names,
        n_images=len(rows),
        seconds=time.perf_counter() - started,
    )


def prefix_plan(cfg: Config, validated: ValidatedData) -> dict[str, str | None]:
    """Which frozen-prefix output each fine-tuning stage trains from (None: the whole model).

    Stages that augment see images, so they have none.
    """
    if cfg.augment.enabled:
        return {stage.label: None for stage in cfg.finetune.stages}
    return plan_prefix_caches(cfg.finetune, cfg.backbone.image_size, validated.n_valid)


def _key(parameters: dict[str, Any]) -> str:
    cfg, validated = parameters["cfg"], parameters["validated"]
    layers = prefix_layers(prefix_plan(cfg, validated))
    precision = resolve_precision(cfg.backbone.precision)
    return feature_cache_key(
        validated.fingerprint, parameters["weights"].identity, cfg.backbone.image_size, layers, precision
    )


def _outputs_valid(parameters: dict[str, Any]) -> bool:
    cfg, validated = parameters["cfg"], parameters["validated"]
    size = cfg.backbone.image_size
    precision = resolve_precision(cfg.backbone.precision)
    directory = layer_cache_dir(
        cfg.features.cache_dir, validated.fingerprint, parameters["weights"].identity, size, precision
    )
    wanted = set(prefix_layers(prefix_plan(cfg, validated))) | {"avg_pool"}
    return (directory / "rows.csv").is_file() and wanted <= verified_layers(directory, read_rows(validated.rows_file))


@cached_task("extract-features", _key, _outputs_valid)
def extract_features_task(cfg: Config, weights: ResolvedWeights, validated: ValidatedData) -> FeatureSet:
    """Cache the frozen base's outputs for the validated train and val images (keyed by data + backbone + size)."""
    plan = prefix_plan(cfg, validated)
    features = compute_features(
        read_rows(validated.rows_file),
        cfg.data.dir,
        weights,
        cfg.backbone.image_size,
        cfg.features.batch_size,
        cfg.features.cache_dir,
        validated.fingerprint,
        prefix_layers(plan),
        validated.class_names,
        progress_logger("feature extraction"),
        resolve_precision(cfg.backbone.precision),
    )
    return features.model_copy(update={"prefix_plan": plan})
