"""Overlap the fixed start-up costs of `vggflow train`.

A cold run would otherwise pay, one after the other, for importing TensorFlow, creating a new
sqlite tracking store (MLflow's migrations) and starting Prefect's temporary server (partly
spent importing the server's modules into *this* process); BENCHMARKS.md, benchmark 4, has the
numbers. They do not depend on each other, and Python threads cannot import in parallel (the
GIL), so the two that can leave this process do:

- the store is created by a short-lived subprocess (``python -m vggflow.warmup``) holding the
  lock that :func:`vggflow.tracking.connect` waits on;
- Prefect's temporary server is launched here as a supervised process
  (:class:`vggflow.processes.SupervisedProcess`) exactly as Prefect launches it (uvicorn +
  ``prefect.server.api.server:create_app``), bound to 127.0.0.1, and this process points
  ``PREFECT_API_URL`` at it. In its own process group, a Ctrl-C reaches the flow alone, which
  can still report its final state to the server; the server stops when this process exits
  and dies with it even on ``kill -9``, so no server is ever left behind.

Meanwhile the main thread imports TensorFlow.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from vggflow.config import TrackingConfig
from vggflow.errors import ConfigError, ServiceError
from vggflow.ports import free_port
from vggflow.processes import SupervisedProcess, http_ok


def start_store_creation(tracking: TrackingConfig) -> subprocess.Popen | None:
    """Create a missing sqlite store in a subprocess; None when there is nothing to create."""
    from vggflow.tracking import sqlite_path

    db = sqlite_path(tracking.effective_uri)
    if db is None or db.exists():
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "vggflow.warmup", tracking.model_dump_json()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def prefect_server_command(port: int) -> list[str]:
    """Prefect's temporary server as Prefect itself launches it, bound to 127.0.0.1:``port``."""
    prefect_root = Path(importlib.util.find_spec("prefect").origin).parent  # without importing it
    return [
        sys.executable, "-m", "uvicorn",
        "--app-dir", str(prefect_root.parent),
        "--factory", "prefect.server.api.server:create_app",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--log-level", "error",
        "--lifespan", "on",
    ]  # fmt: skip


def start_local_prefect_server() -> SupervisedProcess | None:
    """Start a temporary Prefect server unless ``PREFECT_API_URL`` is set; point this process at it.

    Must run before Prefect is imported (Prefect reads its settings at import). The server stops
    when this process exits (``atexit``), or dies with it; wait for it with :func:`wait_until_ready`.
    """
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    server = SupervisedProcess(
        prefect_server_command(port), name="Prefect's temporary server", health=f"{url}/health", env=env
    ).start()
    atexit.register(server.stop)
    os.environ["PREFECT_API_URL"] = url
    # No "View at <url>" line for each flow run: this server serves no UI and stops with the command.
    os.environ["PREFECT_UI_URL"] = ""
    return server


def wait_until_ready(server: SupervisedProcess | None) -> None:
    """Wait for a server from :func:`start_local_prefect_server`; None: check the configured one answers.

    The limit is Prefect's own start-up setting, ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``.

    Raises:
        ProcessError: it exited or did not answer in time.
        ServiceError: ``PREFECT_API_URL`` is set and nothing answers there (before any work starts).
    """
    if server is not None:
        server.wait_until_healthy(startup_timeout())
        return
    url = os.environ.get("PREFECT_API_URL")
    if url and not http_ok(url.rstrip("/") + "/health", timeout=10):
        raise ServiceError(
            f"the Prefect server at PREFECT_API_URL={url} is not reachable. Start it (`vggflow stack up` for the "
            "shared stack, `vggflow stack status` to check it), or unset PREFECT_API_URL to use a temporary local one."
        )


def startup_timeout() -> float:
    """Seconds to wait for a Prefect server to start: ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``.

    Raises:
        ConfigError: the variable is not a number.
    """
    value = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: not a number: {value!r}") from None


def _create_store(tracking_json: str) -> None:
    from vggflow.runtime import configure_environment
    from vggflow.tracking import connect

    configure_environment()
    connect(TrackingConfig.model_validate_json(tracking_json))


if __name__ == "__main__":
    _create_store(sys.argv[1])
