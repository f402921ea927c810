"""Tracking: the MLflow parent run of a flow run, and the results logged to it at the end.

The parent run records what makes a result reproducible before any training starts: the whole
config (file and flattened params), data version and whether ``data/`` matches it, git commit
and dirty flag, package versions, seed, backbone weights, and the validation report/manifest.
At the end it receives the chosen freeze configuration, the stage comparison, the test metrics,
the report files and how many seconds each step computed. Nested stage runs are opened by the
steps that train (``vggflow/runs.py``).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from prefect import task

from vggflow import mlflow_tags
from vggflow.caching import code_version
from vggflow.checks import Preflight
from vggflow.config import Config
from vggflow.feature_cache import FeatureSet
from vggflow.files import atomic_write_text
from vggflow.lineage import TRAINING_FLOW
from vggflow.precision import resolve_precision
from vggflow.runs import (
    TrainingRun,
    close_abandoned_runs,
    log_dataset_inputs,
    log_params,
    metric_key,
    mlflow_client,
    owner_tags,
    run_dir,
)
from vggflow.runtime import installed_version
from vggflow.scoring import Evaluation
from vggflow.tracking import DataVersion, git_details, package_versions
from vggflow.training import StageResult, TrainedStages

if TYPE_CHECKING:
    from vggflow.validation import ValidatedData


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
    client = mlflow_client()
    for closed in close_abandoned_runs(experiment_id):
        print(f"marked run {closed} KILLED: its process is gone (killed or crashed)")
    git = git_details()
    commit, dirty = git["commit"], git["dirty"]
    versions = package_versions()
    tags = {
        **system_tags(git),
        **data.as_tags(),
        mlflow_tags.GIT_DIRTY: "unknown" if dirty is None else str(dirty).lower(),
        mlflow_tags.BACKBONE_WEIGHTS: weights_identity,
        mlflow_tags.RANDOM_INIT: str(random_init).lower(),
        mlflow_tags.KIND: "training",
        mlflow_tags.VERSION: installed_version(),
        mlflow_tags.CODE_VERSION: code_version(TRAINING_FLOW),
        **owner_tags(),
    }
    if config_file is not None:
        tags[mlflow_tags.CONFIG_FILE] = str(config_file)
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
        "backbone.resolved_precision": resolve_precision(cfg.backbone.precision),
    }
    params |= {f"package.{name}": version for name, version in versions.items()}
    log_params(client, run_id, params)
    client.log_text(run_id, cfg.as_yaml(), "config/effective_config.yaml")
    if config_file is not None:
        client.log_text(run_id, Path(config_file).read_text(encoding="utf-8"), f"config/{Path(config_file).name}")
    client.log_dict(run_id, versions, "environment/package_versions.json")
    for path in validation_files.values():
        client.log_artifact(run_id, str(path), "validation")
    log_dataset_inputs(client, run_id, [dataset_input(data, cfg.data.dir)])
    save_compare_view(client, experiment_id, cfg.registry.primary_metric)
    return run_id


def system_tags(git: dict) -> dict[str, str]:
    """MLflow's standard system tags, so the UI's User, Source and Version columns are filled.

    MLflow's own context providers give the user and the source type; the source name is the
    command line when run as `vggflow …`; the git tags describe the repository of the current
    folder (the project), not the file that started the process as MLflow's git provider would.
    """
    from mlflow.tracking.context.registry import resolve_tags

    tags = {key: value for key, value in resolve_tags().items() if key.startswith("mlflow.")}
    main_module = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", "")
    if Path(sys.argv[0]).name == "vggflow" or main_module.startswith("vggflow.cli"):  # the console script, -m
        tags[mlflow_tags.MLFLOW_SOURCE_NAME] = shlex.join(["vggflow", *sys.argv[1:]])
    tags[mlflow_tags.MLFLOW_GIT_COMMIT] = git["commit"]
    if git["branch"]:
        tags[mlflow_tags.MLFLOW_GIT_BRANCH] = git["branch"]
    if git["repo_url"]:
        tags[mlflow_tags.MLFLOW_GIT_REPO_URL] = git["repo_url"]
    return tags


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


def log_results(
    run_id: str,
    stages: TrainedStages,
    chosen: StageResult,
    evaluation: Evaluation,
    selection_metric: str,
    out_dir: Path,
    compute_seconds: dict[str, float] | None = None,
) -> None:
    """Log the chosen freeze configuration, the stage comparison, test metrics and report files.

    ``compute_seconds`` (step → seconds of TensorFlow compute) is logged as ``seconds_<step>``
    metrics, so wall time minus compute shows a run's fixed overhead.
    """
    from mlflow.entities import Metric, Param

    from vggflow.reports import stage_figures

    client = mlflow_client()
    freeze = chosen.freeze_configuration()
    params = [Param(f"chosen.{key}", str(value)) for key, value in freeze.items()]
    params.append(Param("stages_skipped", ",".join(stages.skipped) or "none"))
    now = int(time.time() * 1000)
    metrics = [Metric(f"test_{metric_key(k)}", float(v), now, 0) for k, v in evaluation.metrics.items()]
    metrics += [
        Metric("best_val_accuracy", chosen.best_val_accuracy, now, 0),
        Metric("best_val_loss", chosen.best_val_loss, now, 0),
    ]
    metrics += [Metric(f"seconds_{metric_key(k)}", float(v), now, 0) for k, v in (compute_seconds or {}).items()]
    client.log_batch(run_id, metrics=metrics, params=params)
    client.set_tag(run_id, mlflow_tags.FREEZE_CONFIGURATION, chosen.stage)
    # How the test set was scored: images through the whole model, a cached frozen part, or kept scores.
    client.set_tag(run_id, mlflow_tags.TEST_SCORED_FROM, evaluation.scored_from)
    table = stages.table(chosen)
    client.log_dict(
        run_id,
        {"selection_metric": selection_metric, "chosen": freeze, "stages": table, "skipped": stages.skipped},
        "stages/stage_comparison.json",
    )
    history = pd.DataFrame([epoch | {"stage": s.stage} for s in stages.results for epoch in s.history])
    if history.empty:
        history = pd.DataFrame(columns=["stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy"])
    out_dir.mkdir(parents=True, exist_ok=True)
    # The same curves as data (one row per epoch, `step` counting epochs across stages): DVC plots them.
    history_csv = out_dir / "learning_curves.csv"
    atomic_write_text(history_csv, history.assign(step=range(len(history))).to_csv(index=False))
    client.log_artifact(run_id, str(history_csv), "stages")
    curves = stage_figures.plot_learning_curves(history, chosen.stage, out_dir / "learning_curves.png")
    comparison = stage_figures.plot_stage_comparison(
        pd.DataFrame(table).rename(columns={f"best_{selection_metric}": selection_metric}),
        selection_metric,
        chosen.stage,
        out_dir / "stage_comparison.png",
    )
    client.log_artifact(run_id, str(curves), "stages")
    client.log_artifact(run_id, str(comparison), "stages")
    for path in evaluation.files.values():
        client.log_artifact(run_id, str(path), "evaluation")


@task(name="start-run")
def start_run_task(cfg: Config, config_file: str | None, ready: Preflight, validated: ValidatedData) -> TrainingRun:
    """Create the parent run (not retried: a retry could create a second run)."""
    run_id = start_training_run(
        cfg,
        ready.experiment_id,
        Path(config_file) if config_file else None,
        validated.data_version,
        ready.weights.identity,
        ready.weights.random_init,
        validated.files,
    )
    return TrainingRun(
        run_id=run_id,
        experiment_id=ready.experiment_id,
        tracking_uri=ready.tracking_uri,
        report_dir=run_dir(cfg.work_dir, run_id),
    )


@task(name="log-results")
def log_results_task(
    cfg: Config,
    run: TrainingRun,
    features: FeatureSet,
    stages: TrainedStages,
    chosen: StageResult,
    evaluation: Evaluation,
) -> None:
    """Log metrics, the freeze configuration, report files and each step's compute seconds to the parent run."""
    # Seconds of TensorFlow compute per step: wall time minus their sum is the run's fixed overhead.
    compute = {
        "features": features.seconds,
        **{f"fit_{result.stage}": result.seconds for result in stages.results},
        "test_prefix": evaluation.test_prefix_seconds,
        "evaluate": evaluation.seconds,
    }
    log_results(run.run_id, stages, chosen, evaluation, cfg.finetune.selection_metric, run.report_dir, compute)


@task(name="log-sweep")
def log_sweep_task(run: TrainingRun, executor: str, metric: str, table: list[dict], winner: int) -> None:
    """Log a sweep's trials (``sweep/trials.json``) and the winner (``sweep.best_trial``) to the parent run."""
    client = mlflow_client()
    client.log_dict(run.run_id, {"selection_metric": metric, "trials": table}, "sweep/trials.json")
    client.log_param(run.run_id, "sweep.best_trial", winner)
    print(f"sweep: {len(table)} configurations on {executor}; {metric} of each trial's chosen stage:")
    for row in table:
        mark = "*" if row["won"] else " "
        print(f" {mark} trial {row['trial']}  {row[metric]:.4f}  {row['stage']:<8} {row['overrides']}")
