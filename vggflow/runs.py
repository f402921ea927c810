"""MLflow runs as the training flow uses them: the parent run, nested stage runs, closing them.

A flow run owns one parent run; every stage (the head, each fine-tuning stage) gets a nested run
that is closed with the stage's summary, or FAILED/KILLED when the stage stops early. Each run
records which process owns it, so a later run can close runs whose process died.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel

from vggflow import mlflow_tags
from vggflow.tracking import epoch_metrics
from vggflow.training import StageResult

MAX_PARAMS_PER_BATCH = 100


class TrainingRun(BaseModel):
    """The MLflow parent run of a flow run (a reference)."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    report_dir: Path


def run_dir(work_dir: Path, run_id: str) -> Path:
    """The local folder of a run's reports (figures, model card, the model package)."""
    return Path(work_dir) / "runs" / run_id


def metric_key(name: str) -> str:
    """An MLflow-safe metric name (class names may hold any character)."""
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", name)


def mlflow_client():
    """An MLflow client of the current tracking store."""
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MAX_PARAMS_PER_BATCH])


def log_dataset_inputs(client, run_id: str, datasets: list) -> None:
    """Log dataset inputs to a run, safe when other runs log the same dataset at the same moment.

    The store looks a dataset up by (experiment, name, digest) and inserts it when missing; two
    trainings on the same data can both miss it, and the later insert fails on the store's unique
    key. Logging again then finds the row the other run wrote and only links it to this run.
    """
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=datasets)
            return
        except MlflowException as err:
            if attempt == 2 or "unique" not in str(err).lower():
                raise
            time.sleep(0.2 * (attempt + 1))


def open_nested_run(
    experiment_id: str, parent_run_id: str, run_name: str, tags: dict[str, str], params: dict[str, object]
) -> str:
    """Create a run nested under ``parent_run_id`` that repeats its data version (tag, param, dataset input)
    and its MLflow system tags (user, source, git)."""
    client = mlflow_client()
    parent = client.get_run(parent_run_id)
    data_version = parent.data.tags.get(mlflow_tags.DATA_VERSION, "unknown")
    tags = {
        **{key: value for key, value in parent.data.tags.items() if key in mlflow_tags.SYSTEM_TAGS},
        mlflow_tags.MLFLOW_PARENT_RUN_ID: parent_run_id,
        mlflow_tags.DATA_VERSION: data_version,
        **owner_tags(),
        **tags,
    }
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    log_params(client, run.info.run_id, {**params, "data_version": data_version})
    inputs = parent.inputs.dataset_inputs if parent.inputs else []
    if inputs:
        log_dataset_inputs(client, run.info.run_id, list(inputs))
    return run.info.run_id


def open_stage_run(
    experiment_id: str, parent_run_id: str, stage: str, unfreeze_from: str | None, learning_rate: float
) -> str:
    """Create the nested run of a stage, named after its freeze configuration.

    It repeats the parent's data version and carries its own freeze configuration under the
    parent's tag key, so stage rows fill the same columns in the UI.
    """
    tags = {mlflow_tags.STAGE: stage, mlflow_tags.FREEZE_CONFIGURATION: stage, mlflow_tags.KIND: "stage"}
    params = {"stage": stage, "unfreeze_from": unfreeze_from or "none", "learning_rate": learning_rate}
    return open_nested_run(experiment_id, parent_run_id, f"stage-{stage}", tags, params)


@contextlib.contextmanager
def trial_run(run: TrainingRun, index: int, overrides: dict[str, object]) -> Iterator[TrainingRun]:
    """A nested run for one sweep configuration; the stages trained in it nest under it.

    Yields the run as a :class:`TrainingRun` (same experiment and reports folder), closed
    FINISHED when the block succeeds, FAILED/KILLED when it raises.
    """
    tags = {mlflow_tags.KIND: "trial", mlflow_tags.TRIAL: str(index)}
    params = {f"sweep.{key}": value for key, value in overrides.items()}
    run_id = open_nested_run(run.experiment_id, run.run_id, f"trial-{index}", tags, params)
    try:
        yield run.model_copy(update={"run_id": run_id})
    except BaseException as error:
        end_run_for(run_id, error)
        raise
    end_run(run_id, "FINISHED")


def close_stage_run(stage_run_id: str, result: StageResult) -> None:
    """Log a finished stage's summary; replay its epochs when the stage came from the cache.

    A cached stage (reused from an earlier, e.g. interrupted, run) trained under another run id:
    its per-epoch history is copied here so every parent run shows all of its stages.
    """
    from mlflow.entities import Metric

    client = mlflow_client()
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
    log_params(
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
    mlflow_client().set_terminated(run_id, status)


def end_run_for(run_id: str | None, error: BaseException) -> None:
    """Close ``run_id`` after ``error``: KILLED for an interrupt/SIGTERM, FAILED otherwise."""
    if run_id is None:
        return
    killed = isinstance(error, (KeyboardInterrupt, SystemExit))
    try:
        end_run(run_id, "KILLED" if killed else "FAILED")
    except Exception:  # the store itself may be what failed; the next run's sweep will close it
        pass


def owner_tags() -> dict[str, str]:
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
    client = mlflow_client()
    host = socket.gethostname()
    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        if is_abandoned(run.data.tags, host):
            client.set_tag(run.info.run_id, mlflow_tags.CLOSED_BY, "a later run found its process gone")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


@contextlib.contextmanager
def closed_on_exit(run_id: str) -> Iterator[str]:
    """Close ``run_id`` FINISHED when the block succeeds, else FAILED (KILLED on an interrupt)."""
    try:
        yield run_id
    except BaseException as error:
        end_run_for(run_id, error)
        raise
    end_run(run_id, "FINISHED")


@contextlib.contextmanager
def stage_run(run: TrainingRun, stage: str, unfreeze_from: str | None, learning_rate: float) -> Iterator[str]:
    """A nested run for one stage, closed FAILED/KILLED if the block raises.

    On success the caller closes it with :func:`close_stage_run` (which logs the stage's summary).
    """
    run_id = open_stage_run(run.experiment_id, run.run_id, stage, unfreeze_from, learning_rate)
    try:
        yield run_id
    except BaseException as error:
        end_run_for(run_id, error)
        raise


def in_stage_run(
    run: TrainingRun, stage: str, unfreeze_from: str | None, learning_rate: float, train: Callable[[str], StageResult]
) -> StageResult:
    """Train a stage inside its own nested run: ``train(stage_run_id)``, then close the run with its summary.

    ``train`` may return a stage reused from the cache; its epochs are then replayed into the run
    (:func:`close_stage_run`), so every parent run shows all of its stages.
    """
    with stage_run(run, stage, unfreeze_from, learning_rate) as stage_run_id:
        result = train(stage_run_id)
        close_stage_run(stage_run_id, result)
    return result
