"""Overlap the fixed start-up costs of `vggflow train`.

A cold run on a 2-core machine would otherwise pay, one after the other: ~10 s importing
TensorFlow, ~6-9 s creating a new sqlite tracking store (MLflow's migrations) and ~6 s starting
Prefect's temporary server (~3 s of which is importing the server's modules into *this*
process). They do not depend on each other, and Python threads cannot import in parallel (the
GIL), so the two that can leave this process do:

- the store is created by a short-lived subprocess (``python -m vggflow.warmup``) holding the
  lock that :func:`vggflow.tracking.connect` waits on;
- Prefect's temporary server is launched here as a subprocess exactly as Prefect launches it
  (uvicorn + ``prefect.server.api.server:create_app``), bound to 127.0.0.1, and this process
  points ``PREFECT_API_URL`` at it. It dies with this process, even on ``kill -9``
  (``PR_SET_PDEATHSIG``), so no server is ever left behind.

Meanwhile the main thread imports TensorFlow.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vggflow.config import TrackingConfig
from vggflow.dashboard import free_port


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


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the parent dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


class LocalPrefectServer:
    """Prefect's temporary API server, owned by this process."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        prefect_root = Path(importlib.util.find_spec("prefect").origin).parent  # without importing it
        env = os.environ | {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect_root.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        atexit.register(self.stop)

    def wait_ready(self, timeout: float) -> None:
        """Block until the server answers ``/health``; raises RuntimeError after ``timeout`` s."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect's temporary server exited with status {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.25)
        raise RuntimeError(f"Prefect's temporary server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_local_prefect_server() -> LocalPrefectServer | None:
    """Start a temporary Prefect server unless ``PREFECT_API_URL`` is set; point this process at it.

    Must run before Prefect is imported (Prefect reads its settings at import).
    """
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    server = LocalPrefectServer()
    os.environ["PREFECT_API_URL"] = server.url
    return server


def _create_store(tracking_json: str) -> None:
    from vggflow.runtime import configure_environment
    from vggflow.tracking import connect

    configure_environment()
    connect(TrackingConfig.model_validate_json(tracking_json))


if __name__ == "__main__":
    _create_store(sys.argv[1])
