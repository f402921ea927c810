"""Where a registered model came from, and the commands that reproduce it (`vggflow lineage`).

Read from what every training records: the registered version's tags, its training run's tags,
params and artifacts (``config/effective_config.yaml``, ``promotion/decision.json``). Training is
deterministic for the same code, data, config, seed and backbone weights on the same kind of
machine (TensorFlow's op determinism, seeded shuffles and initial weights), so following
:attr:`Lineage.reproduce` in a clone gives the same chosen freeze configuration and test metrics.
Where it cannot: other package versions (listed here) or another CPU instruction set (oneDNN
picks kernels per CPU, e.g. AVX2 vs AVX-512) can change the last digits of the numbers, and with
them, rarely, a choice between close stages.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from vggflow import mlflow_tags
from vggflow.errors import VggflowError
from vggflow.registry import CHAMPION, json_tag

#: The test metrics shown first (every ``test_*`` metric of the run is in the JSON).
MAIN_METRICS = ("accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall")
#: The module whose code version identifies the training code (as recorded by ``tasks/track.py``).
TRAINING_FLOW = "vggflow.flows.train"


class Reproduction(BaseModel):
    """The commands that reproduce a version: save its config, then in a clone of the project, the steps."""

    config_file: str
    save_config: str  # run where the tracking store is reachable
    clone: str | None  # when the project's git remote is known
    steps: list[str]  # in the clone: the code, the data, the training


class Lineage(BaseModel):
    """A registered version's provenance: run, code, data, config, choice, metrics, decision."""

    model_name: str
    version: str
    aliases: list[str]
    model_uri: str
    logged_model_uri: str | None
    created: str
    run: dict[str, Any]
    code: dict[str, Any]
    data: dict[str, Any]
    config_file: str | None
    config: dict[str, Any] | None
    freeze_configuration: dict[str, Any]
    backbone: dict[str, Any]
    test_metrics: dict[str, float]
    promotion: dict[str, Any]
    reproduce: Reproduction
    notes: list[str]


def resolve_version(client, name: str, reference: str):
    """A ``ModelVersion`` from a number (``3``) or an alias (``champion``, ``@champion``).

    Raises:
        VggflowError: no such version or alias.
    """
    from mlflow.exceptions import MlflowException

    try:
        if reference.isdigit():
            return client.get_model_version(name, reference)
        return client.get_model_version_by_alias(name, reference.removeprefix("@"))
    except MlflowException:
        raise VggflowError(
            f"{name} has no version or alias {reference!r} (see `vggflow registry`; e.g. 3 or @{CHAMPION})"
        ) from None


