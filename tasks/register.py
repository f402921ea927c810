"""Step 6b: log the run's results and the model, and register it as a new version.

The logged model is an MLflow pyfunc built from code (``vggflow/pyfunc_model.py``) around the
chosen Keras classifier (``.keras`` file) and its class names: it takes raw RGB images and
returns class names and probabilities, with no pickle and no vggflow import on the client.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel

from vggflow import mlflow_tags
from vggflow.config import RegistryConfig
from vggflow.files import atomic_write_text, read_rows
from vggflow.tasks.evaluate import Evaluation
from vggflow.training import StageResult

MODEL_CODE = Path(__file__).resolve().parent.parent / "vggflow" / "pyfunc_model.py"
#: What the registered model needs at inference, pinned to the versions it was trained with.
MODEL_PACKAGES = ("tensorflow", "keras", "mlflow", "numpy", "pandas")


class RegisteredVersion(BaseModel):
    """A registered model version (a reference)."""

    name: str
    version: str
    model_uri: str
    run_id: str


def metric_key(name: str) -> str:
    """An MLflow-safe metric name (class names may hold any character)."""
    return re.sub(r"[^0-9A-Za-z_\-./ ]", "_", name)


def pinned_requirements() -> list[str]:
    """Pinned pip requirements from the installed versions (inferring them costs ~20 s)."""
    import importlib.metadata

    return [f"{name}=={importlib.metadata.version(name)}" for name in MODEL_PACKAGES]


def model_signature():
    """Input: a batch of raw RGB images, uint8, any size (-1 = variable)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]))


def log_results(
    run_id: str,
    stages: list[StageResult],
    chosen: StageResult,
    evaluation: Evaluation,
    selection_metric: str,
    skipped: list[str],
    out_dir: Path,
    compute_seconds: dict[str, float] | None = None,
) -> None:
    """Log the chosen freeze configuration, the stage comparison, test metrics and report files.

    ``compute_seconds`` (step → seconds of TensorFlow compute) is logged as ``seconds_<step>``
    metrics, so wall time minus compute shows a run's fixed overhead.
    """
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from vggflow.reports import stage_figures
    from vggflow.tasks.select import stage_table

    client = MlflowClient()
    freeze = chosen.freeze_configuration()
    params = [Param(f"chosen.{key}", str(value)) for key, value in freeze.items()]
    params.append(Param("stages_skipped", ",".join(skipped) or "none"))
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
    table = stage_table(stages, chosen)
    client.log_dict(
        run_id,
        {"selection_metric": selection_metric, "chosen": freeze, "stages": table, "skipped": skipped},
        "stages/stage_comparison.json",
    )
    history = pd.DataFrame([epoch | {"stage": s.stage} for s in stages for epoch in s.history])
    if history.empty:
        history = pd.DataFrame(columns=["stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy"])
    out_dir.mkdir(parents=True, exist_ok=True)
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


class _PyfuncWithKerasFlavor:
    """A flavor module for ``mlflow.models.Model.log``: the pyfunc model from code, plus the keras
    flavour pointing at the same ``.keras`` file.

    So ``mlflow.pyfunc.load_model`` gives the raw-image, class-named interface and
    ``mlflow.keras.load_model`` gives the Keras classifier itself, from one logged model.
    """

    @staticmethod
    def save_model(path, mlflow_model, **kwargs) -> None:
        import keras

        import mlflow

        mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)
        # mlflow.keras loads <path>/<data>/model.keras: the classifier artifact is copied as artifacts/model.keras.
        mlflow_model.add_flavor(
            "keras", data="artifacts", keras_module="keras", keras_version=keras.__version__, save_exported_model=False
        )
        mlflow_model.save(str(Path(path) / "MLmodel"))


