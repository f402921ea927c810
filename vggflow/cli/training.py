"""`vggflow train` and `vggflow retrain`: run the training or retraining flow once, print the summary."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

from vggflow.cli.summary import format_training_summary
from vggflow.errors import VggflowError


def cmd_train(args: argparse.Namespace) -> int:
    from vggflow.config import load_config
    from vggflow.config_tree import sweep_grid
    from vggflow.runtime import import_tensorflow_quietly
    from vggflow.warmup import start_local_prefect_server, start_store_creation, wait_until_ready

    cfg = load_config(args.config, args.overrides, values={"sweep": sweep_grid(args.sweep) if args.sweep else None})
    # Overlap the fixed costs (see vggflow/warmup.py): Prefect's server and a new tracking store
    # start in subprocesses while this process imports TensorFlow. The server must be started
    # before Prefect is imported.
    server = start_local_prefect_server()
    from vggflow.tasks.preflight import check_data_dir
    from vggflow.tracking import check_store

    # The cheap checks first, before anything slow.
    check_data_dir(Path(args.data) if args.data else cfg.data.dir)
    check_store(cfg.tracking)
    store = start_store_creation(cfg.tracking)
    _quiet_expected_errors()
    # SIGTERM (a scheduler stopping us, `kill`) unwinds like Ctrl-C: the MLflow run is closed as KILLED.
    signal.signal(signal.SIGTERM, _interrupt)
    # Not under `imports_without_gc` (as `predict` is): these imports overlap the server's and
    # the store's start-up, which stay the critical path.
    import_tensorflow_quietly()  # the longest import, done while the others start

    from vggflow.flows.train import train_flow

    wait_until_ready(server)
    if store is not None:
        store.wait()  # reap it (the flow's own connect() waits on the store lock anyway)
    with _result_only_on_stdout(args.json):
        summary = train_flow(
            config_file=args.config,
            overrides=list(args.overrides),
            data_dir=args.data,
            promote=False if args.no_promote else None,
            sweep=args.sweep,
        )
    write_dvc_outputs(summary, args.metrics, args.plots)
    if args.json:
        print(json.dumps(summary.model_dump(mode="json"), indent=1))
    else:
        print(format_training_summary(summary, temporary_prefect_server=server is not None))
    return 0


#: The run's report files that ``--plots DIR`` copies (``dvc.yaml`` plots them).
PLOT_FILES = ("learning_curves.csv", "test_predictions.csv")


def write_dvc_outputs(summary, metrics_file: str | None, plots_dir: str | None) -> None:
    """``--metrics``: the test and validation metrics as JSON; ``--plots``: the curves and predictions as CSV.

    Plain files where ``dvc.yaml`` says, so ``dvc metrics show``, ``dvc exp show`` and ``dvc plots
    show`` read a run's results (MLflow stays the run's log).
    """
    import shutil

    from vggflow.files import atomic_write_text

    if metrics_file:
        chosen = next(stage for stage in summary.stages if stage["chosen"])
        metrics = {
            "test": summary.test_metrics,
            "validation": {key: chosen[f"best_{key}"] for key in ("val_accuracy", "val_loss")},
            "trainable_params": summary.freeze_configuration["trainable_params"],
            "model_version": int(summary.model_version),
        }
        atomic_write_text(Path(metrics_file), json.dumps(metrics, indent=1) + "\n")
    if plots_dir:
        Path(plots_dir).mkdir(parents=True, exist_ok=True)
        for name in PLOT_FILES:
            shutil.copyfile(Path(summary.report_dir) / name, Path(plots_dir) / name)


def cmd_retrain(args: argparse.Namespace) -> int:
    from vggflow.config import load_config
    from vggflow.warmup import start_local_prefect_server, wait_until_ready

    load_config(args.config, args.overrides)  # fail on a bad config before starting anything
    server = start_local_prefect_server()  # before Prefect is imported, as in cmd_train
    _quiet_expected_errors()
    signal.signal(signal.SIGTERM, _interrupt)  # a training it starts closes its MLflow run as KILLED
    from vggflow.flows.retrain import retrain_flow

    wait_until_ready(server)
    with _result_only_on_stdout(args.json):
        outcome = retrain_flow(config_file=args.config, overrides=list(args.overrides), force=args.force)
    if args.json:
        print(json.dumps(outcome.model_dump(mode="json"), indent=1))
        return 0
    print(f"vggflow retrain: {outcome.reason}")
    if not outcome.skipped:
        from vggflow.summary import TrainingSummary

        summary = TrainingSummary.model_validate(outcome.training)
        print(format_training_summary(summary, temporary_prefect_server=server is not None))
    return 0


def _result_only_on_stdout(json_output: bool):
    """With ``--json``, whatever the run prints goes to stderr, so stdout holds the JSON document alone."""
    return contextlib.redirect_stdout(sys.stderr) if json_output else contextlib.nullcontext()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class _ExpectedErrorFilter(logging.Filter):
    """Prefect logs a failing task's traceback; for a user error the one-line message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], VggflowError):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_expected_errors() -> None:
    """Attach the filter to the console handlers Prefect installs (on the root logger)."""
    from prefect import flow  # noqa: F401  (importing the public API runs Prefect's logging setup)

    for handler in logging.getLogger().handlers:
        handler.addFilter(_ExpectedErrorFilter())
