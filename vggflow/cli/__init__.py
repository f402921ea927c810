"""The `vggflow` command line: the parser, :func:`main` and the console script.

The command handlers live beside this module, one per concern: ``training`` (train, retrain),
``schedule`` (schedule), ``models`` (registry, promote, rollback, predict), ``lineage``,
``inputs`` (validate, config, completion) and ``ui``; ``summary`` formats the end-of-training summary. This package is
the only part of vggflow that imports the flows (imports go command line → flows → tasks →
core; ``tests/test_layers.py`` checks it). The handlers import heavy libraries (TensorFlow,
Prefect, MLflow, even the config's pydantic models) inside their bodies, so `vggflow --help`
and config errors answer in well under a second.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import threading
from typing import NoReturn

from vggflow.cli.inputs import cmd_completion, cmd_config, cmd_validate
from vggflow.cli.lineage import cmd_lineage
from vggflow.cli.models import cmd_predict, cmd_promote, cmd_registry, cmd_rollback
from vggflow.cli.schedule import cmd_schedule
from vggflow.cli.stack import ACTIONS, cmd_stack
from vggflow.cli.training import cmd_retrain, cmd_train
from vggflow.cli.ui import cmd_ui
from vggflow.errors import EXIT_USAGE, VggflowError

#: The options every command takes: which config, and overrides of single values.
CONFIG_OPTIONS = [
    (("--config",), dict(metavar="FILE", help="YAML config (default: built-in defaults; see configs/)")),
    (
        ("--set",),
        dict(
            dest="overrides",
            metavar="SECTION.KEY=VALUE",
            action="append",
            default=[],
            help="override one config value (repeatable), e.g. --set head.epochs=5",
        ),
    ),
]


def option(*names: str, **settings) -> tuple[tuple[str, ...], dict]:
    """One ``add_argument`` call's arguments, for :data:`COMMANDS`."""
    return names, settings


def json_option(what: str) -> tuple[tuple[str, ...], dict]:
    """``--json``: the command's result as one JSON document on stdout, for scripts."""
    return option("--json", action="store_true", help=f"print {what} as JSON on stdout (logs stay on stderr)")