def _artifact(client, run_id: str, path: str) -> str | None:
    """The text of a run artifact, or None when it is missing."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as folder:
        try:
            return Path(client.download_artifacts(run_id, path, folder)).read_text(encoding="utf-8")
        except (MlflowException, OSError):
            return None


def lineage(client, name: str, reference: str) -> Lineage:
    """The lineage of version (or alias) ``reference`` of ``name``.

    Raises:
        VggflowError: no such version.
    """
    from mlflow.exceptions import MlflowException

    from vggflow.caching import code_version

    version = resolve_version(client, name, reference)
    vtags = version.tags or {}
    run_id = version.run_id or vtags.get(mlflow_tags.RUN_ID)
    try:
        run = client.get_run(run_id) if run_id else None
    except MlflowException:
        run = None
    tags = run.data.tags if run else {}
    params = run.data.params if run else {}
    metrics = run.data.metrics if run else {}
    aliases = sorted(a for a, v in client.get_registered_model(name).aliases.items() if str(v) == str(version.version))
    config_text = _artifact(client, run_id, "config/effective_config.yaml") if run else None
    decision_text = _artifact(client, run_id, "promotion/decision.json") if run else None
    dirty = tags.get(mlflow_tags.GIT_DIRTY)
    code = {
        "git_commit": tags.get(mlflow_tags.MLFLOW_GIT_COMMIT) or vtags.get(mlflow_tags.GIT_COMMIT),
        "git_dirty": None if dirty in (None, "unknown") else dirty == "true",
        "git_branch": tags.get(mlflow_tags.MLFLOW_GIT_BRANCH),
        "git_repo_url": tags.get(mlflow_tags.MLFLOW_GIT_REPO_URL),
        "vggflow_version": tags.get(mlflow_tags.VERSION),
        "code_version": tags.get(mlflow_tags.CODE_VERSION),
        "installed_code_version": code_version(TRAINING_FLOW),
        "packages": {k.removeprefix("package."): v for k, v in sorted(params.items()) if k.startswith("package.")},
    }
    matches = tags.get(mlflow_tags.DATA_MATCHES_DVC)
    data = {
        "version": vtags.get(mlflow_tags.DATA_VERSION) or tags.get(mlflow_tags.DATA_VERSION),
        "dvc_file": tags.get(mlflow_tags.DVC_FILE),
        "dvc_remote": tags.get(mlflow_tags.DVC_REMOTE),
        "matched_dvc_file": None if matches in (None, "unknown") else matches == "true",
        "data_dir": params.get("data.dir"),
    }
    decision = json_tag(decision_text) or {}
    promotion = {
        "status": vtags.get(mlflow_tags.PROMOTION),
        "promoted": decision.get("promoted"),
        "reason": decision.get("reason") or tags.get(mlflow_tags.PROMOTION_REASON),
        "compared_with_champion": decision.get("champion_version"),
        "rejection_reason": vtags.get(mlflow_tags.REJECTION_REASON),
        "manual_promotion_reason": vtags.get(mlflow_tags.MANUAL_PROMOTION_REASON),
        "rollback": json_tag(vtags.get(mlflow_tags.ROLLBACK)),
    }
    test_metrics = {k.removeprefix("test_"): v for k, v in metrics.items() if k.startswith("test_")}
    if not test_metrics:
        prefix = mlflow_tags.TEST_METRIC_PREFIX
        test_metrics = {k.removeprefix(prefix): float(v) for k, v in vtags.items() if k.startswith(prefix)}
    config = yaml.safe_load(config_text) if config_text else None
    reproduce = reproduction(name, str(version.version), code, data)
    return Lineage(
        model_name=name,
        version=str(version.version),
        aliases=aliases,
        model_uri=f"models:/{name}/{version.version}",
        logged_model_uri=version.source,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(version.creation_timestamp / 1000)),
        run={
            "run_id": run_id,
            "experiment_id": run.info.experiment_id if run else None,
            "status": run.info.status if run else "deleted or unreadable",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(run.info.start_time / 1000))
            if run
            else None,
            "user": tags.get(mlflow_tags.MLFLOW_USER),
            "source": tags.get(mlflow_tags.MLFLOW_SOURCE_NAME),
            "prefect_flow_run_id": tags.get(mlflow_tags.PREFECT_FLOW_RUN_ID),
        },
        code=code,
        data=data,
        config_file=tags.get(mlflow_tags.CONFIG_FILE),
        config=config,
        freeze_configuration=json_tag(vtags.get(mlflow_tags.FREEZE_CONFIGURATION)) or {},
        backbone={
            "identity": tags.get(mlflow_tags.BACKBONE_WEIGHTS) or params.get("backbone.weights_identity"),
            "weights": params.get("backbone.weights"),
            "random_init": (tags.get(mlflow_tags.RANDOM_INIT) or vtags.get(mlflow_tags.RANDOM_INIT)) == "true",
        },
        test_metrics=test_metrics,
        promotion=promotion,
        reproduce=reproduce,
        notes=lineage_notes(code, data, config, run is not None),
    )


def reproduction(name: str, version: str, code: dict[str, Any], data: dict[str, Any]) -> Reproduction:
    """Save the run's effective config; in a clone: check out the commit, pull the data version, train.

    The training registers a new version without moving aliases (``--no-promote``): a
    reproduction must not change which model is served.
    """
    config_file = f"{name}-v{version}.yaml"
    steps = []
    if code["git_commit"] and code["git_commit"] != "unknown":
        steps.append(f"git checkout {code['git_commit']}")
    if data["dvc_file"] and not str(data["version"]).startswith("untracked-"):
        steps.append(f"dvc pull {data['dvc_file']}")
    steps.append(f"vggflow train --config {config_file} --no-promote")
    clone = f"git clone {code['git_repo_url']} {name}-v{version}" if code["git_repo_url"] else None
    return Reproduction(
        config_file=config_file,
        save_config=f"vggflow lineage {version} --save-config {config_file}",
        clone=clone,
        steps=steps,
    )


def lineage_notes(code: dict[str, Any], data: dict[str, Any], config: dict | None, have_run: bool) -> list[str]:
    """What stands in the way of an exact reproduction, one sentence each."""
    notes = []
    if not have_run:
        notes.append("the training run is deleted or unreadable: only the version's own tags are known")
    if code["git_commit"] in (None, "unknown"):
        notes.append("it was not trained in a git repository: the code cannot be checked out")
    if code["git_dirty"]:
        notes.append("the working tree had uncommitted changes: the commit alone is not the code that trained it")
    if code["code_version"] and code["code_version"] != code["installed_code_version"]:
        notes.append(
            f"the installed vggflow code (code version {code['installed_code_version']}) differs from the code "
            f"that trained it ({code['code_version']}, vggflow {code['vggflow_version']}): install that one"
        )
    if str(data["version"]).startswith("untracked-"):
        notes.append("its data was not versioned with DVC: the exact images cannot be pulled")
    elif data["matched_dvc_file"] is False:
        notes.append(f"the data folder did not match {data['dvc_file']} when it trained")
    if config and Path(str(config.get("data", {}).get("dir", ""))).is_absolute():
        notes.append(f"data.dir is an absolute path ({config['data']['dir']}): a clone trains on that folder")
    return notes
