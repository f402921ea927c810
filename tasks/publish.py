"""Last step: the run's summary as Prefect artifacts, shown with the flow run in the Prefect UI.

A markdown artifact (the stage table, the chosen freeze configuration, the test metrics, the
promotion decision, where the MLflow run is) and a table artifact of the stages. Keyed by the
registered model's name, so the UI's Artifacts page keeps one history per model. They last as
long as the Prefect server does: a persistent one (``PREFECT_API_URL``, `vggflow schedule`)
keeps them; the temporary server a single `vggflow train` starts ends with the command.
"""

from __future__ import annotations

import re

from prefect import task

from vggflow.summary import TrainingSummary, run_link


def artifact_key(model_name: str, what: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for ``what`` of ``model_name``."""
    return re.sub(r"[^a-z0-9-]+", "-", f"{model_name}-{what}".lower()).strip("-")


def stage_rows(summary: TrainingSummary) -> list[dict]:
    """One row per stage, trained or skipped, for the table artifact."""
    rows = [
        {
            "stage": stage["stage"],
            "chosen": "yes" if stage["chosen"] else "",
            "val_accuracy": round(stage["best_val_accuracy"], 4),
            "val_loss": round(stage["best_val_loss"], 4),
            "epochs": stage["epochs_run"],
            "trainable_params": stage.get("trainable_params"),
            "learning_rate": stage.get("learning_rate"),
        }
        for stage in summary.stages
    ]
    skipped = {"chosen": "skipped: the previous stage did not improve"}
    return rows + [{"stage": name, **skipped} for name in summary.skipped_stages]


def summary_markdown(summary: TrainingSummary) -> str:
    """The markdown artifact: what the run chose, how well it does, what the gate decided, where to look."""
    freeze = summary.freeze_configuration
    outcome = "promoted to @champion" if summary.decision.promoted else "not promoted"
    lines = [f"# {summary.model_name} v{summary.model_version}: {outcome}", ""]
    if summary.random_init:
        lines += [f"**Randomly initialised backbone**: a pipeline demonstration. {summary.weights_note}", ""]
    lines += ["| stage | chosen | val_accuracy | val_loss | epochs |", "|---|---|---|---|---|"]
    for row in stage_rows(summary):
        numbers = [f"{row[k]:.4f}" if "val_accuracy" in row else "-" for k in ("val_accuracy", "val_loss")]
        lines.append(f"| {row['stage']} | {row['chosen']} | {' | '.join(numbers)} | {row.get('epochs', '-')} |")
    lines += [
        "",
        f"**Chosen freeze configuration**: `{freeze['stage']}`, from `{freeze['first_trainable_layer']}`, "
        f"{freeze['trainable_layers']} trainable layers, {freeze['trainable_params']:,} parameters, "
        f"learning rate {freeze['learning_rate']:g}",
        "",
        "**Test metrics**: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.test_metrics.items()),
        "",
        f"**Promotion**: {outcome}: {summary.decision.reason}",
        "",
        f"**Data version**: `{summary.data_version}` (matches the DVC file: {summary.data_matches_dvc})",
        "",
        f"**MLflow run**: `{summary.run_id}` ({summary.tracking_uri}, experiment {summary.experiment_id}): "
        f"{_as_link(run_link(summary))}",
        "",
        f"**Model**: `models:/{summary.model_name}/{summary.model_version}` "
        f"(`vggflow lineage {summary.model_version}` tells where it came from)",
    ]
    return "\n".join(lines)


def _as_link(where: str) -> str:
    url = next((word for word in where.split() if word.startswith("http")), None)
    return where.replace(url, f"[{url}]({url})") if url else where


@task(name="publish-artifacts")
def publish_artifacts_task(summary: TrainingSummary) -> None:
    """Publish the summary and the stage table as Prefect artifacts of this flow run."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(
        table=stage_rows(summary),
        key=artifact_key(summary.model_name, "stages"),
        description=f"Stages of the run that trained {summary.model_name} v{summary.model_version}",
    )
    create_markdown_artifact(
        markdown=summary_markdown(summary),
        key=artifact_key(summary.model_name, "training"),
        description=f"{summary.model_name} v{summary.model_version}: choice, test metrics, promotion",
    )


@task(name="publish-retrain-decision")
def publish_retrain_decision_task(model_name: str, reason: str) -> None:
    """A skipped retraining's reason as a markdown artifact (a training publishes its own summary)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=f"# {model_name}: retraining {reason}",
        key=artifact_key(model_name, "retrain"),
        description="Why this scheduled retraining did not train",
    )
