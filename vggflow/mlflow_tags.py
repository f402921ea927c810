"""Every MLflow tag key vggflow sets or reads, in one place.

Run tags, registered-version tags and the keys the MLflow UI's saved views show as columns all
come from here, so a key is spelt once and a search for it finds every user.
"""

from __future__ import annotations

# Runs and registered versions
DATA_VERSION = "vggflow.data_version"
DATA_MATCHES_DVC = "vggflow.data_matches_dvc"
RANDOM_INIT = "vggflow.random_init"
FREEZE_CONFIGURATION = "vggflow.freeze_configuration"
GIT_COMMIT = "vggflow.git_commit"
GIT_DIRTY = "vggflow.git_dirty"
BACKBONE_WEIGHTS = "vggflow.backbone_weights"
RUN_ID = "vggflow.run_id"

# Runs
KIND = "vggflow.kind"  # "training" (a flow run's parent run), "trial" (a sweep configuration) or "stage"
STAGE = "vggflow.stage"
TRIAL = "vggflow.trial"  # a sweep configuration's index
PREFECT_FLOW_RUN_ID = "vggflow.prefect_flow_run_id"
REUSED_FROM_RUN = "vggflow.reused_from_run"
TEST_SCORED_FROM = "vggflow.test_scored_from"
PROMOTION_REASON = "vggflow.promotion_reason"
CLOSED_BY = "vggflow.closed_by"
# Which process owns a RUNNING run, so a later run can tell an abandoned run from a live one.
HOST = "vggflow.host"
PID = "vggflow.pid"
PID_STARTED = "vggflow.pid_started"

# Registered versions
PROMOTION = "vggflow.promotion"  # promoted | rejected | manual | rolled back
REJECTION_REASON = "vggflow.rejection_reason"
MANUAL_PROMOTION_REASON = "vggflow.manual_promotion_reason"
TEST_METRIC_PREFIX = "vggflow.test_"  # + accuracy, macro_f1


def test_metric(name: str) -> str:
    """The registered-version tag holding test metric ``name`` (``vggflow.test_accuracy``, …)."""
    return TEST_METRIC_PREFIX + name


# MLflow's own system tags that vggflow sets
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
MLFLOW_NOTE = "mlflow.note.content"
