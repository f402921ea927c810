"""The `vggflow` command line.

Heavy libraries (TensorFlow, Prefect, MLflow) are imported inside the subcommands that need
them, so `vggflow --help` and config errors answer in well under a second.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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
        description="Run the whole training flow once and print the run, chosen freeze configuration, metrics and model version.",
    )
    _config_args(train)
    train.add_argument("--data", metavar="DIR", help="folder of labelled images DIR/<class>/<image> (default: data.dir)")
    train.add_argument("--no-promote", action="store_true", help="register the new version without touching aliases")
    train.set_defaults(handler=cmd_train)

    validate = commands.add_parser(
        "validate",
        help="validate a folder of labelled images (exit 0 usable, 2 not usable)",
        description="Decode every file, report unusable ones, assign splits; writes a JSON report, a manifest and an HTML page.",
    )
    validate.add_argument("data_dir", metavar="DATA_DIR", help="folder of labelled images DATA_DIR/<class>/<image>")
    validate.add_argument("--report", metavar="PATH.json", help="where to write the JSON report (manifest and HTML beside it)")
    _config_args(validate)
    validate.set_defaults(handler=cmd_validate)

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


def cmd_validate(args: argparse.Namespace) -> int:
    from tasks.validate import format_summary, validate_dataset, write_validation_outputs
    from vggflow.config import load_config

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


def cmd_train(args: argparse.Namespace) -> int:
    from vggflow.config import load_config

    load_config(args.config, args.overrides)  # fail on a bad config before starting anything
    _quiet_expected_errors()
    from flows.train import train_flow

    summary = train_flow(
        config_file=args.config,
        overrides=list(args.overrides),
        data_dir=args.data,
        promote=False if args.no_promote else None,
    )
    print(format_training_summary(summary))
    return 0


def format_training_summary(summary) -> str:
    """The end-of-run summary: run, freeze configuration, metrics, version, decision, dashboard."""
    freeze = summary.freeze_configuration
    lines = ["", "=" * 72, "vggflow train: done", "=" * 72]
    if summary.random_init:
        lines += [
            "WARNING: the backbone was randomly initialised (no ImageNet weights) — this model is a pipeline",
            f"         demonstration, not a useful classifier. ({summary.weights_note})",
        ]
    lines += [
        f"MLflow run        {summary.run_id}  (experiment {summary.experiment_id}, {summary.tracking_uri})",
        f"data version      {summary.data_version}  (data/ matches data.dvc: {_yes_no(summary.data_matches_dvc)})",
        f"freeze config     {freeze['stage']}: first trainable layer {freeze['first_trainable_layer']}, "
        f"{freeze['trainable_layers']} trainable layers, {freeze['trainable_params']:,} params, lr {freeze['learning_rate']:g}",
        "stages            " + "  ".join(f"{s['stage']}={s['val_accuracy']:.3f}" for s in summary.stages) + "  (val accuracy)",
    ]
    if summary.skipped_stages:
        lines.append(f"skipped stages    {', '.join(summary.skipped_stages)} (the previous stage did not improve)")
    lines += [
        "test metrics      " + "  ".join(f"{k}={v:.4f}" for k, v in summary.test_metrics.items()),
        f"registered model  {summary.model_name} version {summary.model_version}  ({summary.model_uri})",
        f"promotion         {'PROMOTED to @champion' if summary.decision.promoted else 'not promoted'}: {summary.decision.reason}",
        f"reports           {summary.report_dir}",
        "dashboard         .venv/bin/vggflow ui   (then open http://127.0.0.1:5000)",
    ]
    return "\n".join(lines)


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
    """Attach the filter to Prefect's handlers (after Prefect configured its logging)."""
    import prefect  # noqa: F401  (configures logging)

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("prefect"):
            for handler in logging.getLogger(name).handlers:
                handler.addFilter(_ExpectedErrorFilter())
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


if __name__ == "__main__":
    sys.exit(main())
