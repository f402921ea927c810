"""`vggflow ui`: the MLflow tracking server (UI + REST API) over the project's store.

The server is a supervised process (:class:`vggflow.processes.SupervisedProcess`) in its own
process group, so that a Ctrl-C in the terminal reaches only us; we then stop the *whole group*
(the ``mlflow server`` launcher and its uvicorn worker): SIGTERM, a grace period, SIGKILL for
what is left. Nothing survives us.

Settings a small offline machine needs (see the stack notes): one worker, MLflow's background
job runner off (otherwise it leaves orphan ``huey_consumer`` processes and start-up takes several
times longer), telemetry off.

Nothing here imports MLflow: the server is a subprocess, and the REST calls use ``requests``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlparse

from vggflow import mlflow_tags
from vggflow.errors import VggflowError
from vggflow.ports import port_in_use
from vggflow.processes import SupervisedProcess, stop_on_signals

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
#: Generous: start-up takes several times longer when the cores are busy (e.g. a test run).
STARTUP_TIMEOUT_S = 180.0
#: Uvicorn finishes in-flight requests on SIGTERM; 10 s is plenty for a local UI.
STOP_GRACE_S = 10.0
#: Saved views of the experiment's runs (see :func:`compare_view_tags`; `tasks/track.py` saves them).
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
COMPARE_VIEW_ID = "vggflow-compare"
LEADERBOARD_VIEW_ID = "vggflow-leaderboard"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}

#: Forced for every server we start: the job runner is what leaves orphan processes.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
#: Defaults for the server (an explicit user setting wins).
SERVER_ENV_DEFAULTS = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


class DashboardError(VggflowError):
    """The tracking store cannot be served here (already a server, port taken, the server died)."""


@dataclass(frozen=True)
class ServerSpec:
    """What to serve, and where.

    Attributes:
        backend_uri: the tracking store (``sqlite:////abs/path.db``, ``postgresql://…``).
        artifact_root: folder for artifacts of experiments created through the server.
        host: interface to bind.
        port: TCP port.
    """

    backend_uri: str
    artifact_root: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT

    @property
    def url(self) -> str:
        """Where a browser on this machine reaches the server."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"  # bound to every interface: loopback works locally
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def spec_from_config(cfg, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> ServerSpec:
    """The server for a :class:`vggflow.config.Config`'s tracking section.

    A relative sqlite path is made absolute (the server must not depend on its cwd).

    Raises:
        DashboardError: the tracking URI is already a server (nothing to start).
        TrackingError: the store or artifact folder is unusable.
    """
    from vggflow.tracking import check_store, sqlite_path

    uri = cfg.tracking.effective_uri
    if urlparse(uri).scheme in ("http", "https"):
        raise DashboardError(
            f"the tracking URI is already a server ({uri}): open it in a browser instead, or unset "
            "MLFLOW_TRACKING_URI / tracking.uri to serve the local store."
        )
    check_store(cfg.tracking)  # creates the store folder, fails early (exit 3) when unwritable
    db = sqlite_path(uri)
    if db is not None:
        uri = f"sqlite:///{db.resolve()}"
    elif urlparse(uri).scheme == "" and uri:
        uri = Path(uri).resolve().as_uri()  # a bare folder is a file store
    return ServerSpec(uri, Path(cfg.tracking.artifact_root).resolve(), host, port)


def compare_view_tags(primary_metric: str, created_ms: int | None = None) -> dict[str, str]:
    """Experiment tags holding saved MLflow UI views for comparing training runs.

    MLflow's runs table shows only Dataset/Source/Models by default and keeps chosen columns in
    the browser; views saved as experiment tags (the UI's "Views" menu, or the URL
    ``#/experiments/<id>/runs?viewStateShareKey=<view id>``) give everyone the same columns: the
    test metrics (primary first), best validation accuracy, the freeze configuration, the data
    version and whether the backbone was random. Stage runs carry the same keys, so their rows
    fill the same columns. Two views (:data:`VIEWS`):

    - ``vggflow-compare``: every run newest first, stage runs nested under their run (the UI
      nests children only when runs are sorted by creation time);
    - ``vggflow-leaderboard``: training runs only, best primary metric first.

    Args:
        primary_metric: the registry's primary metric (``accuracy`` or ``macro_f1``).
        created_ms: the views' timestamp (ms; default now).

    Returns:
        ``{tag key: tag value}``.
    """
    import json

    def column(kind: str, name: str) -> str:
        return f"{kind}.`{name}`"  # the UI's canonical column key

    primary = f"test_{primary_metric}"
    metrics = [primary] + [f"test_{m}" for m in ("accuracy", "macro_f1") if f"test_{m}" != primary]
    ui_state = {
        # The UI replaces its whole state with a view's, so every field is given.
        "selectedColumns": [
            column("attributes", "Dataset"),
            *(column("metrics", m) for m in metrics),
            column("metrics", "best_val_accuracy"),
            column("tags", mlflow_tags.FREEZE_CONFIGURATION),
            column("params", "data_version"),
            column("tags", mlflow_tags.RANDOM_INIT),
            column("attributes", "Models"),
        ],
        "columnOrder": [],
        "columnWidths": {},
        "runsExpanded": {},
        "runsPinned": [],
        "runsHidden": [],
        "runsVisibilityMap": {},
        "runsHiddenMode": "FIRST_10_RUNS",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
        "autoRefreshEnabled": True,
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }
    facets = {"startTime": "ALL", "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": []}
    views = {
        COMPARE_VIEW_ID: (
            "vggflow: runs and stages",
            {"searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False},
        ),
        LEADERBOARD_VIEW_ID: (
            f"vggflow: leaderboard ({primary})",
            {
                "searchFilter": "tags.`vggflow.kind` = 'training'",
                "orderByKey": column("metrics", primary),
                "orderByAsc": False,
            },
        ),
    }
    created = int(time.time() * 1000) if created_ms is None else created_ms
    tags = {}
    for view_id, (name, order) in views.items():
        state = json.dumps({**facets, **order, **ui_state}, separators=(",", ":"))  # plain JSON: read uncompressed too
        tags[f"{VIEW_TAG_PREFIX}{view_id}"] = json.dumps(
            {"name": name, "createdAt": created, "state": state}, separators=(",", ":")
        )
    return tags


def server_command(spec: ServerSpec, python: str = sys.executable) -> list[str]:
    """The ``mlflow server`` command line (run with this interpreter, so the venv's MLflow)."""
    root = spec.artifact_root.as_uri()
    return [
        python, "-m", "mlflow", "server",
        "--backend-store-uri", spec.backend_uri,
        "--default-artifact-root", root,
        # Artifacts uploaded through the server land in the project's store, not ./mlartifacts.
        "--artifacts-destination", root,
        "--host", spec.host,
        "--port", str(spec.port),
        "--workers", "1",
    ]  # fmt: skip


def server_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``base`` (default: ours) plus the small-machine settings."""
    env = dict(os.environ if base is None else base)
    for name, value in SERVER_ENV_DEFAULTS.items():
        env.setdefault(name, value)
    env.update(SERVER_ENV)
    return env


def exposure_warning(host: str) -> str | None:
    """A warning when binding beyond loopback (MLflow's UI has no authentication), else None."""
    if host in LOCAL_HOSTS:
        return None
    return (
        f"WARNING: binding to {host}: MLflow's UI and REST API have no authentication, so anyone who can "
        "reach this port can read, change and delete runs and registered models. Use 127.0.0.1 and an SSH "
        "tunnel unless the network is trusted."
    )


def server_process(spec: ServerSpec, log_path: Path, env: Mapping[str, str] | None = None) -> SupervisedProcess:
    """The ``mlflow server`` as a supervised process group (not started), healthy when ``/health`` answers."""
    return SupervisedProcess(
        server_command(spec),
        name="the MLflow server",
        health=f"{spec.url}/health",
        log_path=log_path,
        env=server_env(env),
        grace=STOP_GRACE_S,
    )


def experiment_links(base_url: str, experiment_name: str) -> list[tuple[str, str]]:
    """Links worth printing: the experiment's comparison view and its latest training run.

    Best effort over the REST API: returns ``[]`` when the experiment does not exist yet.
    """
    import requests

    api = f"{base_url}/api/2.0/mlflow"
    try:
        response = requests.get(
            f"{api}/experiments/get-by-name", params={"experiment_name": experiment_name}, timeout=10
        )
        if response.status_code != 200:
            return []
        experiment = response.json()["experiment"]
        experiment_id = experiment["experiment_id"]
        saved = {tag.get("key") for tag in experiment.get("tags", [])}
        runs_url = f"{base_url}/#/experiments/{experiment_id}/runs"
        links = [(f"experiment {experiment_name!r}", runs_url)]
        for label, view_id in (("runs and stages", COMPARE_VIEW_ID), ("leaderboard", LEADERBOARD_VIEW_ID)):
            if f"{VIEW_TAG_PREFIX}{view_id}" in saved:
                links.append((label, f"{runs_url}?viewStateShareKey={quote(view_id)}"))
        runs = (
            requests.post(
                f"{api}/runs/search",
                json={
                    "experiment_ids": [experiment_id],
                    "filter": "tags.`vggflow.kind` = 'training'",
                    "order_by": ["attributes.start_time DESC"],
                    "max_results": 1,
                },
                timeout=10,
            )
            .json()
            .get("runs", [])
        )
        if runs:
            info = runs[0]["info"]
            link = f"{base_url}/#/experiments/{experiment_id}/runs/{info['run_id']}"
            links.append(("latest run", f"{link}   ({info.get('run_name', '')})"))
        return links
    except (requests.RequestException, KeyError, ValueError):
        return []


def _say(line: str) -> None:
    # Flushed: the URL must show up at once even when stdout is a pipe (a supervisor, a test).
    print(line, flush=True)


def _show_links(links: list[tuple[str, str]], out: Callable[[str], None]) -> None:
    width = max(len(label) for label, _ in links)
    for label, link in links:
        out(f"  {label:<{width}}  {link}")


def show_server(uri: str, experiment_name: str, out: Callable[[str], None] | None = None) -> int:
    """`vggflow ui` when the tracking URI is already a server (a shared stack): its links, nothing to start.

    The caller has checked that it answers (:func:`vggflow.tracking.check_store`).
    """
    out = out or _say
    url = uri.rstrip("/")
    out(f"MLflow UI: {url}   (served by the tracking server itself: nothing to start)")
    _show_links(experiment_links(url, experiment_name) or [("experiments", f"{url}/#/experiments")], out)
    return 0


def serve(
    spec: ServerSpec,
    log_path: Path,
    experiment_name: str,
    out: Callable[[str], None] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> int:
    """Run the dashboard in the foreground until Ctrl-C / SIGTERM; the `vggflow ui` command.

    Returns:
        0 after a requested stop.

    Raises:
        DashboardError: the port is taken, or the server died.
        ProcessError: the server exited while starting, or did not answer in time.
    """
    out = out or _say
    warning = exposure_warning(spec.host)
    if warning:
        out(warning)
    stop = threading.Event()
    server = server_process(spec, log_path)
    with stop_on_signals(stop):
        try:
            out(f"starting the MLflow UI over {spec.backend_uri} (artifacts: {spec.artifact_root}) …")
            if port_in_use(spec.host, spec.port):
                raise DashboardError(
                    f"port {spec.port} on {spec.host} is already in use (another `vggflow ui` or MLflow server?); "
                    "choose another with --port"
                )
            server.start()
            if not server.wait_until_healthy(startup_timeout, stop, every=0.5):
                out("stopping (interrupted while starting)")
                return 0
            out(f"MLflow UI: {spec.url}   (Ctrl-C to stop)")
            _show_links(experiment_links(spec.url, experiment_name) + [("server log", str(log_path))], out)
            while not stop.wait(0.5):
                code = server.poll()
                if code is not None:
                    raise DashboardError(f"the MLflow server exited unexpectedly (status {code}):\n{server.log_tail()}")
            out("stopping the MLflow UI …")
        finally:
            server.stop()
    out("stopped")
    return 0
