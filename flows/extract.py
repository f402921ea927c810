"""Feature extraction on the configured executor: one local pass, or shards on a Dask cluster.

With ``features.executor: dask``, the images whose base outputs are not cached yet are cut into
shards of whole batches; :func:`extract_shards_flow` maps them over a ``prefect_dask``
``DaskTaskRunner`` (a task runner belongs to a flow, hence this subflow), each shard a task run
on a worker that reads its images from ``data.dir`` (a path every worker shares) and writes its
arrays to ``features.shard_store`` (or the cache folder). The shards are then assembled, checksum
by checksum, into the cache files the local pass writes, and the cached step
(``tasks/features.py``) finds them complete. Shards in a store are kept: a shard whose arrays are
already there is not computed again, by this client or another one. A worker lost mid-shard: Dask runs the shard again
on another worker. Small runs stay local: ``local`` is the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from prefect import flow

from vggflow.checks import check_disk_space, required_bytes
from vggflow.config import Config, FeaturesConfig
from vggflow.executors import dask_task_runner, filesystem
from vggflow.feature_cache import (
    TEST_DIR,
    FeatureSet,
    assemble_layers,
    bytes_per_image,
    cached_rows,
    layer_cache_dir,
    scoring_prefix_layer,
    verified_arrays,
)
from vggflow.files import read_rows
from vggflow.stages import prefix_layers
from vggflow.tasks.features import (
    ShardJob,
    ShardOutput,
    extract_features_task,
    extract_shard_task,
    prefix_plan,
    shard_jobs,
)

if TYPE_CHECKING:
    from vggflow.model import ResolvedWeights
    from vggflow.training import StageResult
    from vggflow.validation import ValidatedData


@flow(name="vggflow-extract-shards", log_prints=True)
def extract_shards_flow(jobs: list[ShardJob]) -> list[ShardOutput]:
    """Run every shard as a task on the flow's task runner (a Dask cluster); their outputs, in order."""
    outputs = [future.result() for future in extract_shard_task.map(jobs)]
    for output in outputs:
        rows = next(iter(output.parts.values())).rows
        how = "reused" if output.reused else f"{output.seconds:.1f} s"
        print(f"shard {output.index}: {rows} images on {output.worker} ({how})")
    return outputs


def extract_on_cluster(
    cfg: FeaturesConfig,
    weights: ResolvedWeights,
    image_size: int,
    rows: pd.DataFrame,
    data_dir: Path,
    layers: list[str],
    directory: Path,
) -> None:
    """Make sure ``layers`` of ``rows`` are cached in ``directory``, computing what is missing on the cluster."""
    missing = sorted(set(layers) - verified_arrays(directory, rows))
    if not missing or len(rows) == 0:
        return
    check_disk_space(directory, required_bytes(len(rows), bytes_per_image(missing, image_size), 0))
    target = shard_target(cfg, directory)
    jobs = shard_jobs(rows, data_dir, weights, image_size, cfg.batch_size, missing, target, cfg.shard_size)
    outputs = sorted(extract_shards_flow.with_options(task_runner=dask_task_runner(cfg))(jobs), key=lambda o: o.index)
    parts = {layer: [output.parts[layer] for output in outputs] for layer in missing}
    import fsspec

    assemble_layers(directory, rows, parts, lambda url: fsspec.open(url, "rb").open())
    if not cfg.shard_store:
        fs, work = filesystem(jobs[0].target.rsplit("/", 1)[0])
        fs.rm(work, recursive=True)  # assembled beside them: redundant
    # In a shard store they stay: any client assembles the same pass from them without computing it.


def shard_target(cfg: FeaturesConfig, directory: Path) -> str:
    """Where a pass's shards go: under ``features.shard_store`` (same sub-path as the cache), else the cache folder."""
    if not cfg.shard_store:
        return str(Path(directory).resolve() / "shards")
    try:
        relative = Path(directory).resolve().relative_to(Path(cfg.cache_dir).resolve()).as_posix()
    except ValueError:
        relative = Path(directory).name
    return f"{cfg.shard_store.rstrip('/')}/{relative}"


def extract_features(cfg: Config, weights: ResolvedWeights, validated: ValidatedData) -> FeatureSet:
    """Step 2, the frozen base over the train and val images: on the cluster first with ``features.executor: dask``."""
    if cfg.features.executor == "dask":
        size = cfg.backbone.image_size
        extract_on_cluster(
            cfg.features,
            weights,
            size,
            cached_rows(read_rows(validated.rows_file)),
            cfg.data.dir,
            [*prefix_layers(prefix_plan(cfg, validated)), "avg_pool"],
            layer_cache_dir(cfg.features.cache_dir, validated.fingerprint, weights.identity, size),
        )
    return extract_features_task(cfg, weights, validated)  # finds the cluster's arrays complete


def extract_test_prefix(
    cfg: Config, weights: ResolvedWeights, validated: ValidatedData, features: FeatureSet, chosen: StageResult
) -> None:
    """The test images' output of the chosen model's frozen part, on the cluster with ``features.executor: dask``.

    Locally, evaluation computes it itself (``tasks/evaluate.py``); either way it lands in the
    same cache folder, where evaluation finds it.
    """
    layer = scoring_prefix_layer(chosen.prefix_cache)
    if cfg.features.executor != "dask" or layer is None:
        return
    rows = read_rows(validated.rows_file)
    test = rows[rows["split"] == "test"].reset_index(drop=True)
    extract_on_cluster(
        cfg.features, weights, cfg.backbone.image_size, test, cfg.data.dir, [layer], features.directory / TEST_DIR
    )