def log_classifier(run_id: str, checkpoint: Path, class_names: list[str], image_size: int, work_dir: Path) -> str:
    """Log the chosen classifier as the run's model; returns its ``models:/m-…`` URI."""
    import shutil

    from mlflow.models import Model

    import mlflow
    from vggflow.tracking import without_type_hint_advice

    package = work_dir / "model-package"
    package.mkdir(parents=True, exist_ok=True)
    (package / "model.keras").unlink(missing_ok=True)
    try:
        os.link(checkpoint, package / "model.keras")  # MLflow copies it into the store anyway
    except OSError:
        shutil.copyfile(checkpoint, package / "model.keras")
    classes = atomic_write_text(
        package / "classes.json", json.dumps({"class_names": class_names, "image_size": image_size}, indent=1)
    )
    # MLflow 3 files a logged model under the *active* experiment, not its source run's: without
    # this it lands in "Default" (experiment 0), its artifacts in ./mlruns of whatever folder the
    # command ran from, outside the configured store.
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    with warnings.catch_warnings(), without_type_hint_advice():
        # The signature documents the input; an input example would only duplicate it.
        warnings.filterwarnings("ignore", message=".*input_example.*")
        info = Model.log(
            None,  # artifact_path: deprecated in favour of name, still positional
            name="model",
            flavor=_PyfuncWithKerasFlavor,
            run_id=run_id,
            python_model=str(MODEL_CODE),
            artifacts={"classifier": str(package / "model.keras"), "classes": str(classes)},
            signature=model_signature(),
            pip_requirements=pinned_requirements(),
            metadata={"class_names": class_names, "image_size": image_size, "input": "uint8 RGB (N, H, W, 3)"},
        )
    return info.model_uri


def register_version(model_uri: str, cfg: RegistryConfig, run_id: str, tags: dict[str, str]) -> RegisteredVersion:
    """Register ``model_uri`` as a new version of ``cfg.model_name`` with its provenance tags."""
    import mlflow

    version = mlflow.register_model(model_uri, cfg.model_name, tags=tags)
    return RegisteredVersion(name=cfg.model_name, version=str(version.version), model_uri=model_uri, run_id=run_id)


def version_tags(run_tags: dict[str, str], run_id: str, chosen: StageResult, evaluation: Evaluation) -> dict[str, str]:
    """Tags of a registered version: data version, git commit, run id, freeze configuration, metrics."""
    tags = {
        mlflow_tags.DATA_VERSION: run_tags.get(mlflow_tags.DATA_VERSION, "unknown"),
        mlflow_tags.GIT_COMMIT: run_tags.get(mlflow_tags.MLFLOW_GIT_COMMIT, "unknown"),
        mlflow_tags.RUN_ID: run_id,
        mlflow_tags.FREEZE_CONFIGURATION: json.dumps(chosen.freeze_configuration()),
        mlflow_tags.RANDOM_INIT: run_tags.get(mlflow_tags.RANDOM_INIT, "unknown"),
    }
    for key in ("accuracy", "macro_f1"):
        tags[mlflow_tags.test_metric(key)] = f"{evaluation.metrics[key]:.6f}"
    return tags


@task(name="log-results")
def log_results_task(
    run_id: str,
    stages: list[StageResult],
    chosen: StageResult,
    evaluation: Evaluation,
    selection_metric: str,
    skipped: list[str],
    out_dir: Path,
    compute_seconds: dict[str, float] | None = None,
) -> None:
    """Prefect shell: log metrics, freeze configuration and report files to the parent run."""
    log_results(run_id, stages, chosen, evaluation, selection_metric, skipped, out_dir, compute_seconds)


@task(name="log-model")
def log_model_task(run_id: str, checkpoint: Path, class_names: list[str], image_size: int, work_dir: Path) -> str:
    """Prefect shell: log the pyfunc model (not retried: a retry would log a second model)."""
    return log_classifier(run_id, checkpoint, class_names, image_size, work_dir)


@task(name="register-model", retries=3, retry_delay_seconds=5)
def register_task(
    model_uri: str, cfg: RegistryConfig, run_id: str, chosen: StageResult, evaluation: Evaluation
) -> RegisteredVersion:
    """Prefect shell: register a new version (registry I/O: retried)."""
    from mlflow.tracking import MlflowClient

    run_tags = MlflowClient().get_run(run_id).data.tags
    return register_version(model_uri, cfg, run_id, version_tags(run_tags, run_id, chosen, evaluation))


