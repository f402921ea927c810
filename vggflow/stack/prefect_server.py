"""The stack's Prefect server (on PostgreSQL), its process work pool, a worker, and the deployments.

The worker creates the pool when it is missing and runs each flow run as a subprocess in a
process group of its own, with the worker's environment: the stack gives it what a client of
the stack needs (:func:`vggflow.stack.client.client_env`). The project's ``prefect.yaml`` is
deployed with ``prefect deploy`` from the project folder (its ``{{ $PWD }}`` reads the ``PWD``
variable, set to that folder).

A worker stopped while a run executes kills the run's process but leaves the run ``RUNNING``
for ever (PrefectHQ/prefect#16746): :func:`mark_crashed` closes such runs after ``down``
stopped the worker.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from vggflow.processes import http_ok
from vggflow.stack import postgres
from vggflow.stack.folder import Health, StackError, StackFolder, python_command, server_health

WORKER_NAME = "stack-worker"
ACTIVE_STATES = ["RUNNING", "PENDING", "CANCELLING"]


def api_url(folder: StackFolder) -> str:
    return f"http://{folder.address('prefect')}/api"


def home(folder: StackFolder) -> Path:
    return folder.root / "prefect"


def process(folder: StackFolder):
    """``prefect server start`` (not started), healthy when ``/api/health`` answers."""
    host, _, port = folder.address("prefect").partition(":")
    env = folder.base_env(
        {
            "PREFECT_HOME": str(home(folder)),
            "PREFECT_API_DATABASE_CONNECTION_URL": postgres.server_url(folder, "prefect", "asyncpg"),
            "PREFECT_SERVER_API_HOST": host,
            "PREFECT_SERVER_API_PORT": port,
            "PREFECT_UI_API_URL": api_url(folder),
        }
    )
    command = python_command("-m", "prefect", "server", "start", "--host", host, "--port", port, "--analytics-off")
    return folder.process("prefect", command, health=lambda: http_ok(f"{api_url(folder)}/health"), env=env)


def worker_process(folder: StackFolder, client_env: Mapping[str, str]):
    """``prefect worker start`` on the stack's process pool (not started), healthy once it is ONLINE."""
    env = folder.base_env({**client_env, "PREFECT_HOME": str(home(folder) / "worker")})
    command = python_command(
        "-m", "prefect", "worker", "start", "--pool", folder.cfg.work_pool, "--type", "process",
        "--name", WORKER_NAME, "--limit", "1",
    )  # fmt: skip
    return folder.process("worker", command, health=lambda: worker_health(folder).ok, env=env)


def health(folder: StackFolder) -> Health:
    """Whether the server answers, and its version."""
    return server_health(f"{api_url(folder)}/health", f"{api_url(folder)}/admin/version", "Prefect")


def worker_health(folder: StackFolder) -> Health:
    """Whether the server sees the stack's worker ONLINE in its pool."""
    import requests

    try:
        response = requests.post(
            f"{api_url(folder)}/work_pools/{folder.cfg.work_pool}/workers/filter", json={}, timeout=3
        )
        response.raise_for_status()
        online = [w for w in response.json() if w.get("name") == WORKER_NAME and w.get("status") == "ONLINE"]
    except (requests.RequestException, ValueError) as err:
        return Health(False, type(err).__name__)
    return Health(bool(online), f"pool {folder.cfg.work_pool}: {WORKER_NAME} {'ONLINE' if online else 'offline'}")


def deploy(folder: StackFolder, project: Path, client_env: Mapping[str, str]) -> None:
    """``prefect deploy --all`` of ``project``'s ``prefect.yaml`` to the stack (output in ``logs/deploy.log``).

    Raises:
        StackError: the deploy failed (its output quoted).
    """
    env = folder.base_env({**client_env, "PWD": str(project), "PREFECT_HOME": str(home(folder) / "deploy")})
    done = subprocess.run(
        python_command("-m", "prefect", "--no-prompt", "deploy", "--all"),
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    output = done.stdout + done.stderr
    with open(folder.logs / "deploy.log", "a") as log:
        log.write(output)
    if done.returncode != 0:
        raise StackError(f"prefect: `prefect deploy --all` in {project} failed:\n{output.strip()[-1500:]}")


def deployments(folder: StackFolder) -> list[str]:
    """The names of the deployments the server knows (best effort)."""
    import requests

    try:
        response = requests.post(f"{api_url(folder)}/deployments/filter", json={}, timeout=5)
        return sorted(d["name"] for d in response.json())
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return []


def active_runs(folder: StackFolder) -> list[str]:
    """Ids of the pool's flow runs that are running or about to (best effort: [] when the server is down)."""
    import requests

    try:
        response = requests.post(
            f"{api_url(folder)}/flow_runs/filter",
            json={
                "work_pools": {"name": {"any_": [folder.cfg.work_pool]}},
                "flow_runs": {"state": {"type": {"any_": ACTIVE_STATES}}},
            },
            timeout=5,
        )
        return [run["id"] for run in response.json()]
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return []


def mark_crashed(folder: StackFolder, run_ids: list[str]) -> None:
    """Set runs whose worker was stopped under them to CRASHED (best effort)."""
    import requests

    for run_id in run_ids:
        try:
            requests.post(
                f"{api_url(folder)}/flow_runs/{run_id}/set_state",
                json={
                    "state": {"type": "CRASHED", "name": "Crashed", "message": "its worker was stopped (stack down)"},
                    "force": True,
                },
                timeout=5,
            )
        except requests.RequestException:
            pass
