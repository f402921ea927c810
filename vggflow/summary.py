"""What a training run produced, as `vggflow train` prints it and the retraining flow returns it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from vggflow.promotion import Decision, RegisteredVersion
from vggflow.runs import TrainingRun
from vggflow.scoring import Evaluation
from vggflow.training import StageResult, TrainedStages

if TYPE_CHECKING:
    from vggflow.model import ResolvedWeights
    from vggflow.validation import ValidatedData

#: The test metrics the summary shows.
SUMMARY_METRICS = ("accuracy", "macro_f1", "weighted_f1")


class TrainingSummary(BaseModel):
    """What a training run produced: the run, the data, every stage, the choice, the test metrics, the gate."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    data_version: str
    data_matches_dvc: bool | None
    freeze_configuration: dict[str, Any]
    stages: list[dict[str, Any]]  # StageResult.summary() rows, the chosen one marked
    skipped_stages: list[str]
    test_metrics: dict[str, float]
    model_name: str
    model_version: str
    model_uri: str
    decision: Decision
    random_init: bool
    weights_note: str
    validation_summary: str
    report_dir: str


def run_link(summary: TrainingSummary) -> str:
    """Where to see the run: the tracking server itself, or `vggflow ui` over a local store."""
    route = f"#/experiments/{summary.experiment_id}/runs/{summary.run_id}"
    if summary.tracking_uri.startswith(("http://", "https://")):
        return f"{summary.tracking_uri.rstrip('/')}/{route}"
    return f"vggflow ui, then http://127.0.0.1:5000/{route}"


def summarize(
    run: TrainingRun,
    validated: ValidatedData,
    weights: ResolvedWeights,
    stages: TrainedStages,
    chosen: StageResult,
    evaluation: Evaluation,
    version: RegisteredVersion,
    decision: Decision,
) -> TrainingSummary:
    """The summary of a finished training run."""
    return TrainingSummary(
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        tracking_uri=run.tracking_uri,
        data_version=validated.data_version.md5,
        data_matches_dvc=validated.data_version.matches,
        freeze_configuration=chosen.freeze_configuration(),
        stages=stages.table(chosen),
        skipped_stages=stages.skipped,
        test_metrics={name: evaluation.metrics[name] for name in SUMMARY_METRICS},
        model_name=version.name,
        model_version=version.version,
        model_uri=version.model_uri,
        decision=decision,
        random_init=weights.random_init,
        weights_note=weights.note,
        validation_summary=validated.summary,
        report_dir=str(run.report_dir),
    )
