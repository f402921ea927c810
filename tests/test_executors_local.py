"""The executors on one machine, without the shared stack: a sweep run one trial after another
(``features.executor: local``) and the Dask cluster vggflow starts itself when no
``features.dask_address`` is given (``features.dask_workers`` single-threaded worker processes).

Both run the training flow end to end against a real Prefect test server and an MLflow sqlite store.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def child_runs(client, run_id: str, kind: str):
    experiment = client.get_run(run_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{run_id}' and tags.`vggflow.kind` = '{kind}'"
    return client.search_runs([experiment], query)


def test_a_local_sweep_trains_each_configuration_as_a_nested_run(
    project: Path, tiny_dataset: Path, prefect_server
) -> None:
    import os

    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from vggflow.flows.train import train_flow

    overrides = tiny_overrides(**{"finetune.stages": "[]", "registry.promote": "false"})
    summary = train_flow(overrides=overrides, data_dir=str(tiny_dataset), sweep=["head.learning_rate=[0.01, 0.001]"])

    client = MlflowClient()
    trials = child_runs(client, summary.run_id, "trial")
    assert sorted(t.data.params["sweep.head.learning_rate"] for t in trials) == ["0.001", "0.01"]
    assert {t.data.tags["vggflow.pid"] for t in trials} == {str(os.getpid())}  # one after another, here
    for trial in trials:
        assert trial.info.status == "FINISHED" and "best_val_loss" in trial.data.metrics  # the selection metric
        heads = client.search_runs([trial.info.experiment_id], f"tags.`mlflow.parentRunId` = '{trial.info.run_id}'")
        assert [h.data.tags["vggflow.stage"] for h in heads] == ["head"]
    parent = client.get_run(summary.run_id)
    best = int(parent.data.params["sweep.best_trial"])
    table = mlflow.artifacts.load_dict(f"runs:/{summary.run_id}/sweep/trials.json")["trials"]
    assert [row["won"] for row in table].index(True) == best
    # The winner is the trial with the lowest validation loss (the earlier one on a tie).
    losses = [row["val_loss"] for row in table]
    assert best == losses.index(min(losses))
    assert summary.freeze_configuration["stage"] == "head" and summary.model_version


def test_the_local_dask_cluster_extracts_the_same_features_and_stops_its_workers(
    project: Path, tiny_dataset: Path, prefect_server
) -> None:
    import datetime

    import psutil
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime

    from vggflow.config import load_config
    from vggflow.files import read_rows
    from vggflow.flows.train import train_flow
    from vggflow.model import resolve_weights
    from vggflow.precision import resolve_precision
    from vggflow.tasks.features import compute_features

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = datetime.datetime.now(datetime.UTC)
    extra = {"features.executor": "dask", "features.dask_workers": "2", "features.shard_size": "8"}
    overrides = tiny_overrides(**extra, **{"finetune.stages": "[]"})
    summary = train_flow(overrides=overrides, data_dir=str(tiny_dataset))
    assert summary.model_version

    # The pass ran as shards, task runs on the cluster's workers.
    with get_client(sync_client=True) as prefect:
        shards = prefect.read_task_runs(
            task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(like_="shard-"), start_time=TaskRunFilterStartTime(after_=started)
            )
        )
    assert len(shards) >= 3 and all(run.state.is_completed() for run in shards)  # 24 train+val images / 8
    # Assembled, they equal one pass in this process.
    cfg = load_config(None, overrides, values={"data.dir": str(tiny_dataset)})
    [cluster] = [p for p in (Path(cfg.features.cache_dir) / "features").iterdir() if (p / "meta.json").is_file()]
    rows = read_rows(cluster / "rows.csv")
    weights = resolve_weights(cfg.backbone, cfg.features.cache_dir, cfg.seed)
    reference = compute_features(
        rows, tiny_dataset, weights, 32, 16, project / "reference", "reference", ["avg_pool"], ["x"],
        precision=resolve_precision(cfg.backbone.precision),
    ).directory  # fmt: skip
    assert (cluster / "avg_pool.npy").read_bytes() == (reference / "avg_pool.npy").read_bytes()

    # The flow closed the cluster it started: none of its processes is left (Python's multiprocessing
    # resource tracker, started with the first worker, lives as long as this process does).
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.is_running() and "multiprocessing.resource_tracker" not in " ".join(p.cmdline())
    ]
    assert not left, [" ".join(p.cmdline()) for p in left]
