"""What a client of the stack needs: environment variables, and two credential files of mode 0600.

``vggflow stack env`` prints the variables for ``eval``; none of them is a secret. The database
password of the promotion lock is in a libpq password file (``PGPASSFILE``), the object store's
keys in an AWS shared-credentials file (``AWS_SHARED_CREDENTIALS_FILE``, read by boto3, s3fs and
so DVC); both files are in ``<stack>/client/``, readable by their owner only. The MLflow client
needs neither: artifacts go through the tracking server.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from vggflow.files import atomic_write_text
from vggflow.stack import dask_cluster, mlflow_server, objectstore, postgres, prefect_server
from vggflow.stack.folder import StackFolder

ENV_FILE = "client.env"


def files(folder: StackFolder) -> dict[str, Path]:
    base = folder.root / "client"
    return {"pgpass": base / "pgpass", "s3": base / "s3-credentials"}


def client_env(folder: StackFolder) -> dict[str, str]:
    """The variables pointing vggflow, MLflow, Prefect, DVC and boto3 at the stack (no secret among them)."""
    paths = files(folder)
    env = {
        "MLFLOW_TRACKING_URI": mlflow_server.url(folder),
        "PREFECT_API_URL": prefect_server.api_url(folder),
        "VGGFLOW__REGISTRY__LOCK_URL": postgres.lock_url(folder),
        "PGPASSFILE": str(paths["pgpass"]),
        "AWS_SHARED_CREDENTIALS_FILE": str(paths["s3"]),
        "AWS_ENDPOINT_URL_S3": objectstore.endpoint(folder),
        "AWS_DEFAULT_REGION": objectstore.REGION,
        # Used when features.executor is dask: shards write their arrays to the bucket.
        "VGGFLOW__FEATURES__SHARD_STORE": objectstore.url(folder, "shards"),
    }
    if folder.state.get("dask_workers"):
        env["VGGFLOW__FEATURES__DASK_ADDRESS"] = dask_cluster.address(folder)
    return env


def write_files(folder: StackFolder) -> Path:
    """Write the credential files (0600) and ``client.env``; returns the latter's path."""
    paths = files(folder)
    access, secret = objectstore.keys(folder)
    lock_password = folder.secrets["postgres_lock"]
    atomic_write_text(
        paths["pgpass"], f"127.0.0.1:*:{postgres.LOCK_DATABASE}:{postgres.LOCK_USER}:{lock_password}\n", private=True
    )
    atomic_write_text(
        paths["s3"], f"[default]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n", private=True
    )
    env_file = folder.root / ENV_FILE
    atomic_write_text(env_file, env_text(folder))
    return env_file


def env_text(folder: StackFolder) -> str:
    """``export NAME=value`` lines for ``eval "$(vggflow stack env)"``."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in client_env(folder).items())