#: Every subcommand: name → (handler, one-line help, description, its own arguments).
COMMANDS = {
    "train": (
        cmd_train,
        "run the training flow (validate → head → fine-tune → evaluate → log → promote)",
        "Run the whole training flow once and print the run, chosen freeze configuration, metrics and model version.",
        [
            option("--data", metavar="DIR", help="folder of labelled images DIR/<class>/<image> (default: data.dir)"),
            option("--no-promote", action="store_true", help="register the new version without touching aliases"),
            json_option("the end-of-run summary"),
            option("--metrics", metavar="FILE.json", help="also write the test metrics there (for `dvc metrics show`)"),
            option("--plots", metavar="DIR", help="also write curves and predictions there (for `dvc plots show`)"),
            option(
                "--sweep",
                action="append",
                metavar="KEY=[V1,V2]",
                help="try each value of a head.* / finetune.* key (repeatable: every combination), e.g. "
                "--sweep 'head.learning_rate=[1e-3, 3e-4]'; the best on validation data is evaluated and gated",
            ),
        ],
    ),
    "validate": (
        cmd_validate,
        "validate a folder of labelled images (exit 0 usable, 2 not usable)",
        "Decode every file, report unusable ones, assign splits; writes a JSON report, a manifest and an HTML page.",
        [
            option("data_dir", metavar="DATA_DIR", help="folder of labelled images DATA_DIR/<class>/<image>"),
            option(
                "--report", metavar="PATH.json", help="where to write the JSON report (manifest and HTML beside it)"
            ),
            json_option("the summary and the report's files"),
        ],
    ),
    "registry": (
        cmd_registry,
        "list registered versions with aliases, metrics, data versions, freeze configuration",
        "List the versions of the registered model, newest first.",
        [json_option("the versions, aliases and last rollback")],
    ),
    "promote": (
        cmd_promote,
        "make VERSION the @champion by hand (the former champion becomes @previous)",
        "Manual override of the promotion gate; the reason is recorded on the version.",
        [
            option("version", metavar="VERSION", help="registered version number"),
            option("--reason", required=True, help="why (recorded as a tag on the version)"),
        ],
    ),
    "rollback": (
        cmd_rollback,
        "move @champion back to @previous, recording why (retrain then skips that data version)",
        "Move @champion back to @previous; the rolled-back version becomes @previous (a second rollback undoes "
        "it). The rollback is recorded on the version and the registered model (reason, who, when); "
        "`vggflow retrain` does not train on the rolled-back model's data version again until the data changes "
        "or --force is given.",
        [option("--reason", required=True, help="why (recorded with who and when)")],
    ),
    "predict": (
        cmd_predict,
        "label images with a registered model (one line per image)",
        "Print the top-k labels and probabilities of each image; unreadable files are reported, not fatal.",
        [
            option(
                "inputs", metavar="IMAGE_OR_DIR", nargs="+", help="image files and/or folders (searched recursively)"
            ),
            option("--model", help="model URI (default: models:/<registry.model_name>@champion)"),
            option("--top-k", type=int, default=3, help="labels per image (default: 3)"),
            json_option("a list with one object per image (path, label, top_k, error)"),
        ],
    ),
    "lineage": (
        cmd_lineage,
        "where a registered version came from, and the commands that reproduce it",
        "Print a registered version's training run, git commit (and whether the tree was dirty), data version "
        "with its DVC file and remote, backbone weights, chosen freeze configuration, test metrics, promotion "
        "decision and full config, then the commands that reproduce it (git checkout, dvc pull, vggflow train).",
        [
            option("version", metavar="VERSION", help="registered version number, or an alias such as @champion"),
            json_option("the lineage"),
            option(
                "--save-config", metavar="FILE", help="write the run's effective config to FILE (for `train --config`)"
            ),
        ],
    ),
    "retrain": (
        cmd_retrain,
        "retrain only if the DVC data version changed since the @champion (what the schedule runs)",
        "Read the data version from the DVC file (dvc pull when data/ does not match it), compare it with the "
        "@champion's; train (and gate) when it is new or --force is given, else finish with 'skipped: data "
        "unchanged'.",
        [
            option(
                "--force", action="store_true", help="train even when the champion was trained on this data version"
            ),
            json_option("the decision (and the training summary)"),
        ],
    ),
    "schedule": (
        cmd_schedule,
        "serve the retraining deployment on a cron schedule from this machine (Prefect)",
        "Register the `vggflow-retrain` deployment with a Prefect server and run its scheduled and triggered runs "
        "here until stopped (Ctrl-C/SIGTERM). Without PREFECT_API_URL a local server is started on 127.0.0.1 and "
        "stopped with it. See docs/scheduling.md.",
        [
            option("--cron", metavar="EXPR", help='cron expression (default: schedule.cron, "0 3 * * *")'),
            option(
                "--timezone",
                metavar="TZ",
                help="IANA timezone of the cron expression (default: schedule.timezone, UTC)",
            ),
        ],
    ),
    "ui": (
        cmd_ui,
        "start the MLflow UI (tracking server) over the project's store until Ctrl-C",
        "Serve the MLflow UI and REST API over the configured tracking store (runs, stage runs, metrics, artifacts, "
        "registered versions) on 127.0.0.1; prints the URL, stops cleanly on Ctrl-C/SIGTERM.",
        [
            option("--port", type=int, default=5000, help="TCP port (default: 5000; 0 = any free port)"),
            option(
                "--host",
                default="127.0.0.1",
                help="interface to bind (default: 127.0.0.1; the UI has no authentication)",
            ),
        ],
    ),
    "stack": (
        cmd_stack,
        "start, stop or check the shared production stack on this machine (docs/production.md)",
        "up: start PostgreSQL, an S3 object store, MLflow's and Prefect's servers, a process work pool with a "
        "worker (and a Dask cluster with --dask N), all on 127.0.0.1, in stack.dir; deploy prefect.yaml to it. "
        "down: stop every process it started. status: each service's health (exit 3 when one is down). env: the "
        'settings pointing vggflow, MLflow, Prefect, DVC and boto3 at it, for `eval "$(vggflow stack env)"`.',
        [
            option("action", choices=ACTIONS, help="up, down, status or env"),
            option("--dask", type=int, metavar="N", help="up: also start N Dask workers (default: stack.dask_workers)"),
            option("--project", default=".", metavar="DIR", help="up: deploy DIR/prefect.yaml (default: .)"),
            option("--no-deploy", action="store_true", help="up: deploy nothing"),
        ],
    ),
    "config": (cmd_config, "print the effective configuration", "Print the effective configuration as YAML.", []),
    "completion": (
        cmd_completion,
        "print a shell completion script (bash, zsh, tcsh)",
        "Print a completion script for vggflow's commands and options, generated from its parser "
        "(e.g. `vggflow completion bash > ~/.local/share/bash-completion/completions/vggflow`).",
        [option("shell", nargs="?", default="bash", choices=["bash", "zsh", "tcsh"], help="default: bash")],
    ),
}

#: Commands whose own options are all they take (no config).
WITHOUT_CONFIG = {"completion"}


class Parser(argparse.ArgumentParser):
    """argparse, with its own exit status for a usage error (64), distinct from a bad config's (78)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def verbosity_options(parser: argparse.ArgumentParser, default) -> None:
    """``-q``/``-v``, accepted before and after the command (``vggflow -q train``, ``vggflow train -q``)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=-1,
        default=default,
        help="only warnings, errors and the result; no progress bars",
    )
    group.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=1,
        default=default,
        help="debug logs, and a log line for every epoch",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (each subcommand has its own --help)."""
    from vggflow.runtime import installed_version

    parser = Parser(
        prog="vggflow",
        description="VGG19 transfer learning: validate data, train, fine-tune, evaluate, track and promote.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    verbosity_options(parser, 0)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (handler, summary, description, arguments) in COMMANDS.items():
        command = commands.add_parser(name, help=summary, description=description)
        for names, settings in arguments + ([] if name in WITHOUT_CONFIG else CONFIG_OPTIONS):
            command.add_argument(*names, **settings)
        verbosity_options(command, argparse.SUPPRESS)  # the top-level value stays unless given here
        command.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `vggflow` console script."""
    from vggflow.runtime import configure_environment, configure_verbosity

    args = build_parser().parse_args(argv)
    configure_environment()
    configure_verbosity(args.verbosity)
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
    C++ destructors) costs seconds of every cold `vggflow train` (BENCHMARKS.md, benchmark 4)
    and does nothing a finished command needs. What a normal exit does that matters runs first, in
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
