"""`vggflow schedule`: serve the retraining deployment from this machine with Prefect.

The deployment (``vggflow-retrain/<schedule.deployment_name>``) runs ``flows/retrain.py`` on a cron
schedule; a Prefect runner in this process polls the server and starts each run in a child
process that inherits this process's environment and working directory — so scheduled runs use
the same config, MLflow store and task-result cache (``PREFECT_LOCAL_STORAGE_PATH``) as manual
``vggflow retrain`` runs from the same project folder.

With no ``PREFECT_API_URL`` configured, a local server is started (bound to 127.0.0.1, stopped
with the scheduler); a server already answering on that port is re-used and left running.

Stopping (SIGTERM or Ctrl-C): the runner cancels a run in progress and pauses the deployment's
schedule (nobody would execute its runs), then every process this command started is stopped —
the runs' leftovers first, then the local server. See docs/scheduling.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vggflow.errors import ConfigError, VggflowError
from vggflow.ports import port_in_use
from vggflow.processes import SupervisedProcess, become_subreaper, http_ok, stop_descendants

if TYPE_CHECKING:
    from vggflow.config import ScheduleConfig

FLOW_NAME = "vggflow-retrain"  # the @flow name in flows/retrain.py (importing it to read it costs seconds)
LOCAL_HOST = "127.0.0.1"  # the Prefect UI and API have no authentication: never bind wider by default
DEFAULT_PORT = 4200
#: Seconds a stopped process gets between SIGTERM and SIGKILL.
STOP_TIMEOUT = 15.0


class _Terminated(BaseException):
    """SIGTERM before the runner installed its own handler (e.g. while the server starts)."""


@dataclass
class LocalServer:
    """A Prefect server this command starts (or found running: no ``process``, ``owned=False``)."""

    api_url: str
    process: SupervisedProcess | None = None

    @property
    def owned(self) -> bool:
        return self.process is not None


def cmd_schedule(args: argparse.Namespace) -> int:
    return serve_retraining(args.config, list(args.overrides), cron=args.cron, timezone=args.timezone)


def resolve_schedule(cfg: ScheduleConfig, cron: str | None, timezone: str | None) -> tuple[str, str]:
    """The cron expression and timezone to serve (options over config), validated.

    Raises:
        ConfigError: naming the invalid value.
    """
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    cron, timezone = cron or cfg.cron, timezone or cfg.timezone
    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as err:
        messages = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise ConfigError(f"invalid schedule (--cron {cron!r} --timezone {timezone!r}): {messages}") from None
    return cron, timezone


def deployment_parameters(config_file: str | None, overrides: list[str]) -> dict:
    """Default parameters of the deployment: this command's config, made absolute."""
    return {
        "config_file": str(Path(config_file).resolve()) if config_file else None,
        "overrides": list(overrides),
        "force": False,
    }


def ui_url(api_url: str) -> str:
    """The UI address of a Prefect API URL (``…/api`` → ``…``)."""
    return api_url.rstrip("/").removesuffix("/api")


def serving_message(
    deployment: str,
    cron: str,
    timezone: str,
    api_url: str,
    deployment_id: str,
    server: LocalServer | None,
    results: str,
) -> str:
    """What is being served, how to run it now, where to watch it, how to stop it."""
    quoted = f"'{deployment}'"
    lines = [
        "",
        "=" * 72,
        f"vggflow schedule: serving {quoted} from this machine",
        "=" * 72,
        f"schedule          {cron} ({timezone})",
        f"project           {Path.cwd()}  (runs start here, with this environment)",
        f"task cache        {results}  (shared with `vggflow retrain` from this folder)",
        f"prefect server    {api_url}",
    ]
    if server is not None and server.owned:
        lines.append(
            f"                  started by vggflow on {LOCAL_HOST}, stops with it (log: {server.process.log_path})"
        )
    elif server is not None:
        lines.append("                  already running on this machine (left running on exit)")
    lines += [
        "run it now        " + f"PREFECT_API_URL={api_url} .venv/bin/prefect deployment run {quoted}",
        f"watch it          {ui_url(api_url)}/deployments/deployment/{deployment_id}",
        f"                  PREFECT_API_URL={api_url} .venv/bin/prefect flow-run ls --flow-name {FLOW_NAME}",
        "stop              Ctrl-C or SIGTERM (pauses the schedule; serving again resumes it)",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- processes


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment or the active Prefect profile."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def server_healthy(api_url: str, timeout: float = 5.0) -> bool:
    """Whether a Prefect API answers ``/health`` at ``api_url``."""
    return http_ok(api_url.rstrip("/") + "/health", timeout)


def local_server(port: int, log_file: Path) -> LocalServer:
    """The Prefect server on 127.0.0.1:``port``: one already answering there, or one to start.

    Raises:
        VggflowError: something else holds the port.
    """
    api_url = f"http://{LOCAL_HOST}:{port}/api"
    if server_healthy(api_url, timeout=2):
        return LocalServer(api_url)
    if port_in_use(LOCAL_HOST, port):
        raise VggflowError(
            f"port {port} on {LOCAL_HOST} is in use by something that is not a Prefect server; set "
            "PREFECT_SERVER_API_PORT to use another"
        )
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", LOCAL_HOST, "--port", str(port)]
    # In its own process group, a Ctrl-C in the terminal does not stop the server before the
    # runner has paused its schedule through it; we stop it ourselves, last.
    process = SupervisedProcess(
        command,
        name="the Prefect server",
        health=f"{api_url}/health",
        log_path=log_file,
        grace=STOP_TIMEOUT,
        exit_hint=f" (port {port} in use? set PREFECT_SERVER_API_PORT to use another)",
        timeout_hint="; raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or start one yourself "
        "(docs/scheduling.md)",
    )
    return LocalServer(api_url, process)


def _server_port() -> int:
    """The local server's port: ``PREFECT_SERVER_API_PORT``, as Prefect's own server reads it.

    Raises:
        ConfigError: the variable is not a number.
    """
    value = os.environ.get("PREFECT_SERVER_API_PORT", str(DEFAULT_PORT))
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"PREFECT_SERVER_API_PORT: not a port number: {value!r}") from None


