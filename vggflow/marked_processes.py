"""Processes found by a marker in their environment, wherever they went.

A service's descendants can leave its process group (a Prefect worker starts each flow run in a
group of its own) or be orphaned; a ``NAME=value`` variable in the environment, inherited by
every descendant, still finds them (``vggflow stack down``: :data:`vggflow.stack.folder.MARKER`).
Linux only (``/proc``); elsewhere nothing is found.
"""

from __future__ import annotations

import os
import signal
from contextlib import suppress
from pathlib import Path


def processes_marked(name: str, value: str) -> list[int]:
    """Live processes (ours to read) whose environment holds ``name=value``, except this one."""
    if not value or not os.path.isdir("/proc"):
        return []
    needle, found = f"{name}={value}".encode(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environment = Path(entry.path, "environ").read_bytes().split(b"\0")
            state = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if needle in environment and state[state.rfind(")") + 2 :][:1] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def signal_processes(pids: list[int], sig: signal.Signals = signal.SIGKILL) -> None:
    """Send ``sig`` to each of ``pids`` that still exists."""
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, sig)
