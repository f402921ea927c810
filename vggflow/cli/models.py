"""The registered model's commands: `vggflow registry`, `promote`, `rollback` and `predict`.

Read-only commands never create a tracking store as a side effect: without one they explain that
nothing was trained here yet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vggflow.errors import VggflowError
from vggflow.registry import promote_manually, promotion_lock, registry_table, rollback


class _NoStoreYet(VggflowError):
    """A registry command found no tracking store: nothing was ever trained or registered here."""

    def __init__(self, message: str, cfg) -> None:
        super().__init__(message)
        self.cfg = cfg  # the loaded config, for commands that can go on without a store


def _registry_client(args: argparse.Namespace):
    """The config, an MLflow client on its store, and the promotion lock.

    Raises:
        _NoStoreYet: the configured sqlite store does not exist. A command that only reads the
            registry must not create an empty store (a stray ``mlflow/`` folder) as a side effect.
    """
    from vggflow.config import load_config
    from vggflow.runtime import imports_without_gc
    from vggflow.tracking import sqlite_path

    cfg = load_config(args.config, args.overrides)
    db = sqlite_path(cfg.tracking.effective_uri)
    if db is not None and not db.exists():
        raise _NoStoreYet(f"no model registry here yet: {db} does not exist (run `vggflow train` first)", cfg)
    with imports_without_gc():  # MLflow's import and store set-up
        from vggflow.tracking import connect, lock_dir

        client, _ = connect(cfg.tracking)
    lock = promotion_lock(lock_dir(cfg.tracking, cfg.work_dir), cfg.registry.lock_url, cfg.registry.model_name)
    return cfg, client, lock


def cmd_registry(args: argparse.Namespace) -> int:
    try:
        cfg, client, _ = _registry_client(args)
        table = registry_table(client, cfg.registry.model_name)
    except _NoStoreYet as err:
        cfg, table = err.cfg, None
    if table is None or table.empty:
        print(f"{cfg.registry.model_name}: no registered versions yet (run `vggflow train`)")
        return 0
    print(f"{cfg.registry.model_name} ({cfg.tracking.effective_uri})")
    print(table.to_string(index=False))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    cfg, client, lock = _registry_client(args)
    name = cfg.registry.model_name
    former = promote_manually(client, name, args.version, args.reason, lock)
    if former == str(args.version):
        print(f"{name} version {args.version} is already @champion")
    else:
        print(f"{name}: @champion -> version {args.version} (manual: {args.reason}); @previous -> {former or 'none'}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    cfg, client, lock = _registry_client(args)
    current, restored = rollback(client, cfg.registry.model_name, lock)
    print(
        f"{cfg.registry.model_name}: @champion -> version {restored} (rolled back from {current}; @previous -> "
        f"{current})"
    )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from vggflow.runtime import import_tensorflow_quietly, imports_without_gc

    with imports_without_gc():
        from mlflow.exceptions import MlflowException

        import mlflow
        from vggflow.predict import expand_inputs, format_prediction, predict_files
        from vggflow.tracking import without_type_hint_advice

        try:
            cfg, _, _ = _registry_client(args)  # a bad config or store fails before TensorFlow's import
        except _NoStoreYet as err:
            if not (args.model and Path(args.model).exists()):  # a model folder needs no registry
                raise VggflowError(f"{err}; or pass --model with a saved model folder") from None
            cfg = err.cfg
        import_tensorflow_quietly()  # the model's flavour imports it; without its start-up noise
    uri = args.model or f"models:/{cfg.registry.model_name}@champion"
    try:
        with without_type_hint_advice():
            model = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as err:
        raise VggflowError(f"cannot load model {uri}: {err}") from None
    predicted = failed = 0
    for prediction in predict_files(model, list(expand_inputs(args.inputs)), max(1, args.top_k)):
        if prediction.error:
            failed += 1
            print(format_prediction(prediction), file=sys.stderr)
        else:
            predicted += 1
            print(format_prediction(prediction))
    if failed:
        print(f"{failed} file(s) could not be read (listed above); {predicted} predicted", file=sys.stderr)
    return 0 if predicted else 2
