"""The `vggflow` command line.

Heavy libraries (TensorFlow, Prefect, MLflow) are imported inside the subcommands that need
them, so `vggflow --help` and config errors answer in well under a second.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import NoReturn

from vggflow.errors import VggflowError


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults; see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=[],
        help="override one config value (repeatable), e.g. --set head.epochs=5",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (each subcommand has its own --help)."""
    parser = argparse.ArgumentParser(
        prog="vggflow",
        description="VGG19 transfer learning: validate data, train, fine-tune, evaluate, track and promote.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train",
        help="run the training flow (validate → head → fine-tune → evaluate → log → promote)",
        description=(
            "Run the whole training flow once and print the run, chosen freeze configuration, metrics and "
            "model version."
        ),
    )
    _config_args(train)
    train.add_argument(
        "--data", metavar="DIR", help="folder of labelled images DIR/<class>/<image> (default: data.dir)"
    )
    train.add_argument("--no-promote", action="store_true", help="register the new version without touching aliases")
    train.set_defaults(handler=cmd_train)

    validate = commands.add_parser(
        "validate",
        help="validate a folder of labelled images (exit 0 usable, 2 not usable)",
        description=(
            "Decode every file, report unusable ones, assign splits; writes a JSON report, a manifest and an HTML page."
        ),
    )
    validate.add_argument("data_dir", metavar="DATA_DIR", help="folder of labelled images DATA_DIR/<class>/<image>")
    validate.add_argument(
        "--report", metavar="PATH.json", help="where to write the JSON report (manifest and HTML beside it)"
    )
    _config_args(validate)
    validate.set_defaults(handler=cmd_validate)

    registry = commands.add_parser(
        "registry",
        help="list registered versions with aliases, metrics, data versions, freeze configuration",
        description="List the versions of the registered model, newest first.",
    )
    _config_args(registry)
    registry.set_defaults(handler=cmd_registry)

    promote = commands.add_parser(
        "promote",
        help="make VERSION the @champion by hand (the former champion becomes @previous)",
        description="Manual override of the promotion gate; the reason is recorded on the version.",
    )
    promote.add_argument("version", metavar="VERSION", help="registered version number")
    promote.add_argument("--reason", required=True, help="why (recorded as a tag on the version)")
    _config_args(promote)
    promote.set_defaults(handler=cmd_promote)

    rollback = commands.add_parser(
        "rollback",
        help="move @champion back to @previous",
        description=(
            "Move @champion back to @previous; the rolled-back version becomes @previous (a second rollback undoes it)."
        ),
    )
    _config_args(rollback)
    rollback.set_defaults(handler=cmd_rollback)

    predict = commands.add_parser(
        "predict",
        help="label images with a registered model (one line per image)",
        description="Print the top-k labels and probabilities of each image; unreadable files are reported, not fatal.",
    )
    predict.add_argument(
        "inputs", metavar="IMAGE_OR_DIR", nargs="+", help="image files and/or folders (searched recursively)"
    )
    predict.add_argument("--model", help="model URI (default: models:/<registry.model_name>@champion)")
    predict.add_argument("--top-k", type=int, default=3, help="labels per image (default: 3)")
    _config_args(predict)
    predict.set_defaults(handler=cmd_predict)

    retrain = commands.add_parser(
        "retrain",
        help="retrain only if the DVC data version changed since the @champion (what the schedule runs)",
        description="Read the data version from the DVC file (dvc pull when data/ does not match it), compare it with "
        "the @champion's; train (and gate) when it is new or --force is given, else finish with 'skipped: data "
        "unchanged'.",
    )
    _config_args(retrain)
    retrain.add_argument(
        "--force", action="store_true", help="train even when the champion was trained on this data version"
    )
    retrain.set_defaults(handler=cmd_retrain)

    schedule = commands.add_parser(
        "schedule",
        help="serve the retraining deployment on a cron schedule from this machine (Prefect)",
        description="Register the `vggflow-retrain` deployment with a Prefect server and run its scheduled and "
        "triggered runs here until stopped (Ctrl-C/SIGTERM). Without PREFECT_API_URL a local server is started on "
        "127.0.0.1 and stopped with it. See docs/scheduling.md.",
    )
    _config_args(schedule)
    schedule.add_argument("--cron", metavar="EXPR", help='cron expression (default: schedule.cron, "0 3 * * *")')
    schedule.add_argument(
        "--timezone", metavar="TZ", help="IANA timezone of the cron expression (default: schedule.timezone, UTC)"
    )
    schedule.set_defaults(handler=cmd_schedule)

    ui = commands.add_parser(
        "ui",
        help="start the MLflow UI (tracking server) over the project's store until Ctrl-C",
        description="Serve the MLflow UI and REST API over the configured tracking store (runs, stage runs, metrics, "
        "artifacts, registered versions) on 127.0.0.1; prints the URL, stops cleanly on Ctrl-C/SIGTERM.",
    )
    _config_args(ui)
    ui.add_argument("--port", type=int, default=5000, help="TCP port (default: 5000; 0 = any free port)")
    ui.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1; the UI has no authentication)"
    )
    ui.set_defaults(handler=cmd_ui)

    config = commands.add_parser(
        "config", help="print the effective configuration", description="Print the effective configuration as YAML."
    )
    _config_args(config)
    config.set_defaults(handler=cmd_config)
    return parser


