"""Step 7: the champion/challenger promotion gate, with MLflow registry aliases.

Like TFX's Evaluator "blessing": a candidate passes when it meets absolute thresholds and beats
the current ``@champion`` by at least ``min_delta`` on the primary metric, the champion being
re-evaluated on the candidate's own test split (its old logged number is not comparable when
the data changed). Pass: ``champion`` moves to the candidate, the old champion becomes
``previous``. Fail: the candidate becomes ``challenger`` with the reason as a tag.

MLflow's own evaluation API computes the gate's metrics (``mlflow.models.evaluate`` on both
models' predictions for the same test rows) and checks the rule (``MetricThreshold``s,
``mlflow.validate_evaluation_results``); see ``vggflow/scoring.py`` and ``vggflow/promotion.py``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from prefect import task

from vggflow import mlflow_tags
from vggflow.config import Config, RegistryConfig
from vggflow.files import read_rows
from vggflow.promotion import Decision, RegisteredVersion, decide
from vggflow.registry import CHALLENGER, CHAMPION, PREVIOUS, current_champion, promotion_lock
from vggflow.runs import TrainingRun
from vggflow.scoring import Evaluation, evaluate_registered, mlflow_evaluation, registered_scores_file, scores_dir
from vggflow.tracking import lock_dir

if TYPE_CHECKING:
    from vggflow.validation import ValidatedData


def apply_decision(client, decision: Decision) -> None:
    """Move aliases (pass) or mark the challenger (fail) and tag the version with the decision."""
    name, version = decision.model_name, decision.candidate_version
    if decision.promoted:
        if decision.champion_version and decision.champion_version != version:
            client.set_registered_model_alias(name, PREVIOUS, decision.champion_version)
        client.set_registered_model_alias(name, CHAMPION, version)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
        client.set_model_version_tag(name, version, mlflow_tags.REJECTION_REASON, decision.reason)
    client.set_model_version_tag(name, version, mlflow_tags.PROMOTION, "promoted" if decision.promoted else "rejected")


def log_decision(client, run_id: str, decision: Decision) -> None:
    """Log the decision to the training run: params, metrics and ``promotion/decision.json``."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    metrics = [Metric("promotion_candidate_value", decision.candidate_value, now, 0)]
    if decision.champion_value is not None:
        metrics.append(Metric("promotion_champion_value", decision.champion_value, now, 0))
        metrics.append(Metric("promotion_delta", float(decision.delta), now, 0))
    params = [
        Param("promotion.promoted", str(decision.promoted)),
        Param("promotion.champion_version", decision.champion_version or "none"),
        Param("promotion.registered_version", decision.candidate_version),
    ]
    client.log_batch(run_id, metrics=metrics, params=params)
    client.set_tag(run_id, mlflow_tags.PROMOTION_REASON, decision.reason)
    client.log_dict(run_id, json.loads(decision.model_dump_json()), "promotion/decision.json")


def champion_run(client, training_run_id: str, champion_version: str) -> str:
    """A nested run of the training run that holds the champion's evaluation on the candidate's test split."""
    parent = client.get_run(training_run_id)
    tags = {
        mlflow_tags.MLFLOW_PARENT_RUN_ID: training_run_id,
        mlflow_tags.KIND: "gate",
        **{key: value for key, value in parent.data.tags.items() if key in mlflow_tags.SYSTEM_TAGS},
    }
    name = f"gate-champion-v{champion_version}"
    return client.create_run(parent.info.experiment_id, run_name=name, tags=tags).info.run_id


def promote_if_better(
    client,
    cfg: RegistryConfig,
    candidate_version: str,
    candidate_predictions: list[str],
    run_id: str,
    test_rows: pd.DataFrame,
    data_dir: Path,
    class_names: list[str],
    batch_size: int,
    scores_dir: Path | None = None,
) -> Decision:
    """Re-evaluate the current champion on the candidate's test rows, decide, apply and log.

    Both models' predictions on the same test rows are evaluated by MLflow's evaluation API
    (``vggflow.scoring.mlflow_evaluation``): the candidate's into its training run, the
    champion's into a nested ``gate-champion-v<N>`` run, so the MLflow UI compares them side by
    side. The champion is loaded by version number (not by alias), so what was evaluated is what
    the decision names even if the alias moves meanwhile; callers hold :func:`promotion_lock`.
    With ``scores_dir`` (this data version's, see :func:`vggflow.scoring.scores_file`), the
    champion's predictions are kept and reused by the next candidate on the same data (a
    registered version never changes).
    """
    labels = list(test_rows["label"])
    candidate_metrics = mlflow_evaluation(run_id, labels, candidate_predictions, class_names, leave_running=True)
    champion = current_champion(client, cfg.model_name)
    champion_version = str(champion.version) if champion is not None else None
    champion_metrics = None
    if champion_version is not None and champion_version != str(candidate_version):
        # The version's identity: its number alone could be reused by a re-created registry.
        identity = (
            f"registered-{cfg.model_name}-{champion_version}-{champion.run_id}-{champion.source}"
            f"-{champion.creation_timestamp}"
        )
        champion_predictions = evaluate_registered(
            f"models:/{cfg.model_name}/{champion_version}",
            test_rows,
            data_dir,
            class_names,
            batch_size,
            registered_scores_file(scores_dir, identity, test_rows, class_names, batch_size),
        )
        gate_run = champion_run(client, run_id, champion_version)
        champion_metrics = mlflow_evaluation(gate_run, labels, champion_predictions, class_names)
    decision = decide(
        candidate_metrics, champion_metrics, cfg, str(candidate_version), champion_version if champion_metrics else None
    )
    if cfg.promote:
        apply_decision(client, decision)
        decision = decision.model_copy(update={"aliases_changed": True})
    else:
        verdict = "promoted" if decision.promoted else "rejected"
        decision = decision.model_copy(
            update={
                "reason": f"--no-promote: aliases untouched (the gate would have {verdict}: {decision.reason})",
                "promoted": False,
            }
        )
    log_decision(client, run_id, decision)
    return decision


@task(name="promote-if-better", retries=2, retry_delay_seconds=5)
def promote_if_better_task(
    cfg: Config, run: TrainingRun, version: RegisteredVersion, evaluation: Evaluation, validated: ValidatedData
) -> Decision:
    """The gate, under the promotion lock (registry I/O: retried)."""
    from mlflow.tracking import MlflowClient

    rows = read_rows(validated.rows_file)
    test_rows = rows[rows["split"] == "test"]
    # The evaluation step's predictions, in the test rows' order.
    predicted = list(pd.read_csv(evaluation.files["predictions"], dtype=str, keep_default_na=False)["predicted"])
    with promotion_lock(lock_dir(cfg.tracking, cfg.work_dir), cfg.registry.lock_url, cfg.registry.model_name):
        decision = promote_if_better(
            MlflowClient(),
            cfg.registry,
            version.version,
            predicted,
            run.run_id,
            test_rows,
            cfg.data.dir,
            validated.class_names,
            cfg.evaluate.batch_size,
            scores_dir(cfg.work_dir, validated.fingerprint),
        )
    print(("PROMOTED: " if decision.promoted else "not promoted: ") + decision.reason)
    return decision
