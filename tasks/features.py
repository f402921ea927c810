"""Step 2, features: run the frozen VGG19 base once over every training and validation image.

The article's Example 1 runs the frozen base on every image in every epoch; its output never
changes, so it is computed once per (dataset, backbone, image size), cached on disk
(``vggflow/feature_cache.py``), and the head trains on it. The same pass stores each fine-tuning
stage's frozen-prefix output (``block4_pool`` for a ``block5`` stage, …) that the stage plan
(``vggflow/stages.py``) says is worth caching, so stages do not recompute their frozen lower
blocks every epoch either. The test images are not part of this pass: which of their outputs is
useful depends on the stage chosen later (``tasks/evaluate.py``).

With ``features.executor: dask`` the same pass is cut into shards of whole batches
(:func:`shard_jobs`), each a task run on a Dask worker (:func:`extract_shard_task`; the flow
that maps them is ``flows/extract.py``), and the shards' arrays are assembled into the same cache
files. Each batch holds the same images as in the single-process pass, so the assembled arrays
are the same bytes.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from vggflow.caching import cached_task
from vggflow.checks import check_disk_space, required_bytes
from vggflow.config import Config, FeaturesConfig
from vggflow.dask_worker import worker_extractor, worker_name
from vggflow.extraction import extract_features, write_features
from vggflow.feature_cache import (
    TEST_DIR,
    FeatureSet,
    ShardPart,
    assemble_layers,
    bytes_per_image,
    cached_rows,
    feature_cache_key,
    layer_cache_dir,
    read_meta,
    scoring_prefix_layer,
    verified_arrays,
    verified_layers,
)
from vggflow.files import ROWS_COLUMNS, atomic_write_text, read_rows
from vggflow.hashing import stable_hash
from vggflow.precision import resolve_precision
from vggflow.progress import progress_logger
from vggflow.stages import plan_prefix_caches, prefix_layers

if TYPE_CHECKING:
    from vggflow.model import ResolvedWeights
    from vggflow.training import StageResult
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


# --------------------------------------------------------------------------- shards on a Dask cluster


class ShardJob(BaseModel):
    """Rows ``start:stop`` of a pass of the frozen base, for one Dask worker.

    Attributes:
        index: the shard's position.
        start: first row (a whole number of batches into the pass).
        stop: row after the last.
        paths: the rows' image files, relative to ``data_dir``.
        data_dir: the dataset root, where every worker can read it (a shared path).
        weights: the backbone weights (``ResolvedWeights`` as a dict).
        image_size: square input side.
        batch_size: images per forward pass.
        layers: the layers to compute.
        target: where the shard writes its arrays (a folder path or an fsspec URL).
        precision: the base's compute precision (``float32`` or ``mixed_bfloat16``).
    """

    index: int
    start: int
    stop: int
    paths: list[str]
    data_dir: Path
    weights: dict[str, Any]
    image_size: int
    batch_size: int
    layers: list[str]
    target: str
    precision: str = "float32"


class ShardOutput(BaseModel):
    """What a shard left behind: one part per layer, where it ran and how long it took."""

    index: int
    parts: dict[str, ShardPart]
    worker: str
    seconds: float
    reused: bool = False


def shard_bounds(n_rows: int, shard_size: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each shard: ``shard_size`` rounded up to whole batches, so every batch of
    every shard holds the same images as the single-process pass's batch at that position."""
    size = max(1, math.ceil(shard_size / batch_size)) * batch_size
    return [(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]


def shard_jobs(
    rows: pd.DataFrame,
    data_dir: Path,
    weights: ResolvedWeights,
    image_size: int,
    batch_size: int,
    layers: list[str],
    target: str,
    shard_size: int,
    precision: str = "float32",
) -> list[ShardJob]:
    """The shards of a pass over ``rows`` (in order), writing under ``target``/<what they compute>/."""
    paths = [str(p) for p in rows["path"]]
    work = stable_hash(paths, sorted(layers), weights.identity, image_size, batch_size, precision)
    return [
        ShardJob(
            index=index,
            start=start,
            stop=stop,
            paths=paths[start:stop],
            data_dir=Path(data_dir).resolve(),
            weights=weights.model_dump(mode="json"),
            image_size=image_size,
            batch_size=batch_size,
            layers=sorted(layers),
            target=f"{target.rstrip('/')}/{work}/{start:09d}-{stop:09d}",
            precision=precision,
        )
        for index, (start, stop) in enumerate(shard_bounds(len(paths), shard_size, batch_size))
    ]


class ClusterPass(BaseModel):
    """One pass of the frozen base to run on the cluster: ``layers`` of ``rows`` into the cache ``directory``."""

    model_config = {"arbitrary_types_allowed": True}

    rows: pd.DataFrame
    data_dir: Path
    layers: list[str]
    directory: Path
    precision: str = "float32"


def train_val_pass(cfg: Config, weights: ResolvedWeights, validated: ValidatedData) -> ClusterPass:
    """The train and val images' pass (pooled features and the stages' frozen prefixes), as the local step caches it."""
    size, precision = cfg.backbone.image_size, resolve_precision(cfg.backbone.precision)
    return ClusterPass(
        rows=cached_rows(read_rows(validated.rows_file)),
        data_dir=cfg.data.dir,
        layers=[*prefix_layers(prefix_plan(cfg, validated)), "avg_pool"],
        directory=layer_cache_dir(cfg.features.cache_dir, validated.fingerprint, weights.identity, size, precision),
        precision=precision,
    )


def test_prefix_pass(cfg: Config, validated: ValidatedData, features: FeatureSet, chosen: StageResult):
    """The test images' output of the chosen model's frozen part (None: an ``all`` stage, nothing frozen).

    It goes to the cache's ``test/`` folder, where evaluation (``tasks/evaluate.py``) finds it,
    computed in float32 as the saved model computes.
    """
    layer = scoring_prefix_layer(chosen.prefix_cache)
    if layer is None:
        return None
    rows = read_rows(validated.rows_file)
    test = rows[rows["split"] == "test"].reset_index(drop=True)
    return ClusterPass(rows=test, data_dir=cfg.data.dir, layers=[layer], directory=features.directory / TEST_DIR)


def shard_target(cfg: FeaturesConfig, directory: Path) -> str:
    """Where a pass's shards go: under ``features.shard_store`` (same sub-path as the cache), else the cache folder."""
    if not cfg.shard_store:
        return str(Path(directory).resolve() / "shards")
    try:
        relative = Path(directory).resolve().relative_to(Path(cfg.cache_dir).resolve()).as_posix()
    except ValueError:
        relative = Path(directory).name
    return f"{cfg.shard_store.rstrip('/')}/{relative}"


def plan_shards(cfg: FeaturesConfig, weights: ResolvedWeights, image_size: int, job: ClusterPass) -> list[ShardJob]:
    """The shards of the layers of ``job`` not cached yet (none: nothing to compute), disk space checked first."""
    missing = sorted(set(job.layers) - verified_arrays(job.directory, job.rows))
    if not missing or len(job.rows) == 0:
        return []
    check_disk_space(job.directory, required_bytes(len(job.rows), bytes_per_image(missing, image_size), 0))
    target = shard_target(cfg, job.directory)
    return shard_jobs(
        job.rows, job.data_dir, weights, image_size, cfg.batch_size, missing, target, cfg.shard_size, job.precision
    )


def assemble_shards(cfg: FeaturesConfig, job: ClusterPass, shards: list[ShardJob], outputs: list[ShardOutput]) -> None:
    """Assemble the shards' arrays into the cache files of ``job``, checksum by checksum.

    Shards in the cache folder are deleted once assembled (redundant); in a shard store they
    stay: any client assembles the same pass from them without computing it.
    """
    from vggflow.executors import filesystem, open_written

    outputs = sorted(outputs, key=lambda output: output.index)
    parts = {layer: [output.parts[layer] for output in outputs] for layer in shards[0].layers}
    assemble_layers(job.directory, job.rows, parts, open_written)
    if not cfg.shard_store:
        fs, work = filesystem(shards[0].target.rsplit("/", 1)[0])
        fs.rm(work, recursive=True)


SHARD_MANIFEST = "shard.json"


@task(name="extract-shard", task_run_name="shard-{job.index}", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def extract_shard_task(job: ShardJob) -> ShardOutput:
    """Run the frozen base over one shard on this worker and write its arrays to ``job.target``.

    Idempotent: the arrays go first and a manifest last, so a shard re-run (after its worker died,
    Dask runs it elsewhere) reuses a complete earlier result and overwrites an incomplete one.
    Store I/O is retried once.
    """
    from vggflow.executors import filesystem

    started = time.perf_counter()
    fs, root = filesystem(job.target)
    done = _read_manifest(fs, f"{root}/{SHARD_MANIFEST}")
    if done is not None and set(job.layers) <= set(done.parts):
        return done.model_copy(update={"reused": True, "seconds": time.perf_counter() - started})
    weights_json = json.dumps(job.weights, sort_keys=True)
    compiled = worker_extractor(weights_json, job.image_size, job.precision, tuple(sorted(set(job.layers))))
    with tempfile.TemporaryDirectory(prefix="vggflow-shard-") as scratch:
        rows = pd.DataFrame({"path": job.paths, "label": ""})
        write_features(rows, job.data_dir, compiled, job.batch_size, Path(scratch))
        meta = read_meta(Path(scratch))["layers"]
        fs.makedirs(root, exist_ok=True)
        parts = {}
        for layer in job.layers:
            fs.put_file(str(Path(scratch) / f"{layer}.npy"), f"{root}/{layer}.npy")
            parts[layer] = ShardPart(
                url=fs.unstrip_protocol(f"{root}/{layer}.npy"), sha256=meta[layer]["sha256"], rows=len(rows)
            )
    output = ShardOutput(index=job.index, parts=parts, worker=worker_name(), seconds=time.perf_counter() - started)
    fs.pipe_file(f"{root}/{SHARD_MANIFEST}", output.model_dump_json().encode())
    return output


def _read_manifest(fs, path: str) -> ShardOutput | None:
    try:
        return ShardOutput.model_validate_json(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
