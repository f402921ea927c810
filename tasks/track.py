"""Step 6a: the MLflow runs — one parent run per flow run, one nested run per stage.

The parent run records what makes a result reproducible before any training starts: the whole
config (file and flattened params), data version and whether ``data/`` matches it, git commit
and dirty flag, package versions, seed, backbone weights, and the validation report/manifest.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from prefect import task

from vggflow import mlflow_tags
from vggflow.config import Config
from vggflow.tracking import (
    DataVersion,
    epoch_metrics,
    git_info,
    package_versions,
)
from vggflow.training import StageResult

MAX_PARAMS_PER_BATCH = 100


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])


def start_training_run(
    cfg: Config,
    experiment_id: str,
    config_file: Path | None,
    data: DataVersion,
    weights_identity: str,
    random_init: bool,
    validation_files: dict[str, Path],
    run_name: str | None = None,
) -> str:
    """Create the parent run and log everything known before training; returns its id.

    First closes runs left RUNNING by killed processes on this host (see :func:`close_abandoned_runs`).
    """
    client = _client()
    for closed in close_abandoned_runs(experiment_id):
        print(f"marked run {closed} KILLED: its process is gone (killed or crashed)")
    commit, dirty = git_info()
    versions = package_versions()
    tags = {
        **data.as_tags(),
        mlflow_tags.MLFLOW_GIT_COMMIT: commit,
        mlflow_tags.GIT_DIRTY: "unknown" if dirty is None else str(dirty).lower(),
        mlflow_tags.BACKBONE_WEIGHTS: weights_identity,
        mlflow_tags.RANDOM_INIT: str(random_init).lower(),
        mlflow_tags.KIND: "training",
        **_owner_tags(),
    }
    flow_run_id = _prefect_flow_run_id()
    if flow_run_id:
        tags[mlflow_tags.PREFECT_FLOW_RUN_ID] = flow_run_id
    name = run_name or f"train-{data.md5.removesuffix('.dir')[:8]}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    params = cfg.flat_params() | {
        "data_version": data.md5,
        "git_commit": commit,
        "backbone.weights_identity": weights_identity,
        "backbone.random_init": str(random_init),
    }
    params |= {f"package.{name}": version for name, version in versions.items()}
    _log_params(client, run_id, params)
    client.log_text(run_id, cfg.as_yaml(), "config/effective_config.yaml")
    if config_file is not None:
        client.log_text(run_id, Path(config_file).read_text(encoding="utf-8"), f"config/{Path(config_file).name}")
    client.log_dict(run_id, versions, "environment/package_versions.json")
    for path in validation_files.values():
        client.log_artifact(run_id, str(path), "validation")
    client.log_inputs(run_id, datasets=[dataset_input(data, cfg.data.dir)])
    save_compare_view(client, experiment_id, cfg.registry.primary_metric)
    return run_id


def dataset_input(data: DataVersion, data_dir: Path):
    """The data as an MLflow dataset input: the UI's default *Dataset* column shows its version."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=Path(data_dir).name or "data",
        digest=data.md5[:36],  # the store's digest column holds 36 characters (a DVC ".dir" md5 fits)
        source_type="local",
        source=json.dumps({"uri": str(Path(data_dir).resolve())}),
        profile=json.dumps(
            {"data_version": data.md5, "matches_dvc": data.matches, "dvc_tracked_path": data.tracked_path}
        ),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


def save_compare_view(client, experiment_id: str, primary_metric: str) -> None:
    """Save the experiment's comparison views in the MLflow UI (see ``vggflow.dashboard``)."""
    from mlflow.exceptions import MlflowException

    from vggflow.dashboard import compare_view_tags

    try:
        for key, value in compare_view_tags(primary_metric).items():
            client.set_experiment_tag(experiment_id, key, value)
    except MlflowException as err:  # a UI convenience must never fail a training run
        print(f"note: could not save the MLflow UI views of experiment {experiment_id}: {err}")


def _prefect_flow_run_id() -> str | None:
    try:
        from prefect.context import get_run_context

        context = get_run_context()
        flow_run = getattr(context, "flow_run", None) or getattr(
            getattr(context, "task_run", None), "flow_run_id", None
        )
        return str(getattr(flow_run, "id", flow_run)) if flow_run else None
    except Exception:  # outside a flow run
        return None


