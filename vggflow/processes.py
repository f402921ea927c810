"""Supervised server processes: start, wait until healthy, stop — one way for every server we own.

A :class:`SupervisedProcess` runs a command in its own session (process group): a Ctrl-C in the
terminal then reaches only us, and we choose the order in which things stop. Its output goes to
a log file. On Linux it also receives SIGTERM when we die without cleaning up, even on
``kill -9`` (``PR_SET_PDEATHSIG``). Starting waits until a health check passes (an HTTP URL
answering 200, or any callable) or the process exits; a start-up error quotes the log's tail.
Stopping signals the whole group (the launcher and any workers it forked): SIGTERM, a grace
period, then SIGKILL for whatever is left.

A service that must outlive the command starting it (``vggflow stack up``) is started with
``die_with_parent=False``; another process stops it later by its group id
(:func:`stop_process_group`). A server that refuses to run as root (PostgreSQL) is started as
another system user (``user=``), and one whose clean stop is another signal (PostgreSQL's fast
shutdown is SIGINT) says so with ``stop_signal=``.

Also here, for commands that supervise several processes: stopping every remaining descendant
of this process, becoming a subreaper (so that descendants orphaned
by a killed child can still be found), and turning SIGINT/SIGTERM/SIGHUP into an event. Finding
processes by an environment marker (what a group stop cannot reach): :mod:`vggflow.marked_processes`;
free and busy TCP ports: :mod:`vggflow.ports`.

Nothing here imports a heavy library: the HTTP check uses ``urllib``, and psutil is imported by
:func:`stop_descendants` alone.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Self

from vggflow.errors import VggflowError

#: Seconds between SIGTERM and SIGKILL when a process group is stopped.
STOP_GRACE_S = 10.0
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


class ProcessError(VggflowError):
    """A supervised process could not start, or exited while starting."""


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether ``url`` answers HTTP 200 now."""
    import http.client
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # refused, reset, timed out, an error status, a bad answer
        return False