def _watch_server(server: LocalServer, stopping: threading.Event, died: threading.Event) -> None:
    """Stop the scheduler (as a SIGTERM would) when the server it started exits on its own."""
    assert server.process is not None
    server.process.wait()
    if not stopping.is_set():
        died.set()
        print(
            f"vggflow schedule: the Prefect server exited ({server.process.returncode}); stopping",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------- serving


def _serve(name: str, cron: str, timezone: str, parameters: dict, api_url: str, server: LocalServer | None) -> None:
    """Register the deployment and run the Prefect runner until SIGTERM/Ctrl-C."""
    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner
    from prefect.schedules import Cron
    from prefect.settings import get_current_settings

    from vggflow.flows.retrain import retrain_flow

    # limit=1: one retraining at a time on this machine; pause_on_shutdown: while nobody serves
    # the deployment, its scheduled runs would only pile up as "Late".
    runner = Runner(name=f"vggflow-{name}", limit=1, pause_on_shutdown=True)
    deployment_id = runner.add_flow(
        retrain_flow,
        name=name,
        schedule=Cron(cron, timezone=timezone),
        parameters=parameters,
        description="Retrain the VGG19 classifier when the DVC data version changed (vggflow).",
        tags=["vggflow"],
    )
    results = str(get_current_settings().results.local_storage_path)
    print(
        serving_message(f"{FLOW_NAME}/{name}", cron, timezone, api_url, str(deployment_id), server, results), flush=True
    )
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal, SystemExit):
        # SystemExit: a SIGTERM while the runner was still starting exits at once, before the
        # runner paused the schedule; make sure it is paused.
        _ensure_paused(deployment_id)


def _ensure_paused(deployment_id) -> None:
    """Pause the deployment's schedule if the runner did not (best effort)."""
    from prefect.client.orchestration import get_client

    with suppress(Exception), get_client(sync_client=True) as client:
        if not client.read_deployment(deployment_id).paused:
            client.pause_deployment(deployment_id)


def serve_retraining(
    config_file: str | None, overrides: list[str], cron: str | None = None, timezone: str | None = None
) -> int:
    """`vggflow schedule`: serve the retraining deployment until stopped; returns the exit status.

    Args:
        config_file: config of the scheduled runs (also the schedule's defaults, ``schedule.*``).
        overrides: ``--set`` overrides, passed to every scheduled run.
        cron: cron expression (default ``schedule.cron``).
        timezone: IANA timezone of the cron expression (default ``schedule.timezone``).

    Raises:
        VggflowError: bad config/schedule, unreachable server, server start-up failure.
    """
    from vggflow.config import load_config
    from vggflow.warmup import startup_timeout

    cfg = load_config(config_file, overrides)
    cron, timezone = resolve_schedule(cfg.schedule, cron, timezone)
    parameters = deployment_parameters(config_file, overrides)
    become_subreaper()

    def terminated(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    server: LocalServer | None = None
    stopping, server_died = threading.Event(), threading.Event()
    try:
        api_url = configured_api_url()
        if api_url is None:
            port, timeout, log_file = _server_port(), startup_timeout(), cfg.work_dir / "prefect" / "server.log"
            server = local_server(port, log_file)
            api_url = server.api_url
            if server.owned:
                print(
                    f"vggflow schedule: starting a local Prefect server on {LOCAL_HOST}:{port} (log: {log_file}) …",
                    flush=True,
                )
                server.process.start().wait_until_healthy(timeout)
                threading.Thread(target=_watch_server, args=(server, stopping, server_died), daemon=True).start()
        elif not server_healthy(api_url):
            raise VggflowError(
                f"no Prefect server answers at PREFECT_API_URL={api_url}. Start one "
                f"(`.venv/bin/prefect server start --host {LOCAL_HOST}`), or unset PREFECT_API_URL and "
                "`vggflow schedule` starts a local one (docs/scheduling.md)."
            )
        from prefect.settings import PREFECT_API_URL, temporary_settings

        os.environ["PREFECT_API_URL"] = api_url  # for the run processes, whatever their start method
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            _serve(cfg.schedule.deployment_name, cron, timezone, parameters, api_url, server)
    except (_Terminated, KeyboardInterrupt):
        pass
    except Exception:
        if not server_died.is_set():  # the runner fails to pause its schedule without a server
            raise
    finally:
        # Bounded clean-up that a second signal must not cut short (it would orphan the server).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        stopping.set()
        try:
            process = server.process if server is not None else None
            started = process is not None and process.pid is not None
            stop_descendants(exclude={process.pid} if started else set(), timeout=STOP_TIMEOUT)
            if started:
                if process.poll() is None:
                    print("vggflow schedule: stopping the local Prefect server", flush=True)
                process.stop()
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, old_int)
    if server_died.is_set():
        raise VggflowError(f"the local Prefect server stopped unexpectedly (log: {server.process.log_path})")
    print("vggflow schedule: stopped", flush=True)
    return 0
