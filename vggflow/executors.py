"""Where the distributed steps run: a Dask cluster through Prefect's own ``prefect-dask``.

``features.executor: dask`` sends feature-extraction shards (and sweep trials) to Dask workers as
Prefect task runs: an existing cluster (``features.dask_address``), or a local cluster of
``features.dask_workers`` single-threaded worker processes started for the run and stopped with
it. Workers preload :mod:`vggflow.dask_worker`. Shards write their outputs to
``features.shard_store`` (an fsspec URL such as ``s3://bucket/prefix``), or to the cache folder.
"""

from __future__ import annotations

import os
import time
from typing import BinaryIO
from urllib.parse import urlparse

from vggflow.config import FeaturesConfig
from vggflow.errors import ServiceError


def dask_task_runner(cfg: FeaturesConfig):
    """A ``prefect_dask.DaskTaskRunner`` for the configured cluster (a flow's ``task_runner``)."""
    from prefect_dask import DaskTaskRunner

    if cfg.dask_address:
        return DaskTaskRunner(address=cfg.dask_address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": cfg.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
            "preload": ["vggflow.dask_worker"],
        },
    )


def filesystem(url: str):
    """``(fsspec filesystem, path)`` of a shard store URL or a local folder."""
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def open_written(url: str, attempts: int = 8, first_wait: float = 0.25) -> BinaryIO:
    """Open, for reading, an object a worker reported written (a shard's part).

    Some S3 servers answer 404 for a moment after an upload completed (``rclone serve s3`` while
    the new file settles in its VFS: rclone issue 8188), so a missing object is looked up again a
    few times, about 15 s in all, before it counts as missing.

    Raises:
        FileNotFoundError: the object is still missing after the last attempt.
    """
    import fsspec

    wait = first_wait
    for _ in range(attempts - 1):
        try:
            return fsspec.open(url, "rb").open()
        except FileNotFoundError:
            fs, path = filesystem(url)
            fs.invalidate_cache(path)  # s3fs remembers listings: ask the server again
            time.sleep(wait)
            wait = min(2 * wait, 4.0)
    return fsspec.open(url, "rb").open()  # the last attempt: a missing object raises


def store_name(url: str) -> str:
    """A store URL as messages show it (with the S3 endpoint, which the URL itself does not name)."""
    if urlparse(url).scheme == "s3":
        return (
            f"{url} (endpoint {os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL') or 'AWS'})"
        )
    return url


def check_executor(cfg: FeaturesConfig) -> None:
    """Before any work: the scheduler answers and the shard store accepts a write with these credentials.

    Raises:
        ServiceError: naming the scheduler or store, its address, and what it said (never a secret).
    """
    if cfg.executor != "dask":
        return
    if cfg.dask_address:
        from vggflow.stack.folder import tcp_open

        address = cfg.dask_address.split("://")[-1]
        if not tcp_open(address, timeout=5):
            raise ServiceError(
                f"the Dask scheduler at {cfg.dask_address} (features.dask_address) is not reachable: start the "
                "cluster (`vggflow stack up --dask N`), or unset features.dask_address to use a local cluster"
            )
    if cfg.shard_store:
        fs, root = filesystem(cfg.shard_store)
        probe = f"{root.rstrip('/')}/.vggflow-probe-{os.getpid()}"
        try:
            fs.pipe_file(probe, b"ok")
            fs.rm_file(probe)
        except Exception as err:  # botocore, s3fs and fsspec raise many types
            raise ServiceError(
                f"cannot write to the shard store {store_name(cfg.shard_store)} (features.shard_store): "
                f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}. Check that it runs "
                "(`vggflow stack status`) and the credentials (AWS_SHARED_CREDENTIALS_FILE)"
            ) from None