class SupervisedProcess:
    """A server process this program owns: its own process group, a log file, a health check.

    Start it from a thread that lives as long as the process (the main thread): Linux delivers
    the die-with-parent signal when the *thread* that started the child exits. Usable as a
    context manager (stops on exit, also on errors).

    Args:
        command: the program and its arguments.
        name: what it is, for messages ("the MLflow server").
        health: an HTTP URL that answers 200 once it is ready, or a callable returning True then;
            None: ready as soon as it runs.
        log_path: file that receives stdout and stderr (appended to, with a header line per
            start). None: stdout is discarded and stderr stays ours.
        env: its environment (default: ours).
        cwd: its working directory (default: ours).
        grace: seconds between SIGTERM and SIGKILL in :meth:`stop`.
        exit_hint: appended to the error when it exits while starting (what to check).
        timeout_hint: appended to the error when it is not healthy in time (what to try).
        die_with_parent: (Linux) receive SIGTERM when the starting thread dies; False for a
            service that outlives the command starting it.
        user: run as this system user (its uid, gid, no supplementary groups); needs root.
        stop_signal: what :meth:`stop` sends first (SIGKILL follows after ``grace``).
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        name: str,
        health: str | Callable[[], bool] | None = None,
        log_path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        grace: float = STOP_GRACE_S,
        exit_hint: str = "",
        timeout_hint: str = "",
        die_with_parent: bool = True,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.command = [str(part) for part in command]
        self.name = name
        self.health = health
        self.log_path = Path(log_path) if log_path is not None else None
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.grace = grace
        self.exit_hint = exit_hint
        self.timeout_hint = timeout_hint
        self.die_with_parent = die_with_parent
        self.user = user
        self.stop_signal = stop_signal
        self.process: subprocess.Popen[bytes] | None = None
        self._stopped = False

    @property
    def pid(self) -> int | None:
        """The launcher's pid, which is also its process group's id; None before :meth:`start`."""
        return self.process.pid if self.process is not None else None

    def start(self) -> Self:
        """Start the command in its own session; returns at once (see :meth:`wait_until_healthy`)."""
        if self.process is not None:
            raise RuntimeError(f"{self.name} was already started")
        with_parent = self.die_with_parent and sys.platform == "linux"
        options = dict(
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,  # own group: terminal signals reach only us; we stop the group
            preexec_fn=functools.partial(_die_with_parent, os.getpid()) if with_parent else None,
            **run_as(self.user),
        )
        if self.log_path is None:
            self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, **options)
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {_redacted(self.command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, **options)
        return self

    def poll(self) -> int | None:
        """The launcher's exit status, or None while it runs."""
        return self._started().poll()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the launcher to exit; its exit status."""
        return self._started().wait(timeout)

    def healthy(self) -> bool:
        """Whether the health check passes now."""
        if self.health is None:
            return self.poll() is None
        if callable(self.health):
            return bool(self.health())
        return http_ok(self.health)

    def wait_until_healthy(self, timeout: float, stop: threading.Event | None = None, every: float = 0.25) -> bool:
        """Poll the health check until it passes; any failure (an interrupt too) stops the process.

        Args:
            timeout: seconds to wait.
            stop: when set meanwhile (a signal), give up and return False; the process keeps
                running (the caller stops it).
            every: seconds between checks.

        Returns:
            True when healthy, False when ``stop`` was set.

        Raises:
            ProcessError: the process exited, or was not healthy within ``timeout``.
        """
        process = self._started()
        deadline = time.monotonic() + timeout
        pause = stop if stop is not None else threading.Event()
        try:
            while True:
                if stop is not None and stop.is_set():
                    return False
                code = process.poll()
                if code is not None:
                    raise ProcessError(
                        f"{self.name} exited with status {code} while starting{self.exit_hint}{self._log_excerpt()}"
                    )
                if self.healthy():
                    return True
                if time.monotonic() >= deadline:
                    what = self.health if isinstance(self.health, str) else "its health check"
                    raise ProcessError(
                        f"{self.name} did not answer {what} within {timeout:.0f} s{self.timeout_hint}"
                        f"{self._log_excerpt(with_path=True)}"
                    )
                pause.wait(every)
        except BaseException:  # also a Ctrl-C or SIGTERM while waiting: never leave it behind
            self.stop()
            raise

    def stop(self, grace: float | None = None) -> int | None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``grace`` seconds. Idempotent.

        Returns:
            The launcher's exit status (None if it was never started).
        """
        if self.process is None:
            return None
        if not self._stopped:
            if self.process.poll() is None or group_members(self.process.pid):
                # Otherwise all gone: signalling the id could reach an unrelated group that reuses it.
                stop_process_group(self.process.pid, self.grace if grace is None else grace, self.stop_signal)
            self._stopped = True
        return self.process.wait()

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the log (for error messages)."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                tail = deque(log, maxlen=lines)
        except OSError:
            return f"(no log at {self.log_path})"
        return "".join("  | " + line for line in tail).rstrip("\n")

    def _log_excerpt(self, with_path: bool = False) -> str:
        if self.log_path is None:
            return ""
        return (f"; log: {self.log_path}\n" if with_path else ":\n") + self.log_tail()

    def _started(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"start() {self.name} first")
        return self.process

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop_process_group(pgid: int, grace: float = STOP_GRACE_S, first: signal.Signals = signal.SIGTERM) -> bool:
    """Stop process group ``pgid``: ``first`` (SIGTERM), wait up to ``grace`` s, then SIGKILL what is left.

    Works for a group another process started (``vggflow stack down``): exited members that are
    not yet reaped (zombies) do not count. Returns True when something had to be killed.
    """
    if not group_members(pgid):
        return False
    _signal_group(pgid, first)
    deadline = time.monotonic() + grace
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if not group_members(pgid):
        return False
    _signal_group(pgid, signal.SIGKILL)
    kill_deadline = time.monotonic() + 5
    while group_members(pgid) and time.monotonic() < kill_deadline:
        time.sleep(0.05)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # the group is already gone
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``.

    Read from ``/proc`` on Linux; elsewhere only whether the group exists is known, and its id
    stands for its members.
    """
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
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


def run_as(user: str | None) -> dict:
    """``subprocess.Popen`` options running a command as system user ``user`` (None: as ourselves).

    Raises:
        ProcessError: no such user, or we are not root and ``user`` is not us.
    """
    if user is None:
        return {}
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ProcessError(f"there is no system user {user!r} to run as") from None
    if entry.pw_uid == os.geteuid():
        return {}
    if os.geteuid() != 0:
        raise ProcessError(f"only root can run a process as {user!r}")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _die_with_parent(parent: int) -> None:
    """In the child, before exec (Linux): receive SIGTERM when the parent dies."""
    with suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _redacted(command: Sequence[str]) -> str:
    """The command line for the log, without passwords in URLs (``scheme://user:***@host``)."""
    return re.sub(r"(://[^:/@\s]+):[^@/\s]+@", r"\1:***@", shlex.join(command))


def become_subreaper() -> None:
    """(Linux) Adopt orphaned descendants, so that processes left by a killed child can still be stopped."""
    with suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)


def stop_descendants(exclude: set[int], timeout: float = STOP_GRACE_S) -> list[int]:
    """Stop every remaining descendant of this process except ``exclude`` (and theirs).

    Catches what children left behind (worker pools, resource trackers): SIGTERM, then SIGKILL
    after ``timeout`` seconds. Returns the pids that had to be stopped.
    """
    import psutil

    me = psutil.Process()
    skipped: set[int] = set()
    for pid in exclude:
        with suppress(psutil.Error):
            skipped |= {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}
    left = [p for p in me.children(recursive=True) if p.pid not in skipped]
    for proc in left:
        with suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=timeout)
    for proc in alive:
        with suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return [p.pid for p in left]


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
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
