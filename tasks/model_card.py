"""The model card: what a registered version is, how it was made and how well it does.

Rendered from a template (``vggflow/reports/``), logged to the run as ``model_card.md`` and set as
the registered version's description; a short note on top of the run page points at it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from prefect import task

from vggflow import mlflow_tags
from vggflow.config import Config
from vggflow.files import atomic_write_text, read_rows
from vggflow.promotion import Decision, RegisteredVersion
from vggflow.runs import TrainingRun, mlflow_client
from vggflow.scoring import Evaluation
from vggflow.tracking import DataVersion
from vggflow.training import StageResult, TrainedStages

if TYPE_CHECKING:
    from vggflow.model import ResolvedWeights
    from vggflow.validation import ValidatedData


def describe_version(
    cfg: Config,
    run_id: str,
    version: RegisteredVersion,
    data: DataVersion,
    validated: ValidatedData,
    weights: ResolvedWeights,
    stages: TrainedStages,
    chosen: StageResult,
    evaluation: Evaluation,
    decision: Decision,
    out_dir: Path,
) -> Path:
    """Write the model card, log it to the run and set it as the version's description."""
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
            stages=stages.table(chosen),
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
    client = mlflow_client()
    client.log_artifact(run_id, str(path))
    client.update_model_version(version.name, version.version, description=card)
    note = run_note(version, chosen, evaluation, decision, data.md5, weights.random_init)
    client.set_tag(run_id, mlflow_tags.MLFLOW_NOTE, note)  # the run page's Description
    return path


def run_note(
    version: RegisteredVersion,
    chosen: StageResult,
    evaluation: Evaluation,
    decision: Decision,
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
    cfg: Config,
    run: TrainingRun,
    version: RegisteredVersion,
    validated: ValidatedData,
    weights: ResolvedWeights,
    stages: TrainedStages,
    chosen: StageResult,
    evaluation: Evaluation,
    decision: Decision,
) -> Path:
    """The model card, as a run artifact and the version's description (registry I/O: retried)."""
    return describe_version(
        cfg,
        run.run_id,
        version,
        validated.data_version,
        validated,
        weights,
        stages,
        chosen,
        evaluation,
        decision,
        run.report_dir,
    )
