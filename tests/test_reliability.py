"""Fault injection with real processes: kill -9 mid-run and re-run, corrupted caches, two trainings
on one store, a dead tracking server, a read-only store."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides, write_dataset

pytestmark = pytest.mark.slow
VGGFLOW = str(Path(sys.executable).with_name("vggflow"))
NAME = "vgg19-classifier"


@pytest.fixture
def env(project: Path, prefect_server) -> dict[str, str]:
    """Environment for `vggflow train` subprocesses: the session's Prefect server, a shared result store."""
    from prefect.settings import PREFECT_API_URL

    return os.environ | {
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_LOCAL_STORAGE_PATH": str(project / "prefect-results"),
        "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
    }


def train_args(data: Path, *extra: str) -> list[str]:
    args = [VGGFLOW, "train", "--data", str(data)]
    for override in tiny_overrides(**dict(e.split("=", 1) for e in extra)):
        args += ["--set", override]
    return args


def run_until(
    args: list[str], env: dict, cwd: Path, marker: str, timeout: float = 300
) -> tuple[subprocess.Popen, list[str]]:
    """Start a command and return once a line containing ``marker`` was printed (process still running)."""
    process = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return process, lines
        if time.monotonic() > deadline:
            break
    process.kill()
    pytest.fail(f"never saw {marker!r}:\n{''.join(lines[-40:])}")


