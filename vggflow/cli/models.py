"""The registered model's commands: `vggflow registry`, `promote`, `rollback` and `predict`.

They never create a tracking store as a side effect: a sqlite store that does not exist (a typo in
the path, or nothing trained with it yet) stops them with its absolute path and exit status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vggflow.errors import TrackingError, VggflowError
from vggflow.registry import promote_manually, promotion_lock, registry_table, registry_versions, rollback


class _NoStore(TrackingError):
    """The configured sqlite tracking store does not exist: a mistyped path, or nothing trained with it yet."""

    def __init__(self, message: str, cfg) -> None:
        super().__init__(message)
        self.cfg = cfg  # the loaded config, for commands that can go on without a store


def missing_store_message(uri: str, db: Path) -> str:
    """Where the store was looked for, where that location came from, and the two ways out."""
    origin = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.uri"
    return (
        f"the MLflow tracking store {db.resolve()} does not exist ({origin} = {uri}, relative to "
        f"{Path.cwd()}). Check the path, or run `vggflow train` first to create it."
    )


def registry_client(args: argparse.Namespace):
    """The config, an MLflow client on its store, and the promotion lock (:func:`vggflow.registry.promotion_lock`).

    Raises:
        _NoStore: the configured sqlite store does not exist. A command that reads or moves
            aliases must not create an empty store (a stray ``mlflow/`` folder) as a side effect.
    """
    from vggflow.config import load_config
    from vggflow.runtime import imports_without_gc
    from vggflow.tracking import sqlite_path

    cfg = load_config(args.config, args.overrides)
    db = sqlite_path(cfg.tracking.effective_uri)
    if db is not None and not db.exists():
        raise _NoStore(missing_store_message(cfg.tracking.effective_uri, db), cfg)
    with imports_without_gc():  # MLflow's import and store set-up
        from vggflow.tracking import connect, lock_dir

        client, _ = connect(cfg.tracking)
    lock = promotion_lock(lock_dir(cfg.tracking, cfg.work_dir), cfg.registry.lock_url, cfg.registry.model_name)
    return cfg, client, lock


def cmd_registry(args: argparse.Namespace) -> int:
    from vggflow.registry import last_rollback

    cfg, client, _ = registry_client(args)
    record = last_rollback(client, cfg.registry.model_name)
    if args.json:
        document = {
            "model": cfg.registry.model_name,
            "tracking_uri": cfg.tracking.effective_uri,
            "versions": registry_versions(client, cfg.registry.model_name),
            "last_rollback": record.model_dump() if record else None,
        }
        print(json.dumps(document, indent=1))
        return 0
    table = registry_table(client, cfg.registry.model_name)
    if table.empty:
        print(f"{cfg.registry.model_name}: no registered versions yet (run `vggflow train`)")
        return 0
    print(f"{cfg.registry.model_name} ({cfg.tracking.effective_uri})")
    print(table.to_string(index=False))
    if record is not None:
        print(f"last rollback: {record.describe()}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    cfg, client, lock = registry_client(args)
    name = cfg.registry.model_name
    former = promote_manually(client, name, args.version, args.reason, lock)
    if former == str(args.version):
        print(f"{name} version {args.version} is already @champion")
    else:
        print(f"{name}: @champion -> version {args.version} (manual: {args.reason}); @previous -> {former or 'none'}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    cfg, client, lock = registry_client(args)
    record = rollback(client, cfg.registry.model_name, lock, args.reason)
    current = record.rolled_back_version or "none"
    print(
        f"{cfg.registry.model_name}: @champion -> version {record.restored_version} (rolled back from {current}; "
        f"@previous -> {current})"
    )
    if record.data_version:
        print(
            f"recorded: {record.describe()}\n`vggflow retrain` skips data version {record.data_version} until the "
            "data changes (or --force)"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from vggflow.runtime import import_tensorflow_quietly, imports_without_gc

    with imports_without_gc():
        import mlflow.pyfunc  # noqa: F401  (load_pyfunc's big import, with the collector paused)
        from mlflow.exceptions import MlflowException

        from vggflow.predict import expand_inputs, format_prediction, predict_files, prediction_json
        from vggflow.progress import ItemProgress
        from vggflow.tracking import load_pyfunc

        try:
            cfg, _, _ = registry_client(args)  # a bad config or store fails before TensorFlow's import
        except _NoStore as err:
            if not (args.model and Path(args.model).exists()):  # a model folder needs no registry
                raise TrackingError(f"{err} Or pass --model with a saved model folder.") from None
            cfg = err.cfg
        import_tensorflow_quietly()  # the model's flavour imports it; without its start-up noise
    uri = args.model or f"models:/{cfg.registry.model_name}@champion"
    try:
        model = load_pyfunc(uri)
    except (MlflowException, OSError) as err:
        raise VggflowError(f"cannot load model {uri}: {err}") from None
    predicted = failed = 0
    paths = list(expand_inputs(args.inputs))
    with ItemProgress(len(paths), "predict", "images") as progress:
        if args.json:
            progress.print("[")  # one JSON list, streamed: an item per image as it is labelled
        for prediction in predict_files(model, paths, max(1, args.top_k)):
            progress.advance()
            failed += bool(prediction.error)
            predicted += not prediction.error
            if args.json:
                separator = "," if predicted + failed < len(paths) else ""
                progress.print(json.dumps(prediction_json(prediction)) + separator)
            elif prediction.error:
                progress.print(format_prediction(prediction), file=sys.stderr)
            else:
                progress.print(format_prediction(prediction))
        if args.json:
            progress.print("]")
    if failed:
        print(f"{failed} file(s) could not be read (listed above); {predicted} predicted", file=sys.stderr)
    return 0 if predicted else 2
