"""Feature extraction on the configured executor: one local pass, or shards on a Dask cluster.

Wiring only; the steps are in ``tasks/features.py``. With ``features.executor: dask``, the images
whose base outputs are not cached yet are cut into shards of whole batches (``plan_shards``);
:func:`extract_shards_flow` maps them over a ``prefect_dask`` ``DaskTaskRunner`` (a task runner
belongs to a flow, hence this subflow), each shard a task run on a worker that reads its images
from ``data.dir`` (a path every worker shares) and writes its arrays to ``features.shard_store``
(or the cache folder). The shards are then assembled, checksum by checksum, into the cache files
the local pass writes (``assemble_shards``), and the cached step finds them complete. Shards in a
store are kept: a shard whose arrays are already there is not computed again, by this client or
another one. A worker lost mid-shard: Dask runs the shard again on another worker. Small runs
stay local: ``local`` is the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from prefect import flow

from vggflow.config import Config, FeaturesConfig
from vggflow.executors import dask_task_runner
from vggflow.feature_cache import FeatureSet
from vggflow.tasks.features import (
    ClusterPass,
    ShardJob,
    ShardOutput,
    assemble_shards,
    extract_features_task,
    extract_shard_task,
    plan_shards,
    test_prefix_pass,
    train_val_pass,
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
    run_on_cluster(
        cfg, weights, image_size, ClusterPass(rows=rows, data_dir=data_dir, layers=layers, directory=directory)
    )


def run_on_cluster(cfg: FeaturesConfig, weights: ResolvedWeights, image_size: int, job: ClusterPass) -> None:
    """Plan the pass's missing shards, run them on the cluster, assemble them into the cache."""
    shards = plan_shards(cfg, weights, image_size, job)
    if shards:
        outputs = extract_shards_flow.with_options(task_runner=dask_task_runner(cfg))(shards)
        assemble_shards(cfg, job, shards, outputs)


def extract_features(cfg: Config, weights: ResolvedWeights, validated: ValidatedData) -> FeatureSet:
    """Step 2, the frozen base over the train and val images: on the cluster first with ``features.executor: dask``."""
    if cfg.features.executor == "dask":
        run_on_cluster(cfg.features, weights, cfg.backbone.image_size, train_val_pass(cfg, weights, validated))
    return extract_features_task(cfg, weights, validated)  # finds the cluster's arrays complete


def extract_test_prefix(
    cfg: Config, weights: ResolvedWeights, validated: ValidatedData, features: FeatureSet, chosen: StageResult
) -> None:
    """The test images' output of the chosen model's frozen part, on the cluster with ``features.executor: dask``.

    Locally, evaluation computes it itself (``tasks/evaluate.py``); either way it lands in the
    same cache folder, where evaluation finds it.
    """
    test = test_prefix_pass(cfg, validated, features, chosen) if cfg.features.executor == "dask" else None
    if test is not None:
        run_on_cluster(cfg.features, weights, cfg.backbone.image_size, test)
