"""Every MLflow tag key vggflow sets or reads, in one place.

Run tags, registered-version tags and the keys the MLflow UI's saved views show as columns all
come from here, so a key is spelt once and a search for it finds every user.
"""

from __future__ import annotations

# Runs and registered versions
DATA_VERSION = "vggflow.data_version"
DATA_MATCHES_DVC = "vggflow.data_matches_dvc"
DVC_FILE = "vggflow.dvc_file"  # the DVC file the data version comes from (as configured)
DVC_REMOTE = "vggflow.dvc_remote"  # "name url" of DVC's default remote when it trained
RANDOM_INIT = "vggflow.random_init"
FREEZE_CONFIGURATION = "vggflow.freeze_configuration"
GIT_COMMIT = "vggflow.git_commit"
GIT_DIRTY = "vggflow.git_dirty"
BACKBONE_WEIGHTS = "vggflow.backbone_weights"
RUN_ID = "vggflow.run_id"
VERSION = "vggflow.version"  # the installed vggflow package
CODE_VERSION = "vggflow.code_version"  # vggflow.caching.code_version of the training flow
CONFIG_FILE = "vggflow.config_file"  # --config as given (the effective config is an artifact)

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
# A rolled-back version: JSON of vggflow.registry.Rollback (why, by whom, when, its data version);
# removed when the version becomes @champion again (a second rollback, a manual promote).
ROLLBACK = "vggflow.rollback"

# The registered model
LAST_ROLLBACK = "vggflow.last_rollback"  # JSON of the latest vggflow.registry.Rollback
TEST_METRIC_PREFIX = "vggflow.test_"  # + accuracy, macro_f1


def test_metric(name: str) -> str:
    """The registered-version tag holding test metric ``name`` (``vggflow.test_accuracy``, …)."""
    return TEST_METRIC_PREFIX + name


# MLflow's own system tags that vggflow sets (the UI's User, Source and Version columns)
MLFLOW_USER = "mlflow.user"
MLFLOW_SOURCE_NAME = "mlflow.source.name"
MLFLOW_SOURCE_TYPE = "mlflow.source.type"
MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
MLFLOW_GIT_BRANCH = "mlflow.source.git.branch"
MLFLOW_GIT_REPO_URL = "mlflow.source.git.repoURL"
SYSTEM_TAGS = (
    MLFLOW_USER,
    MLFLOW_SOURCE_NAME,
    MLFLOW_SOURCE_TYPE,
    MLFLOW_GIT_COMMIT,
    MLFLOW_GIT_BRANCH,
    MLFLOW_GIT_REPO_URL,
)
MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
MLFLOW_NOTE = "mlflow.note.content"
