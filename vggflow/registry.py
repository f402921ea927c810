"""The model registry's aliases and the manual operations on them: list, promote by hand, roll back.

A registered model has at most one version per alias: ``@champion`` (what `vggflow predict`
serves), ``@previous`` (the champion before it, what a rollback restores) and ``@challenger``
(the newest candidate the promotion gate rejected). The gate itself (``tasks/promote.py``) and
the commands ``vggflow registry``, ``vggflow promote`` and ``vggflow rollback`` move them under
one :func:`promotion_lock`.

Cheap to import (the retraining's skip path reads the aliases): MLflow, pandas, filelock and
psycopg are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vggflow import mlflow_tags
from vggflow.errors import VggflowError

if TYPE_CHECKING:
    import pandas as pd

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"


def current_champion(client, name: str):
    """The ``@champion`` version of ``name``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def promotion_lock(lock_dir: Path, lock_url: str | None = None, model_name: str = ""):
    """A lock held while one run reads the champion, compares and moves aliases.

    Two runs finishing together (the scheduler and a manual run) would otherwise both compare
    against the same champion and the last writer would win, whatever the metrics. With
    ``lock_url`` (``registry.lock_url``: a shared registry), a PostgreSQL advisory lock named
    after the model that every client of that database shares, on any machine
    (:class:`vggflow.locks.AdvisoryLock`). Otherwise a file lock beside a sqlite store (see
    :func:`vggflow.tracking.lock_dir`), shared by every process using that store on this machine.
    """
    if lock_url:
        from vggflow.locks import AdvisoryLock

        return AdvisoryLock(lock_url, f"vggflow-promotion:{model_name}")
    from filelock import FileLock

    lock_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_dir / "promotion.lock"), timeout=3600)


def promote_manually(client, name: str, version: str, reason: str, lock) -> str | None:
    """Make ``version`` the champion by hand (the former champion becomes ``previous``), under ``lock``
    (:func:`promotion_lock`).

    Returns the former champion's version, if any.

    Raises:
        VggflowError: ``name`` has no such version.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(name, str(version))
    except MlflowException:
        raise VggflowError(f"{name} has no version {version} (see `vggflow registry`)") from None
    with lock:
        champion = current_champion(client, name)
        former = str(champion.version) if champion is not None else None
        if former == str(version):
            return former
        if former is not None:
            client.set_registered_model_alias(name, PREVIOUS, former)
        client.set_registered_model_alias(name, CHAMPION, str(version))
        client.set_model_version_tag(name, str(version), mlflow_tags.PROMOTION, "manual")
        client.set_model_version_tag(name, str(version), mlflow_tags.MANUAL_PROMOTION_REASON, reason)
        if _alias_version(client, name, CHALLENGER) == str(version):
            client.delete_registered_model_alias(name, CHALLENGER)
    return former


def rollback(client, name: str, lock) -> tuple[str, str]:
    """Move ``champion`` back to ``previous`` under ``lock``; the rolled-back version becomes ``previous``.

    Rolling back twice is therefore an undo. Returns ``(rolled_back_from, restored)``.

    Raises:
        VggflowError: there is no ``previous`` version.
    """
    with lock:
        current, restored = _alias_version(client, name, CHAMPION), _alias_version(client, name, PREVIOUS)
        if restored is None:
            raise VggflowError(f"{name} has no @previous version to roll back to (see `vggflow registry`)")
        client.set_registered_model_alias(name, CHAMPION, restored)
        if current is not None:
            client.set_registered_model_alias(name, PREVIOUS, current)
            client.set_model_version_tag(name, current, mlflow_tags.PROMOTION, "rolled back")
    return current or "none", restored


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def registry_table(client, name: str) -> pd.DataFrame:
    """One row per version: aliases, metrics, data version, freeze configuration, decision.

    Raises:
        VggflowError: the registry cannot be read.
    """
    import pandas as pd
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
        # Search results do not carry aliases; the registered model does.
        aliases = client.get_registered_model(name).aliases if versions else {}
    except MlflowException as err:
        raise VggflowError(f"cannot read the registry for {name}: {err}") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = v.tags or {}
        try:
            freeze = json.loads(tags.get(mlflow_tags.FREEZE_CONFIGURATION, "{}")).get("stage", "?")
        except ValueError:
            freeze = "?"
        rows.append(
            {
                "version": str(v.version),
                "aliases": ",".join(sorted(by_version.get(str(v.version), []))) or "-",
                "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
                "test_accuracy": tags.get(mlflow_tags.test_metric("accuracy"), "?"),
                "test_macro_f1": tags.get(mlflow_tags.test_metric("macro_f1"), "?"),
                "data_version": tags.get(mlflow_tags.DATA_VERSION, "?"),
                "freeze": freeze,
                "promotion": tags.get(mlflow_tags.PROMOTION, "-"),
                "run_id": v.run_id or "-",
            }
        )
    return pd.DataFrame(rows)
