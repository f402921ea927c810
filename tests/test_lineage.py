"""`vggflow lineage`: a registered model's provenance, and its reproduction in a fresh clone.

A user's project as a real git + DVC repository (data pushed to a local DVC remote, the config
committed), trained with the real `vggflow` command; then `git clone`, and the commands the
lineage prints, run as printed: the same chosen freeze configuration and test metrics.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_overrides, write_dataset
from tests.test_retrain import dvc

pytestmark = pytest.mark.slow
VGGFLOW = [sys.executable, "-m", "vggflow.cli"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=120).stdout


def tiny_config() -> dict:
    """tiny_overrides() as a config file's content, one fine-tuning stage."""
    tree: dict = {}
    one_stage = "[{unfreeze_from: block5, learning_rate: 1.0e-4, epochs: 1}]"
    for override in tiny_overrides(**{"finetune.stages": one_stage}):
        key, _, value = override.partition("=")
        *sections, last = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = yaml.safe_load(value)
    return tree


@pytest.fixture(scope="module")
def environment(prefect_server) -> dict[str, str]:
    """A user's shell: this venv's commands on PATH, the session's Prefect server, each project its own stores."""
    from prefect.settings import PREFECT_API_URL

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_LOCAL_STORAGE_PATH")}
    return env | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_API_URL": PREFECT_API_URL.value(),
    }


def vggflow(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*VGGFLOW, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"vggflow {' '.join(args)}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def origin(tmp_path_factory, environment) -> Path:
    """A committed project: data/ in DVC (pushed to a remote beside it), configs/tiny.yaml."""
    root = tmp_path_factory.mktemp("lineage")
    project = root / "origin"
    project.mkdir()
    git(project, "init", "-q", "-b", "main")
    git(project, "config", "user.email", "t@example.com")
    dvc(project, "init", "-q")
    dvc(project, "config", "core.analytics", "false")
    dvc(project, "remote", "add", "-d", "storage", str(root / "dvc-storage"))
    write_dataset(project / "data")
    dvc(project, "add", "-q", "data")
    dvc(project, "push", "-q")
    (project / "configs").mkdir()
    (project / "configs" / "tiny.yaml").write_text(yaml.safe_dump(tiny_config()))
    (project / ".gitignore").write_text("/mlflow\n/.vggflow\n")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "data and config")
    return project


def test_lineage_names_everything_and_its_commands_reproduce_the_model_in_a_fresh_clone(origin, environment):
    trained = json.loads(vggflow(origin, environment, "train", "--config", "configs/tiny.yaml", "--json").stdout)
    version = trained["model_version"]

    found = json.loads(vggflow(origin, environment, "lineage", version, "--json").stdout)
    commit = git(origin, "rev-parse", "HEAD").strip()
    assert found["run"]["run_id"] == trained["run_id"] and found["aliases"] == ["champion"]
    assert found["code"]["git_commit"] == commit and found["code"]["git_dirty"] is False
    assert found["code"]["git_branch"] == "main" and found["code"]["code_version"]
    assert found["data"]["version"] == trained["data_version"] and found["data"]["dvc_file"] == "data.dvc"
    assert found["data"]["dvc_remote"].startswith("storage ") and found["data"]["dvc_remote"].endswith("dvc-storage")
    assert found["config_file"] == "configs/tiny.yaml" and found["config"]["head"]["epochs"] == 2
    assert found["freeze_configuration"] == trained["freeze_configuration"]
    assert found["backbone"]["identity"].startswith("random-seed42-") and found["backbone"]["random_init"]
    assert found["test_metrics"]["accuracy"] == pytest.approx(trained["test_metrics"]["accuracy"])
    assert found["promotion"]["promoted"] and found["promotion"]["status"] == "promoted"
    assert found["notes"] == []
    steps = found["reproduce"]["steps"]
    assert (
        steps[0] == f"git checkout {commit}"
        and steps[1] == "dvc pull data.dvc"
        and steps[-1].startswith("vggflow train --config ")
    )
    text = vggflow(origin, environment, "lineage", "@champion").stdout
    assert f"git checkout {commit}" in text and "  head:" in text and f"run         {trained['run_id']}" in text

    # The MLflow UI's User, Source and Version columns: MLflow's own system tags.
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(f"sqlite:///{origin / 'mlflow' / 'mlflow.db'}").get_run(trained["run_id"]).data.tags
    assert tags["mlflow.source.git.commit"] == commit and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and tags["mlflow.source.name"].startswith("vggflow train --config configs/tiny.yaml")

    # Follow the commands: save the config where the store is, clone, run the steps as printed.
    vggflow(origin, environment, *shlex.split(found["reproduce"]["save_config"])[1:])
    clone = origin.parent / "clone"
    git(origin.parent, "clone", "-q", str(origin), str(clone))
    (clone / found["reproduce"]["config_file"]).write_bytes((origin / found["reproduce"]["config_file"]).read_bytes())
    for step in steps[:-1]:
        subprocess.run(step, shell=True, cwd=clone, env=environment, check=True, capture_output=True, timeout=300)
    quiet = subprocess.run(
        f"{steps[-1]} --json -q", shell=True, cwd=clone, env=environment, capture_output=True, text=True, timeout=900
    )
    assert quiet.returncode == 0, quiet.stderr
    again = json.loads(quiet.stdout)  # stdout is the JSON document alone
    assert " | INFO " not in quiet.stderr  # -q: warnings and errors only
    assert again["data_version"] == trained["data_version"] and again["run_id"] != trained["run_id"]
    assert again["freeze_configuration"] == trained["freeze_configuration"]
    assert again["test_metrics"] == trained["test_metrics"]  # deterministic: the same numbers
    assert [s["best_val_accuracy"] for s in again["stages"]] == [s["best_val_accuracy"] for s in trained["stages"]]
    assert not again["decision"]["promoted"] and "--no-promote" in again["decision"]["reason"]
