"""Process-wide settings for a small, possibly offline machine.

Called once by the CLI (and by tests) *before* TensorFlow, Prefect or MLflow are imported; never
on import. Every value is a default: anything the user already set in the environment wins.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_DEFAULTS = {
    # TensorFlow: quiet start-up; oneDNN measured +12-20% on these CPUs (stack notes).
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "TF_ENABLE_ONEDNN_OPTS": "1",
    # Prefect: no telemetry, and a temporary server that may take ~30 s to start on 2 cores.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_API_REQUEST_TIMEOUT": "120",
    # MLflow: no telemetry, no background job runner in servers we start.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # DVC: no analytics or update checks even in a repo whose config forgot them.
    "DVC_NO_ANALYTICS": "1",
    "GIT_PYTHON_REFRESH": "quiet",
}


def configure_environment(project_dir: str | Path | None = None) -> None:
    """Set offline-friendly defaults for TF, Prefect, MLflow and DVC in ``os.environ``.

    Args:
        project_dir: where Prefect's task-result cache lives (``<project_dir>/.vggflow/prefect``),
            so scheduled and manual runs share it. Defaults to the current directory.
    """
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
    project = Path(project_dir or Path.cwd()).resolve()
    # One result store for manual runs, the scheduler and workers started from this project.
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(project / ".vggflow" / "prefect" / "results"))