def cmd_config(args: argparse.Namespace) -> int:
    from vggflow.config import load_config

    print(load_config(args.config, args.overrides).as_yaml(), end="")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from vggflow.config import load_config
    from vggflow.dashboard import free_port, serve, spec_from_config

    cfg = load_config(args.config, args.overrides)
    port = args.port or free_port(args.host)
    spec = spec_from_config(cfg, host=args.host, port=port)
    return serve(spec, cfg.work_dir / "mlflow-server.log", cfg.tracking.experiment)


def cmd_validate(args: argparse.Namespace) -> int:
    from vggflow.config import load_config
    from vggflow.validation import format_summary, validate_dataset, write_validation_outputs

    cfg = load_config(args.config, args.overrides)
    result = validate_dataset(Path(args.data_dir), cfg.data, cfg.validation)
    out_dir = Path(args.report).parent if args.report else cfg.work_dir / "validation" / "latest"
    files = write_validation_outputs(result, out_dir)
    if args.report and files["report"] != Path(args.report):
        files["report"].replace(args.report)
        files["report"] = Path(args.report)
    print(format_summary(result))
    print(f"report: {files['report']}  manifest: {files['manifest']}  html: {files['html']}")
    return 0 if result.ok else 2


class _NoStoreYet(VggflowError):
    """A registry command found no tracking store: nothing was ever trained or registered here."""

    def __init__(self, message: str, cfg) -> None:
        super().__init__(message)
        self.cfg = cfg  # the loaded config, for commands that can go on without a store


