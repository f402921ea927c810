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
from vggflow.runs import mlflow_client
from vggflow.scoring import Evaluation
from vggflow.summary import TrainingSummary

if TYPE_CHECKING:
    from vggflow.reports.model_card import ModelCardInfo
    from vggflow.validation import ValidatedData

#: MLflow's SQL stores keep at most this many characters of a version's description
#: (``model_versions.description`` is VARCHAR(5000); PostgreSQL enforces it, sqlite does not).
DESCRIPTION_LIMIT = 5000

#: The test metrics the card shows.
CARD_METRICS = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall")


def card_info(cfg: Config, summary: TrainingSummary, validated: ValidatedData, evaluation: Evaluation) -> ModelCardInfo:
    """Everything the card shows, gathered from the run's summary, its data and its evaluation."""
    from vggflow.reports.model_card import ModelCardInfo
    from vggflow.tracking import git_info

    commit, dirty = git_info()
    rows = read_rows(validated.rows_file)
    decision = summary.decision
    return ModelCardInfo(
        model_name=summary.model_name,
        version=summary.model_version,
        run_id=summary.run_id,
        created=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        data_version=summary.data_version,
        data_matches_dvc=summary.data_matches_dvc,
        class_counts={label: group["split"].value_counts().to_dict() for label, group in rows.groupby("label")},
        image_size=cfg.backbone.image_size,
        backbone_weights=cfg.backbone.weights,
        random_init=summary.random_init,
        freeze_configuration=summary.freeze_configuration,
        stages=summary.stages,
        test_metrics={name: evaluation.metrics[name] for name in CARD_METRICS},
        per_class=pd.read_csv(evaluation.files["per_class_csv"], dtype={"class": str}, keep_default_na=False),
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


def run_note(summary: TrainingSummary, evaluation: Evaluation) -> str:
    """A few lines of Markdown on top of the run page: outcome first, details in the artifacts."""
    freeze, decision = summary.freeze_configuration, summary.decision
    primary = decision.primary_metric
    others = ", ".join(f"{k} {evaluation.metrics[k]:.4f}" for k in ("accuracy", "macro_f1") if k != primary)
    outcome = "promoted to `@champion`" if decision.promoted else "not promoted"
    lines = [
        f"**{summary.model_name} v{summary.model_version}: {outcome}** ({decision.reason})",
        "",
        f"- test {primary} **{evaluation.metrics[primary]:.4f}** (primary), {others}; {evaluation.n_test} test images",
        (
            f"- freeze configuration **{freeze['stage']}**: first trainable layer `{freeze['first_trainable_layer']}`, "
            f"{freeze['trainable_params']:,} trainable parameters, lr {freeze['learning_rate']:g}"
        ),
        f"- data version `{summary.data_version}`",
        "- details: `model_card.md`, `evaluation/`, `stages/`, `validation/` (Artifacts tab)",
    ]
    if summary.random_init:
        lines.insert(
            1,
            "\n> **Randomly initialised backbone (no ImageNet weights): a pipeline demonstration, not a useful "
            "classifier.**",
        )
    return "\n".join(lines)


def version_description(card: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The card as a version's description: whole when it fits, else cut at a section, pointing at the whole card."""
    if len(card) <= limit:
        return card
    note = "\n\n*(Shortened: the whole card is the run's artifact `model_card.md`.)*\n"
    head = card[: limit - len(note)]
    cut = head.rfind("\n## ")
    return (head[:cut] if cut > 0 else head).rstrip() + note


@task(name="model-card", retries=2, retry_delay_seconds=5)
def model_card_task(cfg: Config, summary: TrainingSummary, validated: ValidatedData, evaluation: Evaluation) -> Path:
    """Write the card, log it to the run and make it the version's description (registry I/O: retried)."""
    from vggflow.reports.model_card import render_model_card

    card = render_model_card(card_info(cfg, summary, validated, evaluation))
    path = atomic_write_text(Path(summary.report_dir) / "model_card.md", card)
    client = mlflow_client()
    client.log_artifact(summary.run_id, str(path))
    client.update_model_version(summary.model_name, summary.model_version, description=version_description(card))
    client.set_tag(summary.run_id, mlflow_tags.MLFLOW_NOTE, run_note(summary, evaluation))  # the run's Description
    return path
