"""MLflow and provenance helpers: the store, the data version, the git commit, package versions.

Nothing here runs on import; :func:`connect` sets the tracking URI when a command needs it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import yaml

from vggflow import mlflow_tags
from vggflow.config import TrackingConfig
from vggflow.errors import TrackingError

PACKAGES = ("tensorflow", "keras", "prefect", "mlflow", "dvc", "pandas", "numpy", "pillow", "scikit-learn", "pydantic")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the cwd), else None."""
    if not uri.startswith("sqlite:"):
        return None
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def lock_dir(cfg: TrackingConfig, work_dir: Path) -> Path:
    """Where registry locks live: beside a sqlite store (shared by every process using it), else ``work_dir``."""
    db = sqlite_path(cfg.effective_uri)
    return Path(work_dir) if db is None else db.parent


def check_store(cfg: TrackingConfig) -> str:
    """Fail early when the tracking store is unusable; returns the effective URI.

    Checks a sqlite store's folder and file are writable (creating the folder), an HTTP server
    answers ``/health`` within seconds, and the artifact folder is writable.

    Raises:
        TrackingError: naming the URI or path and what to do.
    """
    uri = cfg.effective_uri
    db = sqlite_path(uri)
    if db is not None:
        folder = db.parent if str(db.parent) else Path(".")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"cannot create the tracking store folder {folder} ({uri}): {err.strerror}") from None
        if not os.access(folder, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingError(
                f"the MLflow tracking store {db} is not writable ({uri}).\n"
                "Fix the permissions, or point MLFLOW_TRACKING_URI / tracking.uri at a writable store."
            )
    elif urlparse(uri).scheme in ("http", "https"):
        import requests

        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=5)
            response.raise_for_status()
        except requests.RequestException as err:
            raise TrackingError(
                f"the MLflow tracking server {uri} is not reachable: {err.__class__.__name__}.\n"
                "Start it (`vggflow stack up` for the shared stack, `vggflow stack status` to check it), or unset "
                "MLFLOW_TRACKING_URI to use the local store."
            ) from None
    if db is not None or urlparse(uri).scheme in ("", "file"):
        root = cfg.artifact_root
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"cannot create the artifact folder {root}: {err.strerror}") from None
        if not os.access(root, os.W_OK):
            raise TrackingError(
                f"the MLflow artifact folder {root} is not writable; fix its permissions or set tracking.artifact_root"
            )
    return uri


def load_pyfunc(model_uri: str):
    """``mlflow.pyfunc.load_model`` without leaving the model's files behind.

    MLflow copies a model it loads into a new temporary folder and never deletes it: ~80 MB for
    VGG19 each time the gate re-scores the champion or `vggflow predict` runs, so a nightly
    schedule would fill /tmp. vggflow's model reads everything into memory when it loads, so the
    copy is deleted right after.
    """
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="vggflow-model-") as folder, without_type_hint_advice():
        return mlflow.pyfunc.load_model(model_uri, dst_path=folder)


@contextlib.contextmanager
def without_type_hint_advice():
    """Drop MLflow's advice to add type hints to a PythonModel's ``predict`` while in the block.

    Models registered by earlier vggflow versions have no type hints on ``predict``, and MLflow
    gives the advice whenever such a model's code is loaded (the gate re-scores the champion,
    `vggflow predict`). MLflow forces the warning through its own "once" filter, which overrides
    ignore filters, so it is dropped at display instead.
    """
    with warnings.catch_warnings():
        show = warnings.showwarning

        def show_others(message, *rest, **kwargs):
            if "Add type hints to the `predict` method" not in str(message):
                show(message, *rest, **kwargs)

        warnings.showwarning = show_others
        yield


def connect(cfg: TrackingConfig):
    """Point MLflow at the configured store and return ``(client, experiment_id)``.

    The experiment is created with its artifacts under ``cfg.artifact_root`` when new.
    """
    import mlflow
    from filelock import FileLock
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = check_store(cfg)
    mlflow.set_tracking_uri(uri)
    db = sqlite_path(uri)
    # Creating a sqlite store runs migrations, and creating the experiment is check-then-act:
    # two processes doing either at once fail, so both happen under a lock beside the database.
    # A tracking server's clients share no lock: one that loses the creation race reads the
    # experiment the other created.
    guard = FileLock(str(db.parent / ".mlflow-store.lock"), timeout=600) if db is not None else contextlib.nullcontext()
    try:
        with guard:
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                location = cfg.artifact_root.resolve().as_uri() if db is not None else None
                try:
                    experiment_id = client.create_experiment(cfg.experiment, artifact_location=location)
                except MlflowException as err:
                    if err.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    experiment_id = client.get_experiment_by_name(cfg.experiment).experiment_id
            else:
                experiment_id = experiment.experiment_id
    except Exception as err:  # MLflow raises several types for an unusable store
        raise TrackingError(f"cannot use the MLflow tracking store {uri}: {err}") from None
    return client, experiment_id


