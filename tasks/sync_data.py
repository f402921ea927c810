"""Retraining step 0: which data version is current, is ``data/`` on it, and is it new?

The data version is the md5 that ``dvc add`` wrote into ``data.dvc``. When the data folder does
not match it (a fresh machine, deleted files, a new ``data.dvc`` from git), it is restored with
``dvc pull`` — DVC never overwrites files it has not saved, so local, un-added images stop the run
with a message instead of being lost. The version is then compared with the data version tagged
on the registered ``@champion`` (and on a rejected, newer ``@challenger``, and on versions rolled
back with ``vggflow rollback``): training only runs when the data is new or the run is forced.

Nothing here imports TensorFlow or scikit-learn: a skipped run must stay cheap.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from pydantic import BaseModel

from vggflow import mlflow_tags
from vggflow.config import DataConfig, TrackingConfig
from vggflow.errors import DataError, VggflowError
from vggflow.registry import CHALLENGER, CHAMPION, Rollback, rollbacks_in_force
from vggflow.tracking import read_dvc_md5


class DataState(BaseModel):
    """The current data version and whether the data folder holds it."""

    dvc_file: Path
    data_dir: Path
    version: str
    matches: bool
    changes: str = ""
    pulled: bool = False


class VersionRef(BaseModel):
    """A registered model version and the data version it was trained on."""

    version: str
    data_version: str | None
    run_id: str | None = None
    rejection_reason: str | None = None


class RegistryState(BaseModel):
    """The aliased versions that tell whether the current data was already used."""

    model_name: str
    champion: VersionRef | None = None
    challenger: VersionRef | None = None
    rolled_back: list[Rollback] = []  # newest first


class RetrainDecision(BaseModel):
    """Whether to train, and the one-line reason (logged, returned, printed)."""

    retrain: bool
    reason: str
    data_version: str
    champion_version: str | None = None
    champion_data_version: str | None = None


# --------------------------------------------------------------------------- pure functions


def tracked_version(dvc_file: Path, data_dir: Path) -> str:
    """The md5 recorded in ``dvc_file``, after checking it tracks ``data_dir``.

    Raises:
        DataError: the DVC file is missing/unreadable or tracks another folder.
    """
    tracked = read_dvc_md5(Path(dvc_file))
    if tracked is None:
        raise DataError(
            f"retraining compares DVC data versions, but {dvc_file} is missing or unreadable. "
            f"Version the data first (`dvc add {data_dir} && dvc push`), or train once with `vggflow train`."
        )
    md5, path = tracked
    tracked_dir = (Path(dvc_file).parent / path).resolve()
    if tracked_dir != Path(data_dir).resolve():
        raise DataError(
            f"{dvc_file} tracks {tracked_dir}, not the configured data folder {Path(data_dir).resolve()} (data.dir)"
        )
    return md5


def _open_repo(dvc_file: Path):
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(str(Path(dvc_file).resolve().parent))
    except NotDvcRepoError:
        raise DataError(f"{Path(dvc_file).resolve().parent} is not a DVC repository (`dvc init`)") from None


def workspace_changes(dvc_file: Path) -> str:
    """How the data folder differs from ``dvc_file`` (``""`` when it matches), from ``dvc status``."""
    with _open_repo(dvc_file) as repo:
        status = repo.status(targets=[str(Path(dvc_file).resolve())])
    changes = []
    for entries in status.values():
        for entry in entries:
            if isinstance(entry, dict):
                for kind, outs in entry.items():
                    detail = (
                        ", ".join(f"{path}: {what}" for path, what in outs.items())
                        if isinstance(outs, dict)
                        else str(outs)
                    )
                    changes.append(f"{kind} ({detail})")
            else:
                changes.append(str(entry))
    return "; ".join(changes)


def read_data_state(data_cfg: DataConfig) -> DataState:
    """The version in ``data_cfg.dvc_file`` and whether ``data_cfg.dir`` matches it."""
    version = tracked_version(data_cfg.dvc_file, data_cfg.dir)
    changes = workspace_changes(data_cfg.dvc_file)
    return DataState(
        dvc_file=data_cfg.dvc_file, data_dir=data_cfg.dir, version=version, matches=not changes, changes=changes
    )


def pull_data(state: DataState) -> DataState:
    """``dvc pull`` of ``state.dvc_file`` (fetch, then checkout); returns the state afterwards.

    Raises:
        DataError: when local files would be overwritten (never forced), the version is neither
            in the cache nor on the remote, or the folder still differs afterwards. Transfer errors
            are raised as they are (the task retries them).
    """
    from dvc.exceptions import CheckoutError, DvcException

    target = str(Path(state.dvc_file).resolve())
    with _open_repo(state.dvc_file) as repo:
        repo.fetch(targets=[target])  # network I/O: errors propagate and are retried
        try:
            repo.checkout(targets=[target])
        except CheckoutError:
            raise DataError(
                f"data version {state.version} is neither in the DVC cache nor on the remote: "
                "was `dvc push` run after `dvc add`? (check `dvc remote list`)"
            ) from None
        except DvcException as err:
            if "unsaved files" not in str(err):
                raise
            files = [line for line in str(err).splitlines()[1:] if line.strip()]
            shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
            raise DataError(
                f"{state.data_dir} has files that are not in {state.dvc_file} ({shown}); not overwriting them. "
                f"Version them (`dvc add {state.data_dir} && dvc push`, commit {state.dvc_file}) "
                f"or discard them (`dvc checkout --force {state.dvc_file}`)."
            ) from None
    changes = workspace_changes(state.dvc_file)
    if changes:
        raise DataError(f"{state.data_dir} still differs from {state.dvc_file} after `dvc pull`: {changes}")
    return state.model_copy(update={"matches": True, "changes": "", "pulled": True})


def version_ref(model_version) -> VersionRef:
    """A registry ``ModelVersion`` → :class:`VersionRef`."""
    tags = model_version.tags or {}
    return VersionRef(
        version=str(model_version.version),
        data_version=tags.get(mlflow_tags.DATA_VERSION),
        run_id=model_version.run_id,
        rejection_reason=tags.get(mlflow_tags.REJECTION_REASON),
    )


def read_registry_state(client, model_name: str) -> RegistryState:
    """The ``@champion`` and ``@challenger`` versions of ``model_name`` (None when unset), and its rollbacks."""
    from mlflow.exceptions import MlflowException

    refs: dict[str, VersionRef | None] = {}
    for alias in (CHAMPION, CHALLENGER):
        try:
            refs[alias] = version_ref(client.get_model_version_by_alias(model_name, alias))
        except MlflowException:  # no such model or alias
            refs[alias] = None
    return RegistryState(
        model_name=model_name,
        champion=refs[CHAMPION],
        challenger=refs[CHALLENGER],
        rolled_back=rollbacks_in_force(client, model_name),
    )


def decide_retrain(data_version: str, registry: RegistryState, force: bool) -> RetrainDecision:
    """Train when forced, when there is no champion, or when the data is new.

    "New" means neither the champion nor a newer rejected challenger was trained on it, and no
    model trained on it was rolled back: a model the gate rejected or a person rolled back is not
    retrained every night on the same data (use ``force`` after changing the config).
    """
    champion, challenger = registry.champion, registry.challenger
    common = dict(
        data_version=data_version,
        champion_version=champion.version if champion else None,
        champion_data_version=champion.data_version if champion else None,
    )
    if champion is None:
        reason = f"training: no @champion of {registry.model_name} yet (data version {data_version})"
        return RetrainDecision(retrain=True, reason=("forced; " if force else "") + reason, **common)
    if force:
        return RetrainDecision(
            retrain=True,
            reason=(
                f"training: forced (data version {data_version}; champion v{champion.version} on "
                f"{champion.data_version})"
            ),
            **common,
        )
    if champion.data_version == data_version:
        reason = f"skipped: data unchanged (version {data_version}; champion v{champion.version} was trained on it)"
        return RetrainDecision(retrain=False, reason=reason, **common)
    rolled_back = next((r for r in registry.rolled_back if r.data_version == data_version), None)
    if rolled_back is not None:
        reason = (
            f"skipped: data version {data_version} was rolled back ({rolled_back.describe()}); "
            "retraining waits for new data (`dvc add`, commit data.dvc), or --force"
        )
        return RetrainDecision(retrain=False, reason=reason, **common)
    if (
        challenger is not None
        and challenger.data_version == data_version
        and int(challenger.version) > int(champion.version)
    ):
        reason = (
            f"skipped: data unchanged (version {data_version}; v{challenger.version} was trained on it and rejected by "
            f"the promotion gate, champion v{champion.version}; --force retrains)"
        )
        return RetrainDecision(retrain=False, reason=reason, **common)
    reason = (
        f"training: new data version {data_version} (champion v{champion.version} was trained on "
        f"{champion.data_version})"
    )
    return RetrainDecision(retrain=True, reason=reason, **common)


# --------------------------------------------------------------------------- Prefect task shells


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry transfer errors only: a user-fixable problem will not go away by waiting."""
    try:
        state.result(raise_on_failure=True)
    except VggflowError:
        return False
    except BaseException:
        return True
    return False


@task(name="read-data-version")
def read_data_version_task(data_cfg: DataConfig) -> DataState:
    """Prefect shell: the md5 in the DVC file and whether the data folder matches it (local)."""
    return read_data_state(data_cfg)


@task(name="dvc-pull", retries=3, retry_delay_seconds=[5, 30, 120], retry_condition_fn=_retry_unless_user_error)
def pull_data_task(state: DataState) -> DataState:
    """Prefect shell: restore the data folder with ``dvc pull`` (remote I/O: retried)."""
    from prefect.logging import get_run_logger

    get_run_logger().info(f"{state.data_dir} does not match {state.dvc_file} ({state.changes}): dvc pull")
    return pull_data(state)


@task(name="registry-data-versions", retries=2, retry_delay_seconds=5)
def registry_state_task(tracking: TrackingConfig, model_name: str) -> RegistryState:
    """Prefect shell: the champion's (and challenger's) data version (registry I/O: retried)."""
    from mlflow.tracking import MlflowClient

    from vggflow.tracking import check_store

    return read_registry_state(MlflowClient(tracking_uri=check_store(tracking)), model_name)