def open_stage_run(
    experiment_id: str, parent_run_id: str, stage: str, unfreeze_from: str | None, learning_rate: float
) -> str:
    """Create the nested run of a stage, named after its freeze configuration.

    It repeats the parent's data version (tag, param, dataset input) and carries its own freeze
    configuration under the parent's tag key, so stage rows fill the same columns in the UI.
    """
    client = _client()
    parent = client.get_run(parent_run_id)
    data_version = parent.data.tags.get(mlflow_tags.DATA_VERSION, "unknown")
    tags = {
        mlflow_tags.MLFLOW_PARENT_RUN_ID: parent_run_id,
        mlflow_tags.STAGE: stage,
        mlflow_tags.FREEZE_CONFIGURATION: stage,
        mlflow_tags.DATA_VERSION: data_version,
        mlflow_tags.KIND: "stage",
        **_owner_tags(),
    }
    run = client.create_run(experiment_id, run_name=f"stage-{stage}", tags=tags)
    params = {
        "stage": stage,
        "unfreeze_from": unfreeze_from or "none",
        "learning_rate": learning_rate,
        "data_version": data_version,
    }
    _log_params(client, run.info.run_id, params)
    inputs = parent.inputs.dataset_inputs if parent.inputs else []
    if inputs:
        client.log_inputs(run.info.run_id, datasets=list(inputs))
    return run.info.run_id


def close_stage_run(stage_run_id: str, result: StageResult) -> None:
    """Log a finished stage's summary; replay its epochs when the stage came from the cache.

    A cached stage (reused from an earlier, e.g. interrupted, run) trained under another run id:
    its per-epoch history is copied here so every parent run shows all of its stages.
    """
    from mlflow.entities import Metric

    client = _client()
    if result.mlflow_run_id != stage_run_id:
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now, int(epoch["epoch"]))
            for epoch in result.history
            for key, value in epoch_metrics(epoch).items()
        ]
        if metrics:
            client.log_batch(stage_run_id, metrics=metrics)
        client.set_tag(stage_run_id, mlflow_tags.REUSED_FROM_RUN, result.mlflow_run_id or "cache")
    freeze = result.freeze_configuration()
    _log_params(
        client, stage_run_id, {k: v for k, v in freeze.items() if k not in ("stage", "learning_rate", "unfreeze_from")}
    )
    summary = {
        "best_val_accuracy": result.best_val_accuracy,
        "best_val_loss": result.best_val_loss,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stage_seconds": result.seconds,
        "images_per_second": result.images_per_second,
    }
    client.log_batch(
        stage_run_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in summary.items()]
    )
    client.set_terminated(stage_run_id, "FINISHED")


def end_run(run_id: str, status: str) -> None:
    """Mark a run FINISHED, FAILED or KILLED."""
    _client().set_terminated(run_id, status)


def end_run_for(run_id: str | None, error: BaseException) -> None:
    """Close ``run_id`` after ``error``: KILLED for an interrupt/SIGTERM, FAILED otherwise."""
    if run_id is None:
        return
    killed = isinstance(error, (KeyboardInterrupt, SystemExit))
    try:
        end_run(run_id, "KILLED" if killed else "FAILED")
    except Exception:  # the store itself may be what failed; the next run's sweep will close it
        pass


def _owner_tags() -> dict[str, str]:
    """Which process owns a run, so a later run can tell an abandoned run from a live one."""
    return {
        mlflow_tags.HOST: socket.gethostname(),
        mlflow_tags.PID: str(os.getpid()),
        mlflow_tags.PID_STARTED: str(_process_start(os.getpid())),
    }


def _process_start(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return -1.0


def is_abandoned(tags: dict[str, str], host: str) -> bool:
    """True when a RUNNING run's owning process on this host is gone (killed, crashed, or its pid reused)."""
    if tags.get(mlflow_tags.HOST) != host or mlflow_tags.PID not in tags:
        return False  # another machine's run: we cannot tell, leave it alone
    started = _process_start(int(tags[mlflow_tags.PID]))
    return started < 0 or abs(started - float(tags.get(mlflow_tags.PID_STARTED, started))) > 1.0


def close_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark this host's RUNNING runs whose process died (e.g. ``kill -9``) as KILLED.

    Returns the ids it closed. Runs of live processes (a concurrent training) are untouched.
    """
    client = _client()
    host = socket.gethostname()
    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        if is_abandoned(run.data.tags, host):
            client.set_tag(run.info.run_id, mlflow_tags.CLOSED_BY, "a later run found its process gone")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


@task(name="start-run")
def start_training_run_task(
    cfg: Config,
    experiment_id: str,
    config_file: Path | None,
    data: DataVersion,
    weights_identity: str,
    random_init: bool,
    validation_files: dict[str, Path],
) -> str:
    """Prefect shell: create the parent run (not retried: a retry could create a second run)."""
    return start_training_run(cfg, experiment_id, config_file, data, weights_identity, random_init, validation_files)
