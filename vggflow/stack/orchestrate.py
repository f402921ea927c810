"""Bring the stack up, report its health, take it down: the order and the bookkeeping.

Up: PostgreSQL (created on first use), the object store, then MLflow's and Prefect's servers
side by side (each needs only the first two), the worker while the project's deployments are
deployed, and the Dask cluster when asked for. A service that does not come up stops the whole
start-up: everything already started is stopped again, and the error names the service, its
address and its log. Down: the reverse order, runs of the stopped worker closed as CRASHED,
then whatever still carries the stack's marker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vggflow.marked_processes import processes_marked, signal_processes
from vggflow.processes import ProcessError, SupervisedProcess, stop_process_group
from vggflow.stack import client, dask_cluster, mlflow_server, objectstore, postgres, prefect_server
from vggflow.stack.folder import MARKER, Health, StackError, StackFolder

#: Seconds a service gets between its stop signal and SIGKILL.
STOP_GRACE_S = 20.0
#: Stop order for ``down`` (the reverse of the start order).
STOP_ORDER = ("dask-worker", "dask-scheduler", "worker", "prefect", "mlflow", "s3", "postgres")

Say = Callable[[str], None]


def up(folder: StackFolder, project: Path | None, say: Say, stop: threading.Event | None = None) -> dict[str, str]:
    """Start every service not running yet; returns the client environment.

    Args:
        folder: the stack's folder.
        project: folder whose ``prefect.yaml`` is deployed (None: deploy nothing).
        say: progress lines.
        stop: set by a signal: stop starting (what started is stopped again).

    Raises:
        StackError: a service could not start (what was started is stopped again).
    """
    running = folder.running()
    if running:
        unhealthy = [name for name, health in status(folder).items() if not health.ok]
        if unhealthy:
            raise StackError(
                f"the stack in {folder.root} is partly running ({', '.join(unhealthy)} not healthy): "
                "run `vggflow stack down` first"
            )
        say(f"the stack in {folder.root} is already up")
        _deploy(folder, project, say)
        return client.client_env(folder)
    folder.state["services"] = {}
    folder.state["dask_workers"] = folder.cfg.dask_workers
    folder.stack_id  # noqa: B018  (created and saved with the state)
    folder.choose_ports(say)
    started = time.monotonic()
    try:
        _start_all(folder, project, say, stop or threading.Event())
    except BaseException:
        say("start-up failed: stopping what was started")
        down(folder, say=lambda line: None)
        raise
    folder.state["up_seconds"] = round(time.monotonic() - started, 1)
    folder.save()
    env_file = client.write_files(folder)
    say(f"stack up in {folder.state['up_seconds']:.0f} s; client settings: {env_file}")
    return client.client_env(folder)


def _start_all(folder: StackFolder, project: Path | None, say: Say, stop: threading.Event) -> None:
    timeout = folder.cfg.startup_timeout
    created = postgres.prepare(folder, say)
    _start(folder, "postgres", postgres.process(folder), timeout, say, stop)
    if created:
        postgres.bootstrap(folder)
    _start(folder, "s3", objectstore.process(folder), timeout, say, stop)
    objectstore.ensure_bucket(folder)
    # Both servers spend most of their start-up importing; they need only the two above.
    servers = {"mlflow": mlflow_server.process(folder), "prefect": prefect_server.process(folder)}
    for name, process in servers.items():
        _launch(folder, name, process, say)
    for name, process in servers.items():
        _wait(name, process, timeout, say, stop)
    env = client.client_env(folder)
    worker = prefect_server.worker_process(folder, env)
    _launch(folder, "worker", worker, say)
    _wait("worker", worker, timeout, say, stop)  # it creates the work pool the deployments name
    _deploy(folder, project, say)
    if folder.cfg.dask_workers:
        _start(folder, "dask-scheduler", dask_cluster.scheduler_process(folder), timeout, say, stop)
        for index in range(folder.cfg.dask_workers):
            _launch(folder, f"dask-worker-{index}", dask_cluster.worker_process(folder, index, env), say)
        deadline = time.monotonic() + timeout
        while not dask_cluster.health(folder).ok:
            if time.monotonic() > deadline or stop.is_set():
                raise StackError(f"dask: the workers did not connect to {dask_cluster.address(folder)} in time")
            time.sleep(0.5)
        say(f"dask: {dask_cluster.health(folder).detail} at {dask_cluster.address(folder)}")


def _deploy(folder: StackFolder, project: Path | None, say: Say) -> None:
    """Deploy ``project``'s ``prefect.yaml`` (again: it updates the deployments)."""
    if project is None:
        return
    if not (project / "prefect.yaml").is_file():
        say(f"prefect: no prefect.yaml in {project}: nothing deployed")
        return
    say(f"prefect: deploying {project / 'prefect.yaml'} …")
    prefect_server.deploy(folder, project, client.client_env(folder))
    say(f"prefect: deployments: {', '.join(prefect_server.deployments(folder)) or 'none'}")


def _launch(folder: StackFolder, name: str, process: SupervisedProcess, say: Say) -> None:
    process.start()
    folder.record(name, process)


def _wait(name: str, process: SupervisedProcess, timeout: float, say: Say, stop: threading.Event) -> None:
    started = time.monotonic()
    try:
        if not process.wait_until_healthy(timeout, stop, every=0.5):
            raise KeyboardInterrupt
    except ProcessError as err:
        raise StackError(str(err)) from None
    say(f"{name}: healthy after {time.monotonic() - started:.1f} s")


def _start(folder: StackFolder, name: str, process: SupervisedProcess, timeout: float, say: Say, stop) -> None:
    _launch(folder, name, process, say)
    _wait(name, process, timeout, say, stop)


def status(folder: StackFolder) -> dict[str, Health]:
    """Each service's health (checked concurrently), in start order."""
    if not folder.exists or "postgres_app" not in folder.secrets:
        return {name: Health(False, f"no stack in {folder.root}") for name in ("postgres", "s3", "mlflow", "prefect")}
    checks = {
        "postgres": postgres.health,
        "s3": objectstore.health,
        "mlflow": mlflow_server.health,
        "prefect": prefect_server.health,
        "worker": prefect_server.worker_health,
    }
    if folder.state.get("dask_workers"):
        checks["dask"] = dask_cluster.health
    with ThreadPoolExecutor(len(checks)) as pool:
        futures = {name: pool.submit(check, folder) for name, check in checks.items()}
        return {name: future.result() for name, future in futures.items()}


def down(folder: StackFolder, say: Say) -> list[int]:
    """Stop every service of the stack, then any process still carrying its marker.

    Returns:
        The pids of leftover processes that had to be killed by marker.
    """
    services = dict(folder.services)
    active = prefect_server.active_runs(folder) if "worker" in services else []
    for prefix in STOP_ORDER:
        for name in [n for n in services if n == prefix or n.startswith(prefix + "-")]:
            info = services[name]
            started = time.monotonic()
            killed = stop_process_group(info["pgid"], STOP_GRACE_S, info.get("stop_signal", 15))
            say(f"{name}: stopped in {time.monotonic() - started:.1f} s" + (" (killed)" if killed else ""))
            folder.forget(name)
            if name == "worker" and active:
                prefect_server.mark_crashed(folder, active)
                say(f"prefect: {len(active)} run(s) of the stopped worker marked CRASHED")
    leftovers = processes_marked(MARKER, folder.state.get("id", ""))
    if leftovers:
        signal_processes(leftovers)
        say(f"killed {len(leftovers)} leftover process(es) of the stack: {leftovers}")
    return leftovers