def kill9(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def run_to_end(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done


def client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def all_runs():
    c = client()
    experiment = c.get_experiment_by_name("vggflow")
    return c.search_runs([experiment.experiment_id], max_results=1000)


def assert_registry_sound() -> None:
    """Every version's model loads (no version points at a missing/partial model)."""
    import mlflow

    for version in client().search_model_versions(f"name = '{NAME}'"):
        mlflow.pyfunc.load_model(f"models:/{NAME}/{version.version}")


def test_kill_during_feature_extraction_then_rerun_completes(project, env):
    data = write_dataset(project / "data", classes=3, per_class=80, size=64)
    # No stages: the kill and the re-run are about extraction.
    args = train_args(data, "backbone.image_size=64", "features.batch_size=8", "finetune.stages=[]")
    process, _ = run_until(args, env, project, "feature extraction:")
    kill9(process)
    validation = sorted((project / ".vggflow" / "validation").glob("*/rows.csv"))
    assert len(validation) == 1
    validated_at = validation[0].stat().st_mtime_ns
    assert client().search_model_versions(f"name = '{NAME}'") == []  # nothing registered by the killed run

    done = run_to_end(args, env, project)
    assert "vggflow train: done" in done.stdout
    assert validation[0].stat().st_mtime_ns == validated_at  # validation reused, not redone
    runs = {r.info.run_id: r for r in all_runs()}
    parents = [r for r in runs.values() if r.data.tags.get("vggflow.kind") == "training"]
    statuses = sorted(r.info.status for r in parents)
    assert statuses == ["FINISHED", "KILLED"], statuses
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    assert len(client().search_model_versions(f"name = '{NAME}'")) == 1
    assert_registry_sound()


def test_kill_during_a_finetuning_stage_resumes_at_that_stage(project, env, tiny_dataset):
    args = train_args(tiny_dataset)
    process, lines = run_until(args, env, project, "stage block4: training")
    kill9(process)
    checkpoints = {p: p.stat().st_mtime_ns for p in (project / ".vggflow" / "checkpoints").glob("*.keras")}
    assert len(checkpoints) == 2  # head and block5 were finished and checkpointed

    run_to_end(args, env, project)
    for path, stamp in checkpoints.items():
        assert path.stat().st_mtime_ns == stamp  # finished stages reused, not retrained
    runs = all_runs()
    finished = [r for r in runs if r.data.tags.get("vggflow.kind") == "training" and r.info.status == "FINISHED"]
    assert len(finished) == 1
    stages = {
        r.data.tags["vggflow.stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == finished[0].info.run_id
    }
    assert set(stages) == {"head", "block5", "block4", "all"}
    assert (
        "vggflow.reused_from_run" in stages["head"].data.tags
        and "vggflow.reused_from_run" in stages["block5"].data.tags
    )
    assert "vggflow.reused_from_run" not in stages["block4"].data.tags
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert {r.data.tags.get("vggflow.kind") for r in killed} == {"training", "stage"}  # the parent and the open stage
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert_registry_sound()


def test_corrupted_checkpoint_is_detected_and_rebuilt(project, env, tiny_dataset):
    args = train_args(tiny_dataset, "finetune.stages=[]")  # the head's checkpoint is the one broken
    run_to_end(args, env, project)
    checkpoints = sorted((project / ".vggflow" / "checkpoints").glob("*.keras"), key=lambda p: p.stat().st_mtime_ns)
    head = checkpoints[0]
    head.write_bytes(head.read_bytes()[: head.stat().st_size // 2])  # truncated
    run_to_end(args, env, project)
    from vggflow.training import checkpoint_is_valid

    assert checkpoint_is_valid(head)  # rebuilt, with a matching checksum
    latest = max(
        (r for r in all_runs() if r.data.tags.get("vggflow.kind") == "training"), key=lambda r: r.info.start_time
    )
    stages = {
        r.data.tags["vggflow.stage"]: r
        for r in all_runs()
        if r.data.tags.get("mlflow.parentRunId") == latest.info.run_id and r.data.tags.get("vggflow.kind") == "stage"
    }  # the other child: the gate's evaluation of the champion
    assert "vggflow.reused_from_run" not in stages["head"].data.tags  # retrained, not read from the broken file


def test_two_trainings_at_once_on_one_store(project, env, tiny_dataset):
    """Same data, different head settings, started together: both finish, the store stays sound,
    and promotion is decided one at a time (exactly one run saw no champion)."""
    results: dict[str, subprocess.CompletedProcess] = {}

    def train(name: str, epochs: str) -> None:
        results[name] = subprocess.run(
            train_args(tiny_dataset, f"head.epochs={epochs}", "finetune.stages=[]"),
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )

    threads = [threading.Thread(target=train, args=(name, epochs)) for name, epochs in (("a", "2"), ("b", "8"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, done in results.items():
        assert done.returncode == 0, f"{name}: {(done.stdout + done.stderr)[-4000:]}"
    db = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert len(client().search_model_versions(f"name = '{NAME}'")) == 2
    parents = sorted(
        (r for r in all_runs() if r.data.tags.get("vggflow.kind") == "training"), key=lambda r: r.info.end_time
    )
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    reasons = [r.data.tags["vggflow.promotion_reason"] for r in parents]  # both decisions logged
    assert sum("no champion yet" in reason for reason in reasons) == 1, reasons
    promoted = [r for r in parents if r.data.params["promotion.promoted"] == "True"]
    champion = str(client().get_model_version_by_alias(NAME, "champion").version)
    assert champion == promoted[-1].data.params["promotion.registered_version"]


@contextlib.contextmanager
def another_client_first(table: str, actions: list):
    """Make the store's check-then-insert race happen every time: just before this process inserts
    into ``table``, the next of ``actions`` runs (as another client would, between the check and
    the insert). Each action runs once, with nothing pending while it runs."""
    import sqlalchemy

    def before_insert(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith(f"INSERT INTO {table.upper()}") and actions:
            actions.pop(0)()

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", before_insert)
    try:
        yield
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", before_insert)


def test_a_dataset_logged_by_another_run_between_lookup_and_insert_is_linked_not_an_error(project):
    from mlflow.entities import Dataset, DatasetInput
    from mlflow.exceptions import MlflowException

    from vggflow.runs import log_dataset_inputs

    experiment_id = client().create_experiment("race")
    runs = [client().create_run(experiment_id).info.run_id for _ in range(4)]

    def the_same_new_dataset(index: int) -> list:
        return [DatasetInput(Dataset(name="data", digest=f"digest-{index}", source_type="local", source="{}"))]

    first = [lambda: client().log_inputs(runs[1], datasets=the_same_new_dataset(1))]
    with another_client_first("datasets", first), pytest.raises(MlflowException, match="(?i)unique"):
        client().log_inputs(runs[0], datasets=the_same_new_dataset(1))  # the plain call loses the race
    first = [lambda: client().log_inputs(runs[3], datasets=the_same_new_dataset(2))]
    with another_client_first("datasets", first):
        log_dataset_inputs(client(), runs[2], the_same_new_dataset(2))
    linked = [client().get_run(run).inputs.dataset_inputs for run in runs[2:]]
    assert [[item.dataset.digest for item in inputs] for inputs in linked] == [["digest-2"], ["digest-2"]]


def test_an_experiment_created_by_another_client_first_is_used_not_an_error(project):
    from vggflow.config import TrackingConfig
    from vggflow.tracking import connect

    client().search_experiments()  # the store exists (its own Default experiment is inserted)
    created: list[str] = []
    first = [lambda: created.append(client().create_experiment("vggflow"))]
    with another_client_first("experiments", first):
        _, experiment_id = connect(TrackingConfig(uri=os.environ["MLFLOW_TRACKING_URI"], experiment="vggflow"))
    assert created and experiment_id == created[0]


def test_dead_tracking_server_fails_fast_with_a_clear_message(project, tiny_dataset):
    env = os.environ | {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # nothing listens on the discard port
    started = time.monotonic()
    done = subprocess.run(train_args(tiny_dataset), cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert "not reachable" in done.stderr and "http://127.0.0.1:9" in done.stderr and "Traceback" not in done.stderr
    assert time.monotonic() - started < 60


def test_read_only_tracking_store_fails_fast(project, tiny_dataset):
    store = project / "readonly"
    store.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(store)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a read-only filesystem here (root is bypassing permissions otherwise): "
            f"{mounted.stderr.strip()}"
        )
    try:
        env = os.environ | {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db"}
        done = subprocess.run(
            train_args(tiny_dataset), cwd=project, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 3
        assert "not writable" in done.stderr and str(store) in done.stderr and "Traceback" not in done.stderr
    finally:
        subprocess.run(["umount", str(store)], check=False)


def test_hostile_file_names_train_end_to_end(project, tiny_dataset, prefect_server):
    """Spaces, unicode, leading dashes, shell metacharacters and very long names are just names."""
    from vggflow.flows.train import train_flow

    hostile = [
        "-rf --no-preserve-root.png",
        "spaced out  name.png",
        "ñandú_日本語.png",
        "$(touch pwned);`x`.png",
        "x" * 200 + ".png",
    ]
    for folder in sorted(tiny_dataset.iterdir()):
        for image, name in zip(sorted(folder.iterdir()), hostile):
            image.rename(folder / name)
    (tiny_dataset / "-class with dash").mkdir()
    for image in sorted((tiny_dataset / "class_2").iterdir()):
        image.rename(tiny_dataset / "-class with dash" / image.name)
    (tiny_dataset / "class_2").rmdir()
    (tiny_dataset / "class_0").rename(tiny_dataset / "007")  # a label that looks like a number stays text
    summary = train_flow(overrides=tiny_overrides(), data_dir=str(tiny_dataset))
    assert summary.model_version == "1"
    import mlflow

    assert mlflow.models.get_model_info(summary.model_uri).metadata["class_names"] == [
        "-class with dash",
        "007",
        "class_1",
    ]
    assert not (project / "pwned").exists()
    rows = summary.validation_summary
    assert "36 valid" in rows
