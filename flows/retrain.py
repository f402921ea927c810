"""The retraining flow: sync the DVC data version → compare with the champion's → train only if new.

Wiring only: the steps are in ``tasks/sync_data.py`` and ``flows/train.py``. This is the flow the
scheduled deployment runs (``vggflow schedule``, ``prefect.yaml``) and ``vggflow retrain`` runs by
hand; both share Prefect's task-result cache, so a training it starts re-uses cached validation,
features and stages.
"""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger
from pydantic import BaseModel

from vggflow.config import load_config
from vggflow.tasks.publish import publish_retrain_decision_task
from vggflow.tasks.sync_data import (
    DataState,
    RetrainDecision,
    decide_retrain,
    pull_data_task,
    read_data_version_task,
    registry_state_task,
)


class RetrainOutcome(BaseModel):
    """What a retraining run did: skipped (and why) or the training summary."""

    skipped: bool
    reason: str
    data: DataState
    decision: RetrainDecision
    training: dict | None = None  # vggflow.summary.TrainingSummary as JSON


@flow(name="vggflow-retrain", log_prints=True)
def retrain_flow(
    config_file: str | None = None, overrides: list[str] | None = None, force: bool = False
) -> RetrainOutcome:
    """Retrain when the DVC data version differs from the champion's (or when forced).

    Args:
        config_file: YAML config (None: built-in defaults).
        overrides: ``section.key=value`` overrides, as ``--set``.
        force: train even when the champion was trained on the current data version.
    """
    cfg = load_config(config_file, overrides or [])
    data = read_data_version_task(cfg.data)
    if not data.matches:
        data = pull_data_task(data)
    registry = registry_state_task(cfg.tracking, cfg.registry.model_name)
    decision = decide_retrain(data.version, registry, force)
    get_run_logger().info(decision.reason)
    if not decision.retrain:
        publish_retrain_decision_task(cfg.registry.model_name, decision.reason)
        return RetrainOutcome(skipped=True, reason=decision.reason, data=data, decision=decision)

    # Imported only when training: the training flow's modules cost seconds to import, and a
    # skipped run should not pay for them. TensorFlow first, without its start-up noise.
    from vggflow.runtime import import_tensorflow_quietly

    import_tensorflow_quietly()
    from vggflow.flows.train import train_flow

    summary = train_flow(config_file=config_file, overrides=overrides)
    return RetrainOutcome(
        skipped=False, reason=decision.reason, data=data, decision=decision, training=summary.model_dump(mode="json")
    )