def _registry_client(args: argparse.Namespace):
    """The config, an MLflow client on its store, and the registry lock folder.

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
    return cfg, client, lock_dir(cfg.tracking, cfg.work_dir)


def cmd_registry(args: argparse.Namespace) -> int:
    from vggflow.tasks.promote import registry_table

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
    from vggflow.tasks.promote import promote_manually

    cfg, client, locks = _registry_client(args)
    name = cfg.registry.model_name
    former = promote_manually(client, name, args.version, args.reason, locks)
    if former == str(args.version):
        print(f"{name} version {args.version} is already @champion")
    else:
        print(f"{name}: @champion -> version {args.version} (manual: {args.reason}); @previous -> {former or 'none'}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from vggflow.tasks.promote import rollback

    cfg, client, locks = _registry_client(args)
    current, restored = rollback(client, cfg.registry.model_name, locks)
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


def cmd_train(args: argparse.Namespace) -> int:
    from vggflow.config import load_config
    from vggflow.runtime import import_tensorflow_quietly
    from vggflow.warmup import start_local_prefect_server, start_store_creation

    cfg = load_config(args.config, args.overrides)
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
    # the store's start-up, which stay the critical path; it changed nothing here (BENCHMARKS.md).
    import_tensorflow_quietly()  # the longest import, done while the others start

    from vggflow.flows.train import train_flow

    if server is not None:
        server.wait_ready(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")))
    if store is not None:
        store.wait()  # reap it (the flow's own connect() waits on the store lock anyway)
    summary = train_flow(
        config_file=args.config,
        overrides=list(args.overrides),
        data_dir=args.data,
        promote=False if args.no_promote else None,
    )
    print(format_training_summary(summary))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from vggflow.config import load_config
    from vggflow.warmup import start_local_prefect_server

    load_config(args.config, args.overrides)  # fail on a bad config before starting anything
    server = start_local_prefect_server()  # before Prefect is imported, as in cmd_train
    _quiet_expected_errors()
    signal.signal(signal.SIGTERM, _interrupt)  # a training it starts closes its MLflow run as KILLED
    from vggflow.flows.retrain import retrain_flow

    if server is not None:
        server.wait_ready(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")))
    outcome = retrain_flow(config_file=args.config, overrides=list(args.overrides), force=args.force)
    print(f"vggflow retrain: {outcome.reason}")
    if not outcome.skipped:
        from vggflow.flows.train import TrainingSummary

        print(format_training_summary(TrainingSummary.model_validate(outcome.training)))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from vggflow.scheduling import serve_retraining

    return serve_retraining(args.config, list(args.overrides), cron=args.cron, timezone=args.timezone)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def format_training_summary(summary) -> str:
    """The end-of-run summary: a compact table of stages, then the outcome, one line per fact."""
    freeze = summary.freeze_configuration
    rule = "=" * 78
    lines = ["", rule, f"vggflow train: done   run {summary.run_id}", rule]
    if summary.random_init:
        lines += [
            "WARNING: randomly initialised backbone (no ImageNet weights): a pipeline demonstration,",
            f"         not a useful classifier. ({summary.weights_note})",
        ]
    lines += [
        f"data        {summary.data_version}   matches data.dvc: {_yes_no(summary.data_matches_dvc)}",
        "",
        "    stage       val_acc  val_loss  epochs",
    ]
    for stage in summary.stages:
        chosen = stage["stage"] == freeze["stage"]
        row = (
            f" {'*' if chosen else ' '}  {stage['stage']:<10}  {stage['val_accuracy']:7.4f}  "
            f"{stage['val_loss']:8.4f}  {stage['epochs']:6d}"
        )
        if chosen:
            row += (
                f"   <- chosen: from {freeze['first_trainable_layer']}, {freeze['trainable_layers']} layers, "
                f"{freeze['trainable_params']:,} params, lr {freeze['learning_rate']:g}"
            )
        lines.append(row)
    for name in summary.skipped_stages:
        lines.append(f"    {name:<10}  {'-':>7}  {'-':>8}  {'-':>6}   skipped: the previous stage did not improve")
    lines += [
        "",
        "test        " + "   ".join(f"{k} {v:.4f}" for k, v in summary.test_metrics.items()),
        f"model       {summary.model_name} v{summary.model_version}   {summary.model_uri}",
        f"promotion   {'PROMOTED to @champion' if summary.decision.promoted else 'not promoted'}: "
        f"{summary.decision.reason}",
        f"reports     {summary.report_dir}",
        f"tracking    {summary.tracking_uri}   experiment {summary.experiment_id}",
        f"dashboard   {_run_link(summary)}",
    ]
    return "\n".join(lines)


def _run_link(summary) -> str:
    """Where to see the run: the tracking server itself, or `vggflow ui` over a local store."""
    route = f"#/experiments/{summary.experiment_id}/runs/{summary.run_id}"
    if summary.tracking_uri.startswith(("http://", "https://")):
        return f"{summary.tracking_uri.rstrip('/')}/{route}"
    return f"vggflow ui, then http://127.0.0.1:5000/{route}"


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "NO")


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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vggflow` console script."""
    from vggflow.runtime import configure_environment

    args = build_parser().parse_args(argv)
    configure_environment()
    try:
        return args.handler(args)
    except VggflowError as err:
        print(f"vggflow {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"vggflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read our output stopped (`vggflow predict DIR | head`): stop quietly, as Unix
        # tools do, with a shell's code for SIGPIPE. Stdout now goes nowhere, so the exit's flush
        # of what is still buffered cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def console() -> NoReturn:
    """The console script: :func:`main`, then a fast exit once the normal exit work is done.

    After TensorFlow is loaded, Python's own teardown (freeing every module, then TensorFlow's
    C++ destructors) took 2.2 s of every cold `vggflow train` (BENCHMARKS.md, benchmark 4) and
    does nothing a finished command needs. What a normal exit does that matters runs first, in
    CPython's order: ``threading._shutdown`` (its exit callbacks stop Prefect's worker threads;
    without them Prefect's ``atexit`` drain waits 5 s), the ``atexit`` handlers (Prefect's log
    and event workers, MLflow, ``logging``, our temporary Prefect server), flushing stdout and
    stderr. An exception that escapes :func:`main` exits the normal way, traceback included.
    """
    code = main()
    shutdown_threads = getattr(threading, "_shutdown", None)  # CPython's; absent elsewhere
    if shutdown_threads is None:
        sys.exit(code)
    shutdown_threads()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


if __name__ == "__main__":
    console()
