"""The dashboard: `vggflow ui` over a store produced by a tiny training run.

Fast tests cover the server's command line, environment and signal handling. The slow tests
train once (real Prefect test server, real sqlite store), start the real `vggflow ui` command on
a free port, check over MLflow's REST API that the run, its stage runs, metrics, artifacts and
the registered version are there, render pages in headless Chromium, and finally stop the
command with Ctrl-C (SIGINT) and check that no server process is left and the port is free.
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.conftest import tiny_overrides, write_dataset
from vggflow import dashboard, ports, processes
from vggflow.cli import main
from vggflow.scoring import EVALUATION_DATASET

VGGFLOW = [sys.executable, "-m", "vggflow.cli"]
STAGES = ["head", "block5", "block4", "all"]
PNG_ARTIFACTS = [
    "evaluation/confusion_matrix.png",
    "evaluation/per_class_metrics.png",
    "evaluation/worst_misclassified.png",
    "stages/learning_curves.png",
    "stages/stage_comparison.png",
]
OTHER_ARTIFACTS = [
    "evaluation/per_class_metrics.csv",
    "evaluation/test_predictions.csv",
    "stages/stage_comparison.json",
    "validation/report.html",
    "validation/report.json",
    "validation/manifest.csv",
    "config/effective_config.yaml",
    "model_card.md",
]


# --------------------------------------------------------------------------- fast


def test_server_command_has_the_small_machine_settings(tmp_path: Path) -> None:
    spec = dashboard.ServerSpec("sqlite:////abs/mlflow.db", tmp_path / "artifacts", "127.0.0.1", 5123)
    command = dashboard.server_command(spec, python="/venv/bin/python")
    assert command[:4] == ["/venv/bin/python", "-m", "mlflow", "server"]
    options = dict(zip(command[4::2], command[5::2], strict=True))
    assert options == {
        "--backend-store-uri": "sqlite:////abs/mlflow.db",
        "--default-artifact-root": (tmp_path / "artifacts").as_uri(),
        "--artifacts-destination": (tmp_path / "artifacts").as_uri(),
        "--host": "127.0.0.1",
        "--port": "5123",
        "--workers": "1",
    }
    assert spec.url == "http://127.0.0.1:5123"
    assert dashboard.ServerSpec("x", tmp_path, "0.0.0.0", 80).url == "http://127.0.0.1:80"


def test_server_env_turns_off_the_job_runner_and_telemetry() -> None:
    env = dashboard.server_env({"PATH": "/bin", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"})
    # Forced even when set: the job runner is what leaves orphan processes.
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true" and env["PATH"] == "/bin"
    assert dashboard.server_env({"MLFLOW_DISABLE_TELEMETRY": "false"})["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_binding_beyond_loopback_warns_about_authentication() -> None:
    assert dashboard.exposure_warning("127.0.0.1") is None
    assert dashboard.exposure_warning("localhost") is None
    warning = dashboard.exposure_warning("0.0.0.0")
    assert warning is not None and "no authentication" in warning


def test_spec_uses_the_project_store_with_absolute_paths(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vggflow.config import load_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    spec = dashboard.spec_from_config(load_config(None, []), port=5555)
    assert spec.backend_uri == f"sqlite:///{project / 'mlflow' / 'mlflow.db'}"
    assert spec.artifact_root == project / "mlflow" / "artifacts"
    assert (project / "mlflow").is_dir()  # the store's folder is created (the server would fail later)


def test_ui_names_an_unreachable_tracking_server(project: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from vggflow.ports import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["ui"]) == 3
    err = capsys.readouterr().err
    assert f"the MLflow tracking server {uri} is not reachable" in err and "Traceback" not in err


def test_ui_refuses_a_busy_port(project: Path, capsys) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"port {port}" in err and "already in use" in err and "Traceback" not in err


def test_saved_views_show_the_primary_metric_and_data_version() -> None:
    tags = dashboard.compare_view_tags("macro_f1", created_ms=1)
    prefix = "mlflow.sharedViewState."
    assert set(tags) == {prefix + dashboard.COMPARE_VIEW_ID, prefix + dashboard.LEADERBOARD_VIEW_ID}
    states = {}
    for key, value in tags.items():
        assert len(value) < 5000  # fits an experiment tag
        envelope = json.loads(value)  # the UI's saved-view envelope
        assert envelope["name"].startswith("vggflow: ") and envelope["createdAt"] == 1
        states[key.removeprefix(prefix)] = json.loads(envelope["state"])
    for state in states.values():
        assert state["selectedColumns"][:3] == [
            "attributes.`Dataset`",
            "metrics.`test_macro_f1`",
            "metrics.`test_accuracy`",
        ]
        assert "params.`data_version`" in state["selectedColumns"] and state["runsPinned"] == []
    # Nested stage runs need the creation-time order; the leaderboard sorts training runs by the metric.
    assert states[dashboard.COMPARE_VIEW_ID]["orderByKey"] == "attributes.start_time"
    leaderboard = states[dashboard.LEADERBOARD_VIEW_ID]
    assert leaderboard["orderByKey"] == "metrics.`test_macro_f1`" and leaderboard["orderByAsc"] is False
    assert leaderboard["searchFilter"] == "tags.`vggflow.kind` = 'training'"


# --------------------------------------------------------------------------- slow: a real server


@dataclass
class Dashboard:
    """A running `vggflow ui` over a freshly trained store."""

    url: str
    port: int
    cli: subprocess.Popen[str]
    server_pgid: int
    server_pids: list[int]
    output: list[str]
    summary: object
    project: Path

    def get(self, endpoint: str, **params: str) -> dict:
        response = requests.get(f"{self.url}{endpoint}", params=params, timeout=30)
        assert response.status_code == 200, f"{endpoint}: {response.status_code} {response.text[:300]}"
        return response.json()

    def post(self, endpoint: str, body: dict) -> dict:
        response = requests.post(f"{self.url}{endpoint}", json=body, timeout=30)
        assert response.status_code == 200, f"{endpoint}: {response.status_code} {response.text[:300]}"
        return response.json()

    def artifact(self, run_id: str, path: str) -> bytes:
        response = requests.get(f"{self.url}/get-artifact", params={"path": path, "run_uuid": run_id}, timeout=30)
        assert response.status_code == 200, f"{path}: {response.status_code}"
        return response.content


def _read_lines(stream: io.TextIOBase, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line.rstrip("\n"))
    lines.put(None)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, prefect_server) -> Iterator[Dashboard]:
    """One tiny training run, then `vggflow ui --port <free>` over its store (stopped at the end)."""
    import mlflow

    from vggflow.flows.train import train_flow

    root = tmp_path_factory.mktemp("dashboard")
    folder = root / "project"
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        summary = train_flow(overrides=tiny_overrides(), data_dir=str(write_dataset(root / "data")))
        mlflow.set_tracking_uri(None)  # the flow set it process-wide; later tests choose their own

    import psutil

    port = ports.free_port()
    cli = subprocess.Popen(
        [*VGGFLOW, "ui", "--port", str(port)],
        cwd=folder,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(cli.stdout, lines), daemon=True).start()
    output: list[str] = []
    url = None
    pgid: int | None = None
    deadline = time.monotonic() + dashboard.STARTUP_TIMEOUT_S + 30
    try:
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail("vggflow ui exited before serving:\n" + "\n".join(output))
            output.append(line)
            if match := re.match(r"MLflow UI: (http://[^\s]+)", line):
                url = match.group(1)
        assert url == f"http://127.0.0.1:{port}", "\n".join(output)
        # Let the CLI print its links, then keep collecting output in the background.
        time.sleep(1)
        children = psutil.Process(cli.pid).children(recursive=True)
        leaders = [p for p in children if p.pid == os.getpgid(p.pid)]
        assert len(leaders) == 1, f"expected one server process group, got {leaders}"
        pgid = leaders[0].pid

        def drain() -> None:
            while (line := lines.get()) is not None:
                output.append(line)

        threading.Thread(target=drain, daemon=True).start()
        yield Dashboard(url, port, cli, pgid, [p.pid for p in children], output, summary, folder)
    finally:
        if cli.poll() is None:  # the stop test did not run or failed: do not leave a server behind
            cli.send_signal(signal.SIGTERM)
            try:
                cli.wait(60)
            except subprocess.TimeoutExpired:
                cli.kill()
        if pgid is not None and processes.group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)


@pytest.mark.slow
def test_ui_prints_the_url_and_links_to_the_comparison_view_and_latest_run(served: Dashboard) -> None:
    text = "\n".join(served.output)
    assert "Traceback" not in text
    assert f"{served.url}/#/experiments/" in text and "Ctrl-C" in text
    for view in (dashboard.COMPARE_VIEW_ID, dashboard.LEADERBOARD_VIEW_ID):
        assert f"runs?viewStateShareKey={view}" in text
    assert re.search(rf"latest run +{re.escape(served.url)}/#/experiments/\d+/runs/{served.summary.run_id}", text)


@pytest.mark.slow
def test_run_and_its_stage_runs_are_served(served: Dashboard) -> None:
    experiment = served.get("/api/2.0/mlflow/experiments/get-by-name", experiment_name="vggflow")["experiment"]
    eid = experiment["experiment_id"]
    run = served.get("/api/2.0/mlflow/runs/get", run_id=served.summary.run_id)["run"]
    info, data = run["info"], run["data"]
    tags = {t["key"]: t["value"] for t in data["tags"]}
    params = {p["key"]: p["value"] for p in data["params"]}
    metrics = {m["key"]: m["value"] for m in data["metrics"]}
    assert info["status"] == "FINISHED" and info["experiment_id"] == eid
    version = tags["vggflow.data_version"]
    assert params["data_version"] == version and version.startswith("untracked-")
    assert tags["vggflow.freeze_configuration"] == params["chosen.stage"] in STAGES
    for key in ("test_accuracy", "test_macro_f1", "best_val_accuracy", "best_val_loss"):
        assert key in metrics, key
    # The run page's description: outcome first.
    assert "test accuracy" in tags["mlflow.note.content"] and version in tags["mlflow.note.content"]
    # The data version in the UI's default Dataset column, beside the gate's evaluation dataset.
    inputs = {
        next((t["value"] for t in d.get("tags", []) if t["key"] == "mlflow.data.context"), None): d["dataset"]
        for d in run["inputs"]["dataset_inputs"]
    }
    assert set(inputs) == {"training", None} and inputs[None]["name"] == EVALUATION_DATASET
    assert version.startswith(inputs["training"]["digest"]) and inputs["training"]["name"] == "data"

    children = served.post(
        "/api/2.0/mlflow/runs/search",
        {"experiment_ids": [eid], "filter": f"tags.mlflow.parentRunId = '{info['run_id']}'", "max_results": 50},
    )["runs"]
    by_stage = {}
    for child in children:
        child_tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        stage = child_tags["vggflow.stage"]
        by_stage[stage] = child
        assert child["info"]["run_name"] == f"stage-{stage}"  # named after its freeze configuration
        assert child["info"]["status"] == "FINISHED"
        # Same columns as the parent: data version, freeze configuration, best validation metrics.
        assert child_tags["vggflow.data_version"] == version and child_tags["vggflow.freeze_configuration"] == stage
        assert {p["key"]: p["value"] for p in child["data"]["params"]}["data_version"] == version
        child_metrics = {m["key"]: m["value"] for m in child["data"]["metrics"]}
        assert {"best_val_accuracy", "best_val_loss", "epochs_run", "val_accuracy", "train_loss"} <= set(child_metrics)
        # Per-epoch history, one point per epoch, steps in order.
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            history = served.get("/api/2.0/mlflow/metrics/get-history", run_id=child["info"]["run_id"], metric_key=key)
            steps = sorted(point["step"] for point in history["metrics"])
            assert len(steps) == int(child_metrics["epochs_run"]) >= 1, (stage, key, steps)
            assert steps == list(range(steps[0], steps[0] + len(steps)))
    assert sorted(by_stage) == sorted(STAGES)

    # The saved views, for the configured primary metric.
    experiment_tags = {t["key"]: t["value"] for t in experiment.get("tags", [])}
    for key, value in dashboard.compare_view_tags("accuracy", created_ms=0).items():
        saved = json.loads(experiment_tags[key])
        assert saved["state"] == json.loads(value)["state"], key


def _list_artifacts(served: Dashboard, run_id: str, path: str = "") -> dict[str, dict]:
    """Every artifact file under ``path`` (recursively) → its REST entry."""
    found: dict[str, dict] = {}
    listing = served.get("/api/2.0/mlflow/artifacts/list", run_id=run_id, **({"path": path} if path else {}))
    for entry in listing.get("files", []):
        if entry["is_dir"]:
            if entry["path"] != "model":  # the logged model is checked through the registry
                found |= _list_artifacts(served, run_id, entry["path"])
        else:
            found[entry["path"]] = entry
    return found


@pytest.mark.slow
def test_every_report_artifact_is_served_and_images_are_sensible(served: Dashboard) -> None:
    run_id = served.summary.run_id
    files = _list_artifacts(served, run_id)
    missing = [path for path in PNG_ARTIFACTS + OTHER_ARTIFACTS if path not in files]
    assert not missing, f"missing artifacts {missing}; served: {sorted(files)}"
    for path in PNG_ARTIFACTS:
        assert int(files[path]["file_size"]) > 5_000, path
        content = served.artifact(run_id, path)
        with Image.open(io.BytesIO(content)) as image:
            image.verify()  # a complete, uncorrupted PNG
        with Image.open(io.BytesIO(content)) as image:
            assert image.format == "PNG"
            width, height = image.size
            assert 500 <= width <= 2000 and 200 <= height <= 3000, (path, image.size)
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is not None and len(colours) >= 16, f"{path} looks blank"

    html = served.artifact(run_id, "validation/report.html").decode()
    assert "<html" in html.lower() and "class_0" in html
    manifest = served.artifact(run_id, "validation/manifest.csv").decode().splitlines()
    assert len(manifest) == 1 + 36 and "path" in manifest[0] and "split" in manifest[0]
    per_class = served.artifact(run_id, "evaluation/per_class_metrics.csv").decode().splitlines()
    assert per_class[0] == "class,precision,recall,f1,support" and len(per_class) == 1 + 3
    comparison = json.loads(served.artifact(run_id, "stages/stage_comparison.json"))
    assert [s["stage"] for s in comparison["stages"]] == STAGES


@pytest.mark.slow
def test_registered_version_is_served_with_the_model_card_as_description(served: Dashboard) -> None:
    summary = served.summary
    model = served.get("/api/2.0/mlflow/registered-models/get", name=summary.model_name)["registered_model"]
    assert {"alias": "champion", "version": summary.model_version} in model.get("aliases", [])
    versions = served.get("/api/2.0/mlflow/model-versions/search", filter=f"run_id='{summary.run_id}'")[
        "model_versions"
    ]
    assert [v["version"] for v in versions] == [summary.model_version]
    card = served.artifact(summary.run_id, "model_card.md").decode()
    from vggflow.tasks.model_card import version_description

    # The whole card, or cut at a section when it is longer than the SQL stores keep (5,000 characters).
    assert versions[0]["description"] == version_description(card)
    assert card.startswith(versions[0]["description"].split("\n\n*(Shortened")[0])
    for section in ("## Intended use", "## Limitations", "## Training data", "## Evaluation", "## Promotion decision"):
        assert section in card, section
    assert "randomly initialised" in card and summary.data_version in card
    assert summary.freeze_configuration["first_trainable_layer"] in card


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium; .ci/run does this)")
    return binary


def _render(url: str, tmp_path: Path, *outputs: str, width: int = 1600) -> subprocess.CompletedProcess[str]:
    """Load ``url`` in headless Chromium (offline flags) and let the React app settle."""
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--window-size={width},1000", "--virtual-time-budget=15000", *outputs, url,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("headless chromium did not finish rendering within 180 s on this machine")
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        pytest.skip(f"headless chromium cannot run here (exit {done.returncode}): {tail}")
    return done


def _rendered_dom(url: str, tmp_path: Path, width: int = 1600) -> str:
    dom = _render(url, tmp_path, "--dump-dom", width=width).stdout
    # The bare index.html has an empty root: the app's JavaScript did not run at all.
    if 'id="root"' in dom and re.search(r'<div id="root">\s*</div>', dom):
        pytest.skip("headless chromium loaded the page but did not run MLflow's JavaScript app here")
    return dom


@pytest.mark.slow
def test_run_page_renders_in_headless_chromium(served: Dashboard, tmp_path: Path) -> None:
    run = served.get("/api/2.0/mlflow/runs/get", run_id=served.summary.run_id)["run"]["info"]
    page = f"{served.url}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
    dom = _rendered_dom(page, tmp_path)
    assert run["run_name"] in dom and run["run_id"] in dom, "the run page does not show the run"
    for stage in STAGES:
        assert f"stage-{stage}" in dom  # child runs are linked from the parent's page
    screenshot = tmp_path / "run.png"
    _render(page, tmp_path, f"--screenshot={screenshot}")
    with Image.open(screenshot) as image:
        assert image.size == (1600, 1000)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50  # not a blank page


@pytest.mark.slow
@pytest.mark.parametrize("view", [dashboard.COMPARE_VIEW_ID, dashboard.LEADERBOARD_VIEW_ID])
def test_saved_views_render_with_metric_and_data_version_columns(served: Dashboard, tmp_path: Path, view: str) -> None:
    info = served.get("/api/2.0/mlflow/runs/get", run_id=served.summary.run_id)["run"]["info"]
    url = f"{served.url}/#/experiments/{info['experiment_id']}/runs?viewStateShareKey={view}"
    dom = _rendered_dom(url, tmp_path, width=2600)  # wide: the table only renders visible columns
    assert "share key" not in dom, "the UI did not accept the saved view"
    assert info["run_name"] in dom
    for text in ("test_accuracy", "test_macro_f1", "best_val_accuracy", "vggflow.freeze_configuration", "data_version"):
        assert f">{text}<" in dom, f"no {text!r} column on view {view}"
    assert served.summary.data_version[:20] in dom  # the Dataset column


@pytest.mark.slow
def test_ctrl_c_stops_the_server_group_and_frees_the_port(served: Dashboard) -> None:
    served.cli.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C delivers to `vggflow ui`
    assert served.cli.wait(timeout=dashboard.STOP_GRACE_S + 30) == 0
    time.sleep(0.5)  # the output thread
    assert served.output[-1] == "stopped" and "Traceback" not in "\n".join(served.output)
    assert processes.group_members(served.server_pgid) == []
    leftovers = [pid for pid in served.server_pids if Path(f"/proc/{pid}").exists() and _state(pid) not in ("Z", "X")]
    assert leftovers == [], f"server processes left behind: {leftovers}"
    assert not ports.port_in_use("127.0.0.1", served.port)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{served.url}/health", timeout=5)


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "X"
    return stat[stat.rfind(")") + 2 :].split()[0]
