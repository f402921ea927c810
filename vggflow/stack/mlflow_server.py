"""The stack's MLflow tracking server: runs and the registry in PostgreSQL, artifacts in the bucket.

Artifacts are served through the server (``--serve-artifacts``, the default): experiments get
``mlflow-artifacts:/`` locations, so clients need only ``MLFLOW_TRACKING_URI``, no S3 keys.
The backend URI (it holds the database password) and the S3 keys reach the server through its
environment (``MLFLOW_BACKEND_STORE_URI``, ``MLFLOW_ARTIFACTS_DESTINATION``): a command line is
readable by every user of the machine.
"""

from __future__ import annotations

from vggflow.dashboard import server_env
from vggflow.processes import http_ok
from vggflow.stack import objectstore, postgres
from vggflow.stack.folder import Health, StackFolder, python_command, server_health


def url(folder: StackFolder) -> str:
    return f"http://{folder.address('mlflow')}"


def process(folder: StackFolder):
    """``mlflow server`` (not started): one worker, MLflow's job runner off, healthy when ``/health`` answers."""
    env = server_env(
        folder.base_env(
            objectstore.server_env(folder)
            | {
                "MLFLOW_BACKEND_STORE_URI": postgres.server_url(folder, "mlflow", "psycopg"),
                "MLFLOW_ARTIFACTS_DESTINATION": objectstore.url(folder, "mlflow"),
            }
        )
    )
    host, _, port = folder.address("mlflow").partition(":")
    command = python_command("-m", "mlflow", "server", "--host", host, "--port", port, "--workers", "1")
    return folder.process("mlflow", command, health=lambda: http_ok(f"{url(folder)}/health"), env=env)


def health(folder: StackFolder) -> Health:
    """Whether the server answers, and its version."""
    return server_health(f"{url(folder)}/health", f"{url(folder)}/version", "MLflow")
