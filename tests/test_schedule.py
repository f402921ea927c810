"""Scheduling: `vggflow schedule` serving the retraining deployment, and the prefect.yaml work-pool path.

The slow tests run the real CLI in subprocesses against a real Prefect server — the session's
test server, or the local server `vggflow schedule` starts itself — trigger runs, and stop
everything with SIGTERM, checking that no process is left behind. They share one DVC project:
the served run trains its first champion, so the worker's run later is a (cheap) skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, tiny_overrides
from tests.test_retrain import make_dvc_project
from vggflow.cli.schedule import LocalServer, deployment_parameters, resolve_schedule, serving_message
from vggflow.config import ScheduleConfig
from vggflow.errors import ConfigError
from vggflow.ports import free_port
from vggflow.processes import SupervisedProcess

DEPLOYMENT = "vggflow-retrain/nightly"
VGGFLOW = str(Path(sys.executable).parent / "vggflow")
PREFECT = str(Path(sys.executable).parent / "prefect")


# --------------------------------------------------------------------------- unit


def test_schedule_comes_from_options_then_config():
    assert resolve_schedule(ScheduleConfig(), None, None) == ("0 3 * * *", "UTC")
    assert resolve_schedule(ScheduleConfig(), "30 1 * * 1-5", "Europe/Paris") == ("30 1 * * 1-5", "Europe/Paris")
    with pytest.raises(ConfigError, match="Invalid cron string"):
        resolve_schedule(ScheduleConfig(), "0 3 * *", None)
    with pytest.raises(ConfigError, match="Invalid timezone"):
        resolve_schedule(ScheduleConfig(), None, "Mars/Olympus")


def test_deployment_parameters_and_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    params = deployment_parameters("configs/demo.yaml", ["head.epochs=3"])
    assert params == {
        "config_file": str(tmp_path / "configs" / "demo.yaml"),
        "overrides": ["head.epochs=3"],
        "force": False,
    }
    process = SupervisedProcess(["true"], name="the Prefect server", log_path=tmp_path / "server.log")
    server = LocalServer("http://127.0.0.1:4200/api", process)
    text = serving_message(DEPLOYMENT, "0 3 * * *", "UTC", server.api_url, "abc-123", server, "/x/results")
    assert f"prefect deployment run '{DEPLOYMENT}'" in text
    assert "http://127.0.0.1:4200/deployments/deployment/abc-123" in text and "stops with it" in text
    assert f"(log: {tmp_path / 'server.log'})" in text


def _cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([VGGFLOW, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_bad_schedule_and_unreachable_server_are_one_line_errors(tmp_path: Path):
    env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    bad = _cli(["schedule", "--cron", "every night"], env, tmp_path)
    assert bad.returncode == 78 and "invalid schedule" in bad.stderr and "Traceback" not in bad.stderr
    down = _cli(["schedule"], env, tmp_path)
    assert (
        down.returncode == 1
        and "no Prefect server answers" in down.stderr
        and "prefect server start --host 127.0.0.1" in down.stderr
    )
    assert "Traceback" not in down.stderr


def test_prefect_yaml_matches_the_served_deployment_and_runtime_defaults():
    from vggflow.config import Config
    from vggflow.runtime import OFFLINE_DEFAULTS

    spec = yaml.safe_load((PROJECT_ROOT / "prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    cfg = Config()
    assert f"vggflow-retrain/{deployment['name']}" == f"vggflow-retrain/{cfg.schedule.deployment_name}"
    assert deployment["entrypoint"] == "flows/retrain.py:retrain_flow"
    assert (
        deployment["schedules"][0]["cron"] == cfg.schedule.cron
        and deployment["schedules"][0]["timezone"] == cfg.schedule.timezone
    )
    env = deployment["work_pool"]["job_variables"]["env"]
    assert env["PREFECT_LOCAL_STORAGE_PATH"] == "{{ $PWD }}/.vggflow/prefect/results"
    for name, value in env.items():
        if name in OFFLINE_DEFAULTS:
            assert value == OFFLINE_DEFAULTS[name], name


# --------------------------------------------------------------------------- helpers


def wait_for(predicate, timeout: float, what: str, every: float = 1.0, on_wait=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if on_wait:
            on_wait()
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class ProcessTree:
    """Every descendant ever seen of a process started in its own session."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.seen = process, {process.pid}

    def snapshot(self) -> None:
        import psutil

        try:
            self.seen |= {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass

    def survivors(self) -> list[str]:
        import psutil

        alive = []
        for pid in sorted(self.seen):
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {' '.join(proc.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.process.pid, 0)
            alive.append(f"process group {self.process.pid} still has members")
        except ProcessLookupError:
            pass
        return alive

    def terminate(self, timeout: float = 90) -> int:
        self.snapshot()
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # do not leave it running after a failed test
            raise


def start_scheduler(project: Path, env: dict[str, str], log: Path, *args: str) -> ProcessTree:
    sets = [x for o in tiny_overrides() for x in ("--set", o)]
    process = subprocess.Popen(
        [VGGFLOW, "schedule", *args, *sets],
        cwd=project,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return ProcessTree(process)


def scheduler_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no test-only result store, the project's own MLflow store."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PREFECT_LOCAL_STORAGE_PATH", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")
    }
    env.update(PREFECT_RUNNER_POLL_FREQUENCY="2", **extra)
    return env


def read_deployment():
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(DEPLOYMENT)
        except ObjectNotFound:
            return None


def read_flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def flow_logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def logs_contain(flow_run_id, pattern: str, timeout: float = 60) -> str:
    """Wait until the flow run's logs match ``pattern`` (logs reach the API in batches, after the state)."""
    return wait_for(
        lambda: (found := re.search(pattern, flow_logs(flow_run_id))) and found.group(0),
        timeout,
        f"log {pattern!r}",
        every=2,
    )


def trigger_and_wait(timeout: float, tree: ProcessTree | None = None):
    """Create a run of the deployment now and wait for a final state; returns the flow run."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(DEPLOYMENT, timeout=0)
    on_wait = tree.snapshot if tree else None
    return wait_for(
        lambda: (run := read_flow_run(flow_run.id)).state.is_final() and run,
        timeout,
        f"flow run {flow_run.id}",
        on_wait=on_wait,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A DVC project, plus links to the code a worker loads by path (flows/retrain.py)."""
    root = make_dvc_project(tmp_path_factory.mktemp("schedule") / "project")
    (root / "flows").symlink_to(PROJECT_ROOT / "flows")
    return root


# --------------------------------------------------------------------------- served deployment


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_served_deployment_runs_on_trigger_and_stops_cleanly(project: Path, prefect_server, tmp_path: Path):
    from prefect.settings import PREFECT_API_URL

    log = tmp_path / "schedule.log"
    tree = start_scheduler(
        project, scheduler_env(PREFECT_API_URL=PREFECT_API_URL.value()), log, "--cron", "0 3 * * *", "--timezone", "UTC"
    )
    try:
        deployment = wait_for(read_deployment, 180, "the deployment", on_wait=tree.snapshot)
        (schedule,) = deployment.schedules
        assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC" and schedule.active
        assert deployment.parameters["overrides"] == tiny_overrides() and deployment.parameters["force"] is False
        wait_for(
            lambda: "prefect deployment run 'vggflow-retrain/nightly'" in log.read_text(), 60, "the serving message"
        )

        # First run: no champion yet → trains and promotes, in a child of the scheduler.
        started = time.monotonic()
        first = trigger_and_wait(300, tree)
        print(f"served training run: {time.monotonic() - started:.0f} s")
        assert first.state.is_completed(), (first.state, log.read_text()[-3000:])
        logs_contain(first.id, "training: no @champion")
        # Its tasks recorded their results in the project's shared cache (not ~/.prefect).
        records = list((project / ".vggflow" / "prefect" / "results").glob("extract-features-*"))
        assert records, "the served run did not use <project>/.vggflow/prefect/results"

        # Second run, same data: skipped.
        started = time.monotonic()
        second = trigger_and_wait(180, tree)
        print(f"served skipped run: {time.monotonic() - started:.0f} s")
        assert second.state.is_completed()
        logs_contain(second.id, r"skipped: data unchanged \(version")
    finally:
        code = tree.terminate()
    assert code == 0, log.read_text()[-3000:]
    assert tree.survivors() == []
    assert "vggflow schedule: stopped" in log.read_text()
    assert read_deployment().paused  # nobody serves it: its schedule is paused until served again


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_schedule_starts_and_stops_its_own_local_server(project: Path, tmp_path: Path):
    import httpx

    port = free_port()
    env = scheduler_env(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_API_PORT=str(port))
    log = tmp_path / "schedule.log"
    tree = start_scheduler(project, env, log)
    health = f"http://127.0.0.1:{port}/api/health"
    try:
        wait_for(
            lambda: "prefect deployment run" in log.read_text() or tree.process.poll() is not None,
            300,
            "serving",
            on_wait=tree.snapshot,
        )
        assert tree.process.poll() is None, log.read_text()[-3000:]
        text = log.read_text()
        assert f"starting a local Prefect server on 127.0.0.1:{port}" in text and "stops with it" in text
        assert httpx.get(health, timeout=5).status_code == 200
        tree.snapshot()
        assert len(tree.seen) >= 2  # the scheduler and its server
    finally:
        code = tree.terminate()
    assert code == 0, log.read_text()[-3000:]
    assert tree.survivors() == []
    assert "vggflow schedule: stopped" in log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(health, timeout=5)


# --------------------------------------------------------------------------- prefect.yaml + worker


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_prefect_yaml_deploys_to_a_process_pool_and_a_worker_runs_it(project: Path, prefect_server, tmp_path: Path):
    from prefect.settings import PREFECT_API_URL

    env = scheduler_env(PREFECT_API_URL=PREFECT_API_URL.value(), PWD=str(project))

    def prefect(*args: str) -> str:
        done = subprocess.run([PREFECT, *args], cwd=project, env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    prefect("work-pool", "create", "vggflow-process", "--type", "process", "--overwrite")
    prefect("deploy", "--all", "--prefect-file", str(PROJECT_ROOT / "prefect.yaml"))
    deployment = read_deployment()
    assert deployment.work_pool_name == "vggflow-process" and not deployment.paused
    assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [("0 3 * * *", "UTC")]
    variables = deployment.job_variables
    assert variables["working_dir"] == str(project)
    assert variables["env"]["PREFECT_LOCAL_STORAGE_PATH"] == str(project / ".vggflow" / "prefect" / "results")

    # A worker picks up a triggered run. The served test trained a champion on this data when it
    # ran first; either way the run must complete in the project folder.
    from prefect.deployments import run_deployment

    flow_run = run_deployment(DEPLOYMENT, timeout=0, parameters={"overrides": tiny_overrides()})
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [PREFECT, "worker", "start", "--pool", "vggflow-process", "--limit", "1", "--run-once"],
        cwd=tmp_path,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tree = ProcessTree(worker)
    try:
        run = wait_for(
            lambda: (r := read_flow_run(flow_run.id)).state.is_final() and r,
            360,
            "the worker's run",
            on_wait=tree.snapshot,
        )
        assert run.state.is_completed(), (run.state, log.read_text()[-3000:])
        logs_contain(run.id, r"skipped: data unchanged \(version|training: no @champion")
        worker.wait(60)  # --run-once: the worker exits once its run is done
    finally:
        tree.snapshot()
        for _ in range(2):  # a worker needs a second SIGTERM to exit
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.wait(30)
    assert worker.poll() is not None and tree.survivors() == []
