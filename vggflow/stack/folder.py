"""The stack's folder: its state (ports, processes), its generated credentials, its logs.

``state.json`` records which port each service got and which process group runs it, so that
``down`` and ``status`` (other processes) find them. ``secrets.json`` (mode 0600) holds the
generated passwords and keys; nothing else in the folder contains a secret, except the
client files of mode 0600 in ``client/`` (:mod:`vggflow.stack.client`).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vggflow.config import StackConfig
from vggflow.errors import ServiceError
from vggflow.files import atomic_write_text
from vggflow.ports import port_in_use
from vggflow.processes import SupervisedProcess, group_members
from vggflow.runtime import OFFLINE_DEFAULTS

HOST = "127.0.0.1"
#: Every process the stack starts carries this variable (value: the stack's id), and so do their
#: descendants: ``down`` finds what left its service's process group by it.
MARKER = "VGGFLOW_STACK_ID"
#: Settings of the caller's environment that must not leak into the servers (another stack's
#: or store's addresses and keys).
FOREIGN_PREFIXES = ("AWS_", "MLFLOW_", "PREFECT_", "VGGFLOW__", "PG", "RCLONE_")
#: Ports tried after a service's first choice before giving up.
PORT_ATTEMPTS = 50


class StackError(ServiceError):
    """A stack service cannot be started, reached or used; the message names it and its address."""


def scripts_dir() -> Path:
    """The folder of this environment's console scripts (``rclone``, ``prefect``, ``dask``)."""
    return Path(sysconfig.get_path("scripts"))


@dataclass
class Health:
    """A service's health: whether it answers, and what it said (version, workers, the problem)."""

    ok: bool
    detail: str


class StackFolder:
    """The stack's folder, its recorded state and credentials.

    Args:
        cfg: the ``stack`` config section (folder, first-choice ports, bucket, pool, Dask workers).
    """

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.dir).resolve()
        self.state_file = self.root / "state.json"
        self.secrets_file = self.root / "secrets.json"
        self.logs = self.root / "logs"
        self.state: dict = _read_json(self.state_file)
        self.secrets: dict = _read_json(self.secrets_file)

    # ------------------------------------------------------------------ state and credentials

    @property
    def exists(self) -> bool:
        return self.state_file.is_file()

    @property
    def ports(self) -> dict[str, int]:
        return self.state.setdefault("ports", {})

    @property
    def services(self) -> dict[str, dict]:
        """Service name → ``{"pgid": …, "started": …}`` for what runs now."""
        return self.state.setdefault("services", {})

    @property
    def stack_id(self) -> str:
        return self.state.setdefault("id", secrets.token_hex(8))

    def address(self, service: str) -> str:
        return f"{HOST}:{self.ports.get(service, self.cfg.ports.get(service, '?'))}"

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.state_file, json.dumps(self.state, indent=1))

    def secret(self, name: str, make: Callable[[], str]) -> str:
        """The generated secret ``name``, created (and saved, mode 0600) on first use."""
        if name not in self.secrets:
            self.secrets[name] = make()
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.secrets_file, json.dumps(self.secrets, indent=1), private=True)
        return self.secrets[name]

    def running(self) -> list[str]:
        """The recorded services whose process group still has a live member."""
        return [name for name, info in self.services.items() if group_members(info["pgid"])]

    def choose_ports(self, say: Callable[[str], None]) -> None:
        """Each service's port: the one recorded (or configured), else the next free one."""
        taken: set[int] = set()
        for service, configured in self.cfg.ports.items():
            wanted = self.ports.get(service, configured)
            port = next(
                (p for p in range(wanted, wanted + PORT_ATTEMPTS) if p not in taken and not port_in_use(HOST, p)), None
            )
            if port is None:
                raise StackError(
                    f"{service}: no free port in {HOST}:{wanted}-{wanted + PORT_ATTEMPTS - 1}; "
                    f"choose another first port with --set stack.ports.{service}=PORT"
                )
            if port != wanted:
                say(f"{service}: port {wanted} is taken on {HOST}, using {port}")
            self.ports[service] = port
            taken.add(port)
        self.save()

    # ------------------------------------------------------------------ processes

    def base_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A server's environment: ours without foreign service settings, the offline defaults, the marker."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_PREFIXES)}
        env.update(OFFLINE_DEFAULTS)
        env["PATH"] = f"{scripts_dir()}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        env[MARKER] = self.stack_id
        env.update(extra or {})
        return env

    def process(
        self,
        name: str,
        command: Sequence[str],
        health: Callable[[], bool],
        env: Mapping[str, str],
        **options,
    ) -> SupervisedProcess:
        """A service process (not started): its own group, its log in ``logs/``, outliving this command."""
        return SupervisedProcess(
            command,
            name=f"the stack's {name} ({self.address(name.split('-')[0])})",
            health=health,
            log_path=self.logs / f"{name}.log",
            env=env,
            cwd=self.root,
            die_with_parent=False,
            **options,
        )

    def record(self, name: str, process: SupervisedProcess) -> None:
        """Remember a started service's process group (for ``down`` and ``status``)."""
        self.services[name] = {"pgid": process.pid, "stop_signal": int(process.stop_signal)}
        self.save()

    def forget(self, name: str) -> None:
        self.services.pop(name, None)
        self.save()


def server_health(health_url: str, version_url: str, product: str) -> Health:
    """A web server's health: ``health_url`` answers 200, and its version from ``version_url``."""
    import requests

    from vggflow.processes import http_ok

    try:
        response = requests.get(version_url, timeout=3)
        response.raise_for_status()
    except requests.RequestException as err:
        return Health(False, type(err).__name__)
    return Health(http_ok(health_url), f"{product} {response.text.strip().strip(chr(34))}")


def tcp_open(address: str, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout).close()
    except (OSError, ValueError):
        return False
    return True


def python_command(*args: str) -> list[str]:
    """Run a module of this environment's Python (its MLflow, Prefect, Dask)."""
    return [sys.executable, *args]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
