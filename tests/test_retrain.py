"""Retraining: DVC data version vs the champion's, `dvc pull`, skip, retrain + gate, feature cache.

Unit tests of the pure decision, then one real DVC repository (git + dvc + a local remote) in a
temporary folder, a real Prefect test server and a real MLflow sqlite store, shared by the slow
tests of this module: its fixture trains the first champion; each test leaves the data at a
version some registered model was trained on, so the tests do not depend on their order.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_image, tiny_overrides, write_dataset
from vggflow.config import DataConfig
from vggflow.errors import DataError
from vggflow.registry import Rollback
from vggflow.tasks.sync_data import (
    RegistryState,
    VersionRef,
    _retry_unless_user_error,
    decide_retrain,
    pull_data,
    read_data_state,
    tracked_version,
)
from vggflow.tracking import read_dvc_md5

MODEL = "vgg19-classifier"


def dvc(cwd: Path, *args: str) -> None:
    """Run the real `dvc` CLI of this venv in ``cwd``."""
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=True, capture_output=True, timeout=300)


def make_dvc_project(root: Path) -> Path:
    """A git + DVC repository with ``data/`` (3 classes x 12 images) added and pushed to a local remote."""
    root.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc(root, "init", "-q")
    dvc(root, "config", "core.analytics", "false")
    dvc(root, "config", "core.check_update", "false")
    dvc(root, "remote", "add", "-d", "local", str(root.parent / f"{root.name}-remote"))
    write_dataset(root / "data")
    dvc(root, "add", "-q", "data")
    dvc(root, "push", "-q")
    return root


def current_md5(project: Path) -> str:
    return read_dvc_md5(project / "data.dvc")[0]


# --------------------------------------------------------------------------- pure decision


def ref(version: str, data_version: str) -> VersionRef:
    return VersionRef(version=version, data_version=data_version)


def test_decision_trains_without_champion_and_on_new_data():
    first = decide_retrain("v1.dir", RegistryState(model_name=MODEL), force=False)
    assert first.retrain and "no @champion" in first.reason
    new = decide_retrain("v2.dir", RegistryState(model_name=MODEL, champion=ref("1", "v1.dir")), force=False)
    assert new.retrain and new.champion_data_version == "v1.dir" and "new data version v2.dir" in new.reason


def test_decision_skips_unchanged_data_unless_forced():
    registry = RegistryState(model_name=MODEL, champion=ref("3", "v1.dir"))
    skip = decide_retrain("v1.dir", registry, force=False)
    assert not skip.retrain and skip.reason.startswith("skipped: data unchanged (version v1.dir")
    forced = decide_retrain("v1.dir", registry, force=True)
    assert forced.retrain and "forced" in forced.reason


def test_decision_does_not_retrain_on_data_the_gate_already_rejected():
    # v4 was trained on v2.dir and rejected: the same data will not produce a better model tonight.
    registry = RegistryState(model_name=MODEL, champion=ref("3", "v1.dir"), challenger=ref("4", "v2.dir"))
    decision = decide_retrain("v2.dir", registry, force=False)
    assert (
        not decision.retrain
        and decision.reason.startswith("skipped: data unchanged (version v2.dir")
        and "rejected" in decision.reason
    )
    # An older rejected challenger does not count (the champion moved on since).
    older = RegistryState(model_name=MODEL, champion=ref("5", "v3.dir"), challenger=ref("4", "v2.dir"))
    assert decide_retrain("v2.dir", older, force=False).retrain


def test_decision_skips_a_rolled_back_data_version_until_the_data_changes():
    record = Rollback(
        rolled_back_version="5",
        restored_version="4",
        data_version="v2.dir",
        reason="wrong labels",
        by="ana@lab",
        at="2026-12-01T10:00:00+0000",
    )
    registry = RegistryState(model_name=MODEL, champion=ref("4", "v1.dir"), rolled_back=[record])
    skip = decide_retrain("v2.dir", registry, force=False)
    assert not skip.retrain and skip.reason.startswith("skipped: data version v2.dir was rolled back (v5 (")
    assert "by ana@lab" in skip.reason and "wrong labels" in skip.reason and "--force" in skip.reason
    assert decide_retrain("v2.dir", registry, force=True).retrain
    assert decide_retrain("v3.dir", registry, force=False).retrain


def test_the_skip_path_reads_the_registry_aliases_without_heavy_imports():
    """A skipped run stays cheap: the aliases come from vggflow.registry, which imports no ML library."""
    code = (
        "import sys, vggflow.tasks.sync_data; "
        "print(sorted(m for m in ('sklearn', 'tensorflow', 'keras', 'mlflow', 'pandas') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_tracked_version_errors_are_user_errors(tmp_path: Path):
    with pytest.raises(DataError, match="missing or unreadable"):
        tracked_version(tmp_path / "data.dvc", tmp_path / "data")
    (tmp_path / "data.dvc").write_text("outs:\n- md5: abc.dir\n  path: other\n")
    with pytest.raises(DataError, match="not the configured data folder"):
        tracked_version(tmp_path / "data.dvc", tmp_path / "data")
    assert tracked_version(tmp_path / "data.dvc", tmp_path / "other") == "abc.dir"


def test_pull_retries_transfer_errors_only():
    from prefect.states import Failed

    assert _retry_unless_user_error(None, None, Failed(data=OSError("connection reset")))
    assert not _retry_unless_user_error(None, None, Failed(data=DataError("local files would be overwritten")))


def test_skip_path_does_not_import_training_modules():
    code = (
        "import sys, vggflow.flows.retrain; print(sorted(m for m in ('tensorflow', 'sklearn', "
        "'vggflow.flows.train') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_local_unsaved_files_are_never_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    project = make_dvc_project(tmp_path / "repo")
    monkeypatch.chdir(project)
    # New content (not in the DVC cache): DVC would have to delete it to check out data.dvc.
    extra = project / "data" / "class_0" / "new_label.png"
    make_image(0, 999).save(extra)
    (project / "data" / "class_2" / "img_000.png").unlink()
    state = read_data_state(DataConfig())
    assert not state.matches and "modified" in state.changes
    with pytest.raises(DataError, match="not in data.dvc.*new_label.png.*dvc add data"):
        pull_data(state)
    assert extra.exists()  # the un-versioned image survived


# --------------------------------------------------------------------------- real runs


def run_retrain(*extra: str, force: bool = False):
    """Run the retraining flow in-process; returns (outcome, flow run id, seconds)."""
    from vggflow.flows.retrain import retrain_flow

    started = time.perf_counter()
    state = retrain_flow(overrides=tiny_overrides() + list(extra), force=force, return_state=True)
    seconds = time.perf_counter() - started
    return state.result(), state.state_details.flow_run_id, seconds


def task_states(flow_run_id) -> dict[str, str]:
    """Task name → state name of the task runs of a flow run (names without Prefect's suffix)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
        )
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in runs}


