"""dvc.yaml: `dvc repro`, `dvc exp run -S …`, `dvc exp show`, `dvc metrics show`, `dvc plots show`
on a real temporary DVC repository holding this repository's dvc.yaml, with Prefect (the session's
test server) still running each training."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, tiny_overrides, write_dataset
from tests.test_lineage import environment, git  # noqa: F401  (a fixture)
from tests.test_retrain import dvc
from vggflow.config import load_config

pytestmark = pytest.mark.slow


def dvc_json(cwd: Path, env: dict[str, str], *args: str):
    done = subprocess.run(["dvc", *args, "--json"], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def run(cwd: Path, env: dict[str, str], *args: str) -> str:
    done = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_dvc_runs_the_pipeline_and_its_experiments(tmp_path: Path, environment):  # noqa: F811
    project = tmp_path / "project"
    project.mkdir()
    git(project, "init", "-q", "-b", "main")
    git(project, "config", "user.email", "t@example.com")
    git(project, "config", "user.name", "t")
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    write_dataset(project / "data")
    dvc(project, "add", "-q", "data")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copyfile(PROJECT_ROOT / name, project / name)
    for folder in ("vggflow", "tasks", "flows"):  # the stage's code dependencies
        shutil.copytree(PROJECT_ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # A whole config (every section dvc.yaml names), tiny, the head alone: DVC's side is what is tested.
    params = load_config(overrides=[*tiny_overrides(), "finetune.stages=[]"], environ={})
    (project / "params.yaml").write_text(params.as_yaml())
    with open(project / ".gitignore", "a") as ignore:  # beside `dvc add`'s /data
        ignore.write("/mlflow\n/.vggflow\n")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "pipeline")

    run(project, environment, "dvc", "repro")
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and metrics["model_version"] == 1
    shown = dvc_json(project, environment, "metrics", "show")
    assert shown[""]["data"]["reports/metrics.json"]["data"]["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert "didn't change" in run(project, environment, "dvc", "repro")  # nothing changed: nothing runs
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "baseline results")

    run(project, environment, "dvc", "exp", "run", "-S", "head.learning_rate=0.002")
    experiments = dvc_json(project, environment, "exp", "show")
    runs = [e for row in experiments for e in [row, *(x for x in row.get("experiments") or [] for x in x["revs"])]]
    tried = [
        r["data"]
        for r in runs
        if r.get("data") and r["data"]["params"]["params.yaml"]["data"]["head"]["learning_rate"] == 0.002
    ]
    assert tried and "test" in tried[0]["metrics"]["reports/metrics.json"]["data"]
    assert tried[0]["metrics"]["reports/metrics.json"]["data"]["model_version"] == 2  # a second registered version

    plots = dvc_json(project, environment, "plots", "show", "--split")
    assert not plots.get("errors") and set(plots["data"]) == {
        "Learning curves (every stage, one step per epoch)",
        "Test confusion matrix",
    }
    curves = plots["data"]["Learning curves (every stage, one step per epoch)"][0]["anchor_definitions"]
    assert {"step", "val_accuracy"} <= set(curves["<DVC_METRIC_DATA>"][0])  # one row per epoch
    run(project, environment, "dvc", "plots", "show")
    assert (project / "dvc_plots" / "index.html").is_file()