def describe_version(
    cfg,
    run_id: str,
    version: RegisteredVersion,
    data,
    validated,
    weights,
    stages: list[StageResult],
    chosen: StageResult,
    evaluation: Evaluation,
    decision,
    out_dir: Path,
) -> Path:
    """Write the model card, log it to the run and set it as the version's description."""
    from mlflow.tracking import MlflowClient

    from vggflow.reports.model_card import ModelCardInfo, render_model_card
    from vggflow.tracking import git_info

    commit, dirty = git_info()
    rows = read_rows(validated.rows_file)
    counts = {label: group["split"].value_counts().to_dict() for label, group in rows.groupby("label", sort=True)}
    per_class = pd.read_csv(evaluation.files["per_class_csv"], dtype={"class": str}, keep_default_na=False)
    card = render_model_card(
        ModelCardInfo(
            model_name=version.name,
            version=version.version,
            run_id=run_id,
            created=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            data_version=data.md5,
            data_matches_dvc=data.matches,
            class_counts=counts,
            image_size=cfg.backbone.image_size,
            backbone_weights=cfg.backbone.weights,
            random_init=weights.random_init,
            freeze_configuration=chosen.freeze_configuration(),
            stages=[s.summary() | {"chosen": s.stage == chosen.stage} for s in stages],  # stage_table's rows
            test_metrics={
                k: evaluation.metrics[k]
                for k in ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall")
            },
            per_class=per_class,
            promotion={
                "decision": "promoted to @champion"
                if decision.promoted
                else ("not gated (--no-promote)" if not decision.aliases_changed else "rejected (@challenger)"),
                "reason": decision.reason,
                "metric": decision.primary_metric,
                "candidate_metric": decision.candidate_value,
                "champion_metric": decision.champion_value,
                "delta": decision.delta,
            },
            config_yaml=cfg.as_yaml(),
            git_commit=commit,
            git_dirty=bool(dirty),
        )
    )
    path = atomic_write_text(out_dir / "model_card.md", card)
    client = MlflowClient()
    client.log_artifact(run_id, str(path))
    client.update_model_version(version.name, version.version, description=card)
    note = run_note(version, chosen, evaluation, decision, data.md5, weights.random_init)
    client.set_tag(run_id, mlflow_tags.MLFLOW_NOTE, note)  # the run page's Description
    return path


def run_note(
    version: RegisteredVersion,
    chosen: StageResult,
    evaluation: Evaluation,
    decision,
    data_version: str,
    random_init: bool,
) -> str:
    """A few lines of Markdown on top of the run page: outcome first, details in the artifacts."""
    freeze = chosen.freeze_configuration()
    primary = decision.primary_metric
    others = ", ".join(f"{k} {evaluation.metrics[k]:.4f}" for k in ("accuracy", "macro_f1") if k != primary)
    outcome = "promoted to `@champion`" if decision.promoted else "not promoted"
    lines = [
        f"**{version.name} v{version.version}: {outcome}** ({decision.reason})",
        "",
        f"- test {primary} **{evaluation.metrics[primary]:.4f}** (primary), {others}; {evaluation.n_test} test images",
        (
            f"- freeze configuration **{freeze['stage']}**: first trainable layer `{freeze['first_trainable_layer']}`, "
            f"{freeze['trainable_params']:,} trainable parameters, lr {freeze['learning_rate']:g}"
        ),
        f"- data version `{data_version}`",
        "- details: `model_card.md`, `evaluation/`, `stages/`, `validation/` (Artifacts tab)",
    ]
    if random_init:
        lines.insert(
            1,
            "\n> **Randomly initialised backbone (no ImageNet weights): a pipeline demonstration, not a useful "
            "classifier.**",
        )
    return "\n".join(lines)


@task(name="model-card", retries=2, retry_delay_seconds=5)
def model_card_task(
    cfg, run_id, version, data, validated, weights, stages, chosen, evaluation, decision, out_dir: Path
) -> Path:
    """Prefect shell: the model card, as a run artifact and the version's description (registry I/O: retried)."""
    return describe_version(
        cfg, run_id, version, data, validated, weights, stages, chosen, evaluation, decision, out_dir
    )