def subflow_runs(flow_run_id) -> list:
    """The flow runs started by a flow run (the training flow, when it trained)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )


def flow_logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def registry_counts():
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    return len(runs), len(client.search_model_versions(f"name='{MODEL}'"))


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory, prefect_server):
    """A DVC project whose current data version has a champion (the first retrain trains it)."""
    project = make_dvc_project(tmp_path_factory.mktemp("retrain") / "project")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
        outcome, _, seconds = run_retrain()
        print(f"first retrain (no champion): {seconds:.1f} s")
        assert not outcome.skipped and "no @champion" in outcome.reason
        assert outcome.training["decision"]["promoted"]
        assert outcome.training["data_version"] == current_md5(project)
        yield project


@pytest.mark.slow
def test_unchanged_data_is_skipped_quickly_without_training(trained_project: Path, capsys):
    from vggflow.cli import main

    before = registry_counts()
    outcome, flow_run_id, seconds = run_retrain()
    print(f"skip (in-process, server up): {seconds:.1f} s")
    md5 = current_md5(trained_project)
    assert outcome.skipped and outcome.training is None
    assert outcome.reason.startswith(f"skipped: data unchanged (version {md5}")
    deadline = time.monotonic() + 60  # logs reach the API in batches
    while f"skipped: data unchanged (version {md5}" not in flow_logs(flow_run_id):
        assert time.monotonic() < deadline, flow_logs(flow_run_id)
        time.sleep(2)
    assert subflow_runs(flow_run_id) == [] and seconds < 60
    # The CLI says so and exits 0.
    capsys.readouterr()
    assert main(["retrain", *sum((["--set", o] for o in tiny_overrides()), [])]) == 0
    assert f"vggflow retrain: skipped: data unchanged (version {md5}" in capsys.readouterr().out
    assert registry_counts() == before  # no MLflow run, no registered version


@pytest.mark.slow
def test_deleted_data_is_restored_with_dvc_pull(trained_project: Path):
    data = trained_project / "data"
    shutil.rmtree(data / "class_0")
    (data / "class_1" / "img_003.png").unlink()
    outcome, flow_run_id, _ = run_retrain()
    assert outcome.data.pulled and outcome.skipped
    assert (data / "class_0" / "img_000.png").exists() and (data / "class_1" / "img_003.png").exists()
    assert task_states(flow_run_id)["dvc-pull"] == "Completed"
    assert read_data_state(DataConfig()).matches


@pytest.mark.slow
def test_same_data_new_head_learning_rate_reuses_cached_features(trained_project: Path):
    outcome, flow_run_id, seconds = run_retrain("head.learning_rate=0.002", force=True)
    print(f"forced re-run, new head lr: {seconds:.1f} s")
    assert not outcome.skipped and "forced" in outcome.reason
    (training,) = subflow_runs(flow_run_id)
    states = task_states(training.id)
    assert states["extract-features"] == "Cached", states
    assert states["train-head"] == "Completed", states  # the head changed: trained again
    assert outcome.training["data_version"] == current_md5(trained_project)


@pytest.mark.slow
def test_head_only_reruns_reuse_the_head_and_score_from_cached_test_features(trained_project: Path):
    """Iterating on the head alone (no stages) on the same data: the head trained with the
    stages is reused (its key does not depend on the stages' prefix layers); a new head's test
    images are scored from their cached pooled features, checked against the whole model."""
    from mlflow.tracking import MlflowClient

    outcome, flow_run_id, _ = run_retrain("finetune.stages=[]", force=True)
    (training,) = subflow_runs(flow_run_id)
    assert task_states(training.id)["train-head"] == "Cached"
    assert outcome.training["freeze_configuration"]["stage"] == "head"

    outcome, flow_run_id, _ = run_retrain("finetune.stages=[]", "head.learning_rate=0.004", force=True)
    (training,) = subflow_runs(flow_run_id)
    states = task_states(training.id)
    assert states["train-head"] == "Completed" and states["extract-features"] == "Cached", states
    tags = MlflowClient().get_run(outcome.training["run_id"]).data.tags
    assert tags["vggflow.test_scored_from"].startswith("cached avg_pool of the test images ("), tags[
        "vggflow.test_scored_from"
    ]


@pytest.mark.slow
def test_new_images_are_retrained_and_gated(trained_project: Path):
    from mlflow.tracking import MlflowClient

    old = current_md5(trained_project)
    write_dataset(trained_project / "data", per_class=4, start=100)
    dvc(trained_project, "add", "-q", "data")
    dvc(trained_project, "push", "-q")
    new = current_md5(trained_project)
    assert new != old

    outcome, _, _ = run_retrain()
    assert not outcome.skipped and outcome.reason.startswith(f"training: new data version {new}")
    training = outcome.training
    assert training["data_version"] == new
    client = MlflowClient()
    alias = "champion" if training["decision"]["promoted"] else "challenger"
    gated = client.get_model_version_by_alias(MODEL, alias)
    assert str(gated.version) == training["model_version"] and gated.tags["vggflow.data_version"] == new

    # The next night, nothing changed: skipped, whatever the gate decided.
    again, _, _ = run_retrain()
    assert again.skipped and again.reason.startswith(f"skipped: data unchanged (version {new}")


@pytest.mark.slow
def test_a_rollback_sticks_until_the_data_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_server, capsys
):
    """After `vggflow rollback`, the nightly retrain does not retrain on the data it rolled back from."""
    from mlflow.tracking import MlflowClient

    from vggflow.cli import main
    from vggflow.config import Config
    from vggflow.tasks.sync_data import read_registry_state
    from vggflow.tracking import connect

    project = make_dvc_project(tmp_path / "repo")
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow' / 'mlflow.db'}")
    client, experiment_id = connect(Config().tracking)
    md5 = current_md5(project)
    client.create_registered_model(MODEL)
    for data_version in ("older.dir", md5):  # v1 on older data, v2 on the current data
        run_id = client.create_run(experiment_id).info.run_id
        client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id, tags={"vggflow.data_version": data_version})
    client.set_registered_model_alias(MODEL, "previous", "1")
    client.set_registered_model_alias(MODEL, "champion", "2")

    assert main(["rollback", "--reason", "class_1 photos were mislabelled"]) == 0
    assert f"`vggflow retrain` skips data version {md5}" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    model_tags = MlflowClient().get_registered_model(MODEL).tags
    assert json.loads(model_tags["vggflow.last_rollback"])["data_version"] == md5

    before = registry_counts()
    outcome, flow_run_id, _ = run_retrain()
    assert outcome.skipped and outcome.reason.startswith(f"skipped: data version {md5} was rolled back (v2 (")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as prefect:  # the reason, as the flow run's artifact in the Prefect UI
        (artifact,) = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert artifact.key == "vgg19-classifier-retrain" and "was rolled back" in artifact.data
    assert "class_1 photos were mislabelled" in outcome.reason and registry_counts() == before
    assert main(["retrain"]) == 0
    assert "was rolled back" in capsys.readouterr().out and registry_counts() == before

    registry = read_registry_state(client, MODEL)
    assert decide_retrain(md5, registry, force=True).retrain
    make_image(1, 500).save(project / "data" / "class_1" / "relabelled.png")
    dvc(project, "add", "-q", "data")
    assert decide_retrain(current_md5(project), registry, force=False).retrain  # new data: trains again
