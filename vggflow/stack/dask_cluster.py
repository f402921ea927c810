"""The stack's Dask cluster: a scheduler and ``stack.dask_workers`` single-threaded workers.

Each ``dask worker`` (a nanny and its worker process) is a service of its own process group;
each preloads :mod:`vggflow.dask_worker` and has what shards and sweep trials need: the object
store's endpoint and keys (shards are written there) and the tracking server's address.
The scheduler re-runs the task of a worker that dies (up to
``distributed.scheduler.allowed-failures`` times), and a nanny restarts its killed worker.
"""

from __future__ import annotations

from collections.abc import Mapping

from vggflow.stack import objectstore
from vggflow.stack.folder import Health, StackFolder, python_command, tcp_open


def address(folder: StackFolder) -> str:
    return f"tcp://{folder.address('dask')}"


def scheduler_process(folder: StackFolder):
    """``dask scheduler`` (not started), healthy once its port accepts connections."""
    host, _, port = folder.address("dask").partition(":")
    command = python_command(
        "-m", "distributed.cli.dask_scheduler", "--host", host, "--port", port, "--no-dashboard"
    )  # fmt: skip
    return folder.process(
        "dask-scheduler", command, health=lambda: tcp_open(folder.address("dask")), env=folder.base_env()
    )


def worker_process(folder: StackFolder, index: int, client_env: Mapping[str, str]):
    """Worker ``index`` (not started): one thread, vggflow's preload; healthy once started."""
    host = folder.address("dask").partition(":")[0]
    command = python_command(
        "-m", "distributed.cli.dask_worker", address(folder), "--host", host, "--nworkers", "1", "--nthreads", "1",
        "--name", f"stack-w{index}", "--no-dashboard", "--local-directory", str(folder.root / "dask" / f"w{index}"),
        "--death-timeout", "60", "--preload", "vggflow.dask_worker",
    )  # fmt: skip
    # The store's endpoint and keys (shards write there); the caller's settings win (another store).
    env = folder.base_env({**objectstore.server_env(folder), **client_env})
    return folder.process(f"dask-worker-{index}", command, health=None, env=env)


def workers(folder: StackFolder) -> int:
    """How many workers the scheduler has now (0 when it cannot be asked)."""
    from distributed import Client

    try:
        with Client(address(folder), timeout=5) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"])
    except (OSError, TimeoutError):
        return 0


def health(folder: StackFolder) -> Health:
    """Whether the scheduler answers with every started worker connected."""
    if not tcp_open(folder.address("dask")):
        return Health(False, "scheduler not listening")
    wanted = folder.state.get("dask_workers", 0)
    connected = workers(folder)
    return Health(connected >= wanted, f"{connected} of {wanted} worker(s) connected")
