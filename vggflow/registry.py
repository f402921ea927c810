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

import getpass
import json
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from vggflow import mlflow_tags
from vggflow.errors import VggflowError

if TYPE_CHECKING:
    import pandas as pd

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"


class Rollback(BaseModel):
    """A rollback as recorded on the rolled-back version and the registered model.

    ``vggflow retrain`` does not train on ``data_version`` again until the data changes (or
    ``--force``): the model trained on it was just judged worse than the one restored.
    """

    rolled_back_version: str | None
    restored_version: str
    data_version: str | None
    reason: str
    by: str
    at: str

    def describe(self) -> str:
        """One line: which version, on which data, by whom, when, why."""
        data = f" (trained on data version {self.data_version})" if self.data_version else ""
        return (
            f"v{self.rolled_back_version}{data} rolled back to v{self.restored_version} "
            f"by {self.by} at {self.at}: {self.reason}"
        )


def current_user() -> str:
    """``user@host`` of this process, for the records of manual registry operations."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no USER variable (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


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
        _clear_rollback(client, name, str(version))
        if _alias_version(client, name, CHALLENGER) == str(version):
            client.delete_registered_model_alias(name, CHALLENGER)
    return former


def rollback(client, name: str, lock, reason: str, by: str | None = None) -> Rollback:
    """Move ``champion`` back to ``previous`` under ``lock`` (:func:`promotion_lock`); the rolled-back
    version becomes ``previous``.

    Rolling back twice is therefore an undo (it clears the first rollback's record). The rollback
    is recorded (:class:`Rollback`) as a tag of the rolled-back version and of the registered model.

    Args:
        reason: why (recorded).
        by: who (default: this process's ``user@host``).

    Raises:
        VggflowError: there is no ``previous`` version.
    """
    with lock:
        current, restored = _alias_version(client, name, CHAMPION), _alias_version(client, name, PREVIOUS)
        if restored is None:
            raise VggflowError(f"{name} has no @previous version to roll back to (see `vggflow registry`)")
        data_version = None
        if current is not None:
            data_version = (client.get_model_version(name, current).tags or {}).get(mlflow_tags.DATA_VERSION)
        record = Rollback(
            rolled_back_version=current,
            restored_version=restored,
            data_version=data_version,
            reason=reason,
            by=by or current_user(),
            at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        client.set_registered_model_alias(name, CHAMPION, restored)
        _clear_rollback(client, name, restored)
        if current is not None:
            client.set_registered_model_alias(name, PREVIOUS, current)
            client.set_model_version_tag(name, current, mlflow_tags.PROMOTION, "rolled back")
            client.set_model_version_tag(name, current, mlflow_tags.ROLLBACK, record.model_dump_json())
        client.set_registered_model_tag(name, mlflow_tags.LAST_ROLLBACK, record.model_dump_json())
    return record


def _clear_rollback(client, name: str, version: str) -> None:
    """A version made @champion again is no longer rolled back (its data may be retrained on)."""
    if mlflow_tags.ROLLBACK in (client.get_model_version(name, version).tags or {}):
        client.delete_model_version_tag(name, version, mlflow_tags.ROLLBACK)


def last_rollback(client, name: str) -> Rollback | None:
    """The latest rollback of ``name`` as recorded on the registered model, or None."""
    from mlflow.exceptions import MlflowException

    try:
        text = (client.get_registered_model(name).tags or {}).get(mlflow_tags.LAST_ROLLBACK)
        return Rollback.model_validate_json(text) if text else None
    except (MlflowException, ValueError):
        return None


def rollbacks_in_force(client, name: str) -> list[Rollback]:
    """The recorded rollbacks of versions that are still rolled back, newest first."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    records = []
    for version in versions:
        try:
            records.append(Rollback.model_validate_json((version.tags or {})[mlflow_tags.ROLLBACK]))
        except (KeyError, ValueError):  # not rolled back, or a tag edited by hand into nonsense
            continue
    return sorted(records, key=lambda r: r.at, reverse=True)


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def registry_versions(client, name: str) -> list[dict]:
    """Every version of ``name``, newest first: aliases, test metrics, data version, freeze configuration, decision.

    Raises:
        VggflowError: the registry cannot be read.
    """
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
        freeze = json_tag(tags.get(mlflow_tags.FREEZE_CONFIGURATION)) or {}
        rows.append(
            {
                "version": str(v.version),
                "aliases": sorted(by_version.get(str(v.version), [])),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(v.creation_timestamp / 1000)),
                "test_metrics": {
                    key: _number(tags.get(mlflow_tags.test_metric(key))) for key in ("accuracy", "macro_f1")
                },
                "data_version": tags.get(mlflow_tags.DATA_VERSION),
                "freeze_configuration": freeze,
                "promotion": tags.get(mlflow_tags.PROMOTION),
                "rollback": json_tag(tags.get(mlflow_tags.ROLLBACK)),
                "run_id": v.run_id,
                "model_uri": f"models:/{name}/{v.version}",
            }
        )
    return rows


def json_tag(text: str | None):
    """A tag holding JSON, parsed; None when absent or not JSON (a tag edited by hand)."""
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def registry_table(client, name: str) -> pd.DataFrame:
    """:func:`registry_versions` as the table `vggflow registry` prints.

    Raises:
        VggflowError: the registry cannot be read.
    """
    import pandas as pd

    def shown(value) -> str:
        return "?" if value is None else f"{value:.6f}"

    return pd.DataFrame(
        [
            {
                "version": row["version"],
                "aliases": ",".join(row["aliases"]) or "-",
                "created": row["created"][:16].replace("T", " "),
                "test_accuracy": shown(row["test_metrics"]["accuracy"]),
                "test_macro_f1": shown(row["test_metrics"]["macro_f1"]),
                "data_version": row["data_version"] or "?",
                "freeze": row["freeze_configuration"].get("stage", "?"),
                "promotion": row["promotion"] or "-",
                "run_id": row["run_id"] or "-",
            }
            for row in registry_versions(client, name)
        ]
    )
