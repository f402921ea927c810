"""`vggflow ui`: the MLflow tracking server (UI + REST API) over the project's store.

The server runs as a child process in its own session (process group), so that a Ctrl-C in the
terminal reaches only us; we then stop the *whole group* (the ``mlflow server`` launcher and its
uvicorn worker): SIGTERM, a grace period, SIGKILL for what is left. Nothing survives us.

Settings a small offline machine needs (measured, see the stack notes): one worker, MLflow's
background job runner off (otherwise it leaves orphan ``huey_consumer`` processes and start-up
takes ~75 s instead of ~20 s), telemetry off.

Nothing here imports MLflow: the server is a subprocess, and the REST calls use ``requests``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Self
from urllib.parse import quote, urlparse

from vggflow import mlflow_tags
from vggflow.errors import VggflowError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
#: Healthy after ~12-25 s on 2 idle cores; much longer when the cores are busy (e.g. a test run).
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
    """The tracking server could not be started (port taken, store unusable, crashed)."""


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


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port that is free on ``host`` right now (for tests and ``--port 0``)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound (something listens there, or is about to)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        # Same option uvicorn uses: a port in TIME_WAIT after a clean stop counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, from ``/proc`` (Linux)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # Fields after the parenthesised command: state, ppid, pgrp, ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


class DashboardServer:
    """An ``mlflow server`` child process group: start, wait until healthy, stop cleanly.

    Usable as a context manager (stops on exit, also on errors).
    """

    def __init__(self, spec: ServerSpec, log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.spec = spec
        self.log_path = Path(log_path)
        self.env = server_env(env)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def pgid(self) -> int | None:
        """The server's process group (= its pid, as a session leader), once started."""
        return self.process.pid if self.process else None

    def start(self) -> None:
        """Start the server in its own session; returns at once (see :meth:`wait_until_healthy`).

        Raises:
            DashboardError: the port is taken.
        """
        if self.process is not None:
            raise RuntimeError("the server was already started")
        if port_in_use(self.spec.host, self.spec.port):
            raise DashboardError(
                f"port {self.spec.port} on {self.spec.host} is already in use (another `vggflow ui` or "
                "MLflow server?); choose another with --port"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(server_command(self.spec))}\n".encode())
            log.flush()
            # The server logs every request: to a file, not over the user's terminal.
            self.process = subprocess.Popen(
                server_command(self.spec),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # own group: terminal signals reach only us, we stop the group
            )

    def healthy(self) -> bool:
        """Whether ``/health`` answers 200 now."""
        import requests

        try:
            return requests.get(f"{self.url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def wait_until_healthy(self, timeout: float = STARTUP_TIMEOUT_S, stop: threading.Event | None = None) -> bool:
        """Poll ``/health`` until it answers.

        Args:
            timeout: seconds to wait.
            stop: when set meanwhile (a signal), give up and return False.

        Returns:
            True when healthy, False when ``stop`` was set.

        Raises:
            DashboardError: the server exited, or did not answer within ``timeout``.
        """
        if self.process is None:
            raise RuntimeError("start() the server first")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stop is not None and stop.is_set():
                return False
            code = self.process.poll()
            if code is not None:
                raise DashboardError(f"the MLflow server exited with status {code} while starting:\n{self.log_tail()}")
            if self.healthy():
                return True
            (stop or threading.Event()).wait(0.5)
        raise DashboardError(
            f"the MLflow server did not answer {self.url}/health within {timeout:.0f} s; log: {self.log_path}\n"
            f"{self.log_tail()}"
        )

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``grace`` seconds. Idempotent.

        Returns:
            The launcher's exit status (None if it was never started).
        """
        if self.process is None:
            return None
        pgid = self.process.pid
        self._signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # Workers may outlive the launcher by a moment (or hang): wait for the group, then kill it.
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_members(pgid):
            self._signal_group(pgid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 5
            while group_members(pgid) and time.monotonic() < kill_deadline:
                time.sleep(0.05)
        return self.process.wait()

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:  # the group is already gone
            pass

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's log (for error messages)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                tail = deque(log, maxlen=lines)
        except OSError:
            return f"(no server log at {self.log_path})"
        return "".join("  | " + line for line in tail).rstrip("\n")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into ``stop`` (restoring the previous handlers afterwards)."""
    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


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
        DashboardError: the server could not start or died.
    """
    out = out or _say
    warning = exposure_warning(spec.host)
    if warning:
        out(warning)
    stop = threading.Event()
    server = DashboardServer(spec, log_path)
    with _stop_on_signals(stop):
        try:
            out(f"starting the MLflow UI over {spec.backend_uri} (artifacts: {spec.artifact_root}) …")
            server.start()
            if not server.wait_until_healthy(startup_timeout, stop):
                out("stopping (interrupted while starting)")
                return 0
            out(f"MLflow UI: {server.url}   (Ctrl-C to stop)")
            links = experiment_links(server.url, experiment_name) + [("server log", str(server.log_path))]
            width = max(len(label) for label, _ in links)
            for label, link in links:
                out(f"  {label:<{width}}  {link}")
            while not stop.wait(0.5):
                code = server.process.poll() if server.process else None
                if code is not None:
                    raise DashboardError(f"the MLflow server exited unexpectedly (status {code}):\n{server.log_tail()}")
            out("stopping the MLflow UI …")
        finally:
            server.stop()
    out("stopped")
    return 0