@dataclass(frozen=True)
class DataVersion:
    """The data version: DVC's md5 of the tracked folder, and whether the folder matches it.

    ``matches`` is None when the data folder is not the one tracked by the DVC file. ``dvc_file``
    and ``remote`` (``name url`` of DVC's default remote) say where the version can be pulled from.
    """

    md5: str
    matches: bool | None
    tracked_path: str | None
    dvc_file: str | None = None
    remote: str | None = None

    def as_tags(self) -> dict[str, str]:
        tags = {
            mlflow_tags.DATA_VERSION: self.md5,
            mlflow_tags.DATA_MATCHES_DVC: "unknown" if self.matches is None else str(self.matches).lower(),
        }
        if self.dvc_file:
            tags[mlflow_tags.DVC_FILE] = self.dvc_file
        if self.remote:
            tags[mlflow_tags.DVC_REMOTE] = self.remote
        return tags


def read_dvc_md5(dvc_file: Path) -> tuple[str, str] | None:
    """(md5, tracked path) from a ``.dvc`` file, or None when it does not exist/parse."""
    try:
        out = yaml.safe_load(Path(dvc_file).read_text())["outs"][0]
        return str(out["md5"]), str(out["path"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return None


@dataclass(frozen=True)
class DvcState:
    """What DVC says about the data folder: its recorded md5 and whether the folder matches it.

    ``md5`` is None when ``data_dir`` is not the folder tracked by the DVC file (or there is none).
    """

    md5: str | None
    matches: bool | None
    tracked_path: str | None
    dvc_file: str | None = None
    remote: str | None = None

    def version(self, fingerprint: str) -> DataVersion:
        """The data version: DVC's md5, or ``untracked-<fingerprint>`` of the validated dataset."""
        if self.md5 is None:
            return DataVersion(f"untracked-{fingerprint}", None, self.tracked_path)
        return DataVersion(self.md5, self.matches, self.tracked_path, self.dvc_file, self.remote)


def dvc_state(dvc_file: Path, data_dir: Path) -> DvcState:
    """Read ``dvc_file`` and, when it tracks ``data_dir``, check the folder against it (``dvc status``)."""
    tracked = read_dvc_md5(dvc_file)
    if tracked is None:
        return DvcState(None, None, None)
    md5, path = tracked
    tracked_dir = (Path(dvc_file).parent / path).resolve()
    if tracked_dir != Path(data_dir).resolve():
        return DvcState(None, None, str(tracked_dir))
    return DvcState(md5, dvc_status_clean(dvc_file), str(tracked_dir), str(dvc_file), dvc_default_remote(dvc_file))


def dvc_default_remote(dvc_file: Path) -> str | None:
    """``name url`` of the DVC repository's default remote (``dvc remote default``), or None."""
    from dvc.repo import Repo

    try:
        with Repo(str(Path(dvc_file).resolve().parent)) as repo:
            name = repo.config["core"].get("remote")
            return f"{name} {repo.config['remote'][name]['url']}" if name else None
    except Exception:  # no remote configured, or a broken DVC setup: lineage just has no remote
        return None


def data_version(dvc_file: Path, data_dir: Path, fingerprint: str) -> DataVersion:
    """Resolve the data version of ``data_dir`` (see :class:`DvcState`)."""
    return dvc_state(dvc_file, data_dir).version(fingerprint)


def dvc_status_clean(dvc_file: Path) -> bool | None:
    """Whether the DVC-tracked output of ``dvc_file`` matches its recorded md5 (None if DVC fails)."""
    from dvc.repo import Repo

    try:
        with Repo(str(Path(dvc_file).resolve().parent)) as repo:
            return not repo.status(targets=[str(Path(dvc_file).resolve())])
    except Exception:  # a broken DVC setup must not stop training; the tag says "unknown"
        return None


def git_info(directory: Path | None = None) -> tuple[str, bool | None]:
    """(commit sha or "unknown", dirty flag or None) of the repository containing ``directory``."""
    details = git_details(directory)
    return details["commit"], details["dirty"]


def git_details(directory: Path | None = None) -> dict:
    """Commit, dirty flag, branch and ``origin`` URL of the repository containing ``directory``.

    Values are ``"unknown"``/None where git cannot tell (not a repository, no branch, no remote).
    """
    cwd = str(directory or Path.cwd())

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "commit": commit or "unknown",
        "dirty": None if status is None else bool(status),
        "branch": git("symbolic-ref", "--short", "-q", "HEAD") if commit else None,
        "repo_url": git("remote", "get-url", "origin") if commit else None,
    }


def package_versions() -> dict[str, str]:
    """Installed versions of the stack (logged with every run, pinned in the model)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def epoch_metrics(logs: dict[str, float]) -> dict[str, float]:
    """Keras epoch logs → the metric names used in every run (``train_loss``, ``val_accuracy``…)."""
    names = {"loss": "train_loss", "accuracy": "train_accuracy", "val_loss": "val_loss", "val_accuracy": "val_accuracy"}
    return {names[key]: value for key, value in logs.items() if key in names}


def log_epoch(run_id: str, epoch: int, logs: dict[str, float]) -> None:
    """Log one epoch's metrics to ``run_id`` with ``step=epoch`` (current tracking URI)."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, epoch) for key, value in epoch_metrics(logs).items()]
    if metrics:
        MlflowClient().log_batch(run_id, metrics=metrics)


def champion_manifest(model_name: str, dest: Path) -> Path | None:
    """Download the data manifest of the run behind ``<model_name>@champion`` into ``dest``.

    Returns None when there is no champion (first run) or its run has no manifest.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    if not version.run_id:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    import mlflow.artifacts

    try:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path="validation/manifest.csv", dst_path=str(dest)
            )
        )
    except (MlflowException, OSError):
        return None
