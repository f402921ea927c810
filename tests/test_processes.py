"""Supervised server processes (vggflow/processes.py), with real child processes.

Each test starts small Python programs as servers and checks what users of the helper rely on:
ready only when healthy, a start-up error that quotes the log, nothing left of the process group
after a stop (SIGKILL for what ignores SIGTERM), and no server outliving a parent killed with -9.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vggflow import processes
from vggflow.ports import free_port, port_in_use
from vggflow.processes import ProcessError, SupervisedProcess, group_members, http_ok

PYTHON = sys.executable
#: A launcher that forks a worker into its own group (as uvicorn and gunicorn do), then signals readiness.
LAUNCHER = (
    "import pathlib, subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print('launcher up', flush=True)\n"
    "pathlib.Path(sys.argv[1]).write_text('ready')\n"
    "time.sleep(600)\n"
)


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_ready_when_healthy_and_stop_ends_the_whole_group(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    server = SupervisedProcess(
        [PYTHON, "-c", LAUNCHER, marker], name="the test server", health=marker.exists, log_path=tmp_path / "log"
    )
    with server:
        assert server.wait_until_healthy(60)
        assert os.getpgid(server.pid) == server.pid != os.getpgid(0)  # its own group, not ours
        assert wait_for(lambda: len(group_members(server.pid)) == 2)  # the launcher and its worker
    assert group_members(server.pid) == [] and server.poll() == -signal.SIGTERM
    assert "launcher up" in server.log_tail() and server.stop() == -signal.SIGTERM  # a second stop: same answer
    assert (tmp_path / "log").read_text().startswith("--- ")  # a header line per start


def test_http_health_check_and_ports(tmp_path: Path) -> None:
    port = free_port()
    assert not port_in_use("127.0.0.1", port)
    server = SupervisedProcess(
        [PYTHON, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        name="the test server",
        health=f"http://127.0.0.1:{port}/",
        cwd=tmp_path,
    )
    try:
        assert server.start().wait_until_healthy(60)
        assert port_in_use("127.0.0.1", port) and http_ok(f"http://127.0.0.1:{port}/")
        assert not http_ok(f"http://127.0.0.1:{port}/missing")  # 404
    finally:
        server.stop()
    assert wait_for(lambda: not port_in_use("127.0.0.1", port))
    assert not http_ok(f"http://127.0.0.1:{port}/", timeout=1)


def test_what_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    stubborn = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ignoring' + ' SIGTERM', flush=True)\n"
        "time.sleep(600)\n"
    )
    server = SupervisedProcess([PYTHON, "-c", stubborn], name="a stubborn server", log_path=tmp_path / "log", grace=1)
    server.start()
    assert wait_for(lambda: "ignoring SIGTERM" in server.log_tail())  # (the header holds the code, not this)
    started = time.monotonic()
    assert server.stop() == -signal.SIGKILL
    assert time.monotonic() - started < 10 and group_members(server.pid) == []


def test_exit_while_starting_quotes_the_log_and_the_hint(tmp_path: Path) -> None:
    failing = "import sys; print('address already in use'); sys.exit(3)"
    server = SupervisedProcess(
        [PYTHON, "-c", failing],
        name="the test server",
        health=lambda: False,
        log_path=tmp_path / "log",
        exit_hint=" (port in use?)",
    )
    with pytest.raises(ProcessError) as error:
        server.start().wait_until_healthy(60)
    message = str(error.value)
    assert message.startswith("the test server exited with status 3 while starting (port in use?):\n")
    assert "  | address already in use" in message and error.value.exit_code == 1


def test_not_healthy_in_time_is_an_error_and_the_process_is_stopped(tmp_path: Path) -> None:
    server = SupervisedProcess(
        [PYTHON, "-c", "import time; time.sleep(600)"],
        name="the test server",
        health="http://127.0.0.1:9/health",
        log_path=tmp_path / "log",
        timeout_hint="; raise the timeout",
    )
    with pytest.raises(
        ProcessError, match=r"did not answer http://127.0.0.1:9/health within 1 s; raise the timeout; log: "
    ):
        server.start().wait_until_healthy(1)
    assert server.poll() is not None and group_members(server.pid) == []


def test_a_stop_request_while_starting_returns_false_and_leaves_the_stop_to_the_caller() -> None:
    stop = threading.Event()
    stop.set()
    with SupervisedProcess([PYTHON, "-c", "import time; time.sleep(600)"], name="s", health=lambda: False) as server:
        assert server.wait_until_healthy(60, stop) is False
        assert server.poll() is None
    assert server.poll() is not None
    assert SupervisedProcess(["true"], name="never started").stop() is None


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_the_server_dies_with_a_parent_killed_with_sigkill(tmp_path: Path) -> None:
    parent_code = (
        "import sys, time\n"
        "from vggflow.processes import SupervisedProcess\n"
        "server = SupervisedProcess([sys.executable, '-c', 'import time; time.sleep(600)'], name='child').start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([PYTHON, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert group_members(child) == [child]
        parent.kill()
        parent.wait(30)
        assert wait_for(lambda: group_members(child) == [], timeout=30), "the server outlived its parent"
    finally:
        parent.kill()
        parent.wait()


def test_passwords_in_urls_stay_out_of_the_log(tmp_path: Path) -> None:
    command = [PYTHON, "-c", "pass", "--backend-store-uri", "postgresql://mlflow:s3cret@127.0.0.1:5432/mlflow"]
    server = SupervisedProcess(command, name="the test server", log_path=tmp_path / "log")
    server.start().wait(30)
    header = (tmp_path / "log").read_text().splitlines()[0]
    assert "postgresql://mlflow:***@127.0.0.1:5432/mlflow" in header and "s3cret" not in header


def test_sigint_and_sigterm_request_a_stop_and_handlers_are_restored() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in (signal.SIGINT, signal.SIGTERM):
        stop = threading.Event()
        with processes.stop_on_signals(stop):
            os.kill(os.getpid(), sig)
            assert stop.wait(5), f"{sig.name} did not request a stop"
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_busy_port_is_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert port_in_use("127.0.0.1", busy.getsockname()[1])
