"""`vggflow stack up|down|status|env`: the shared production stack on this machine (vggflow/stack/)."""

from __future__ import annotations

import argparse
import shlex
import sys
import threading
from pathlib import Path

ACTIONS = ("up", "down", "status", "env")


def cmd_stack(args: argparse.Namespace) -> int:
    from vggflow.config import load_config
    from vggflow.processes import stop_on_signals
    from vggflow.stack import client, orchestrate
    from vggflow.stack.folder import StackError, StackFolder

    cfg = load_config(args.config, args.overrides)
    stack_cfg = cfg.stack if args.dask is None else cfg.stack.model_copy(update={"dask_workers": args.dask})
    folder = StackFolder(stack_cfg)

    def say(line: str) -> None:
        print(f"vggflow stack: {line}", flush=True)

    if args.action == "up":
        stop = threading.Event()
        with stop_on_signals(stop):
            project = None if args.no_deploy else Path(args.project).resolve()
            env = orchestrate.up(folder, project, say, stop)
        print(
            "\nPoint vggflow, MLflow, Prefect, DVC and boto3 at it (no secret is printed):\n"
            f'    eval "$({same_stack_command(args, "env")})"\n'
            f"MLflow UI   {env['MLFLOW_TRACKING_URI']}\n"
            f"Prefect UI  {env['PREFECT_API_URL'].removesuffix('/api')}\n"
            f"Stop it:    {same_stack_command(args, 'down')}"
        )
        return 0
    if args.action == "down":
        if not folder.services:
            say(f"nothing running in {folder.root}")
            return 0
        orchestrate.down(folder, say)
        say("down: every process of the stack stopped")
        return 0
    if not folder.exists:
        raise StackError(f"no stack in {folder.root}: start one with `vggflow stack up` (or set stack.dir)")
    if args.action == "env":
        print(client.env_text(folder), end="")
        return 0
    healths = orchestrate.status(folder)
    for name, health in healths.items():
        address = folder.address("prefect" if name == "worker" else name)
        print(f"{name:<9} {'OK  ' if health.ok else 'DOWN'}  {address:<16} {health.detail}")
    return 0 if all(h.ok for h in healths.values()) else 3


def same_stack_command(args: argparse.Namespace, action: str) -> str:
    """The command that finds this stack again: the program as invoked, its config file and ``stack.*`` overrides."""
    program = sys.argv[0] if Path(sys.argv[0]).name == "vggflow" else "vggflow"
    words = [program, "stack", action]
    if args.config:
        words += ["--config", str(args.config)]
    for text in args.overrides:
        if text.startswith("stack."):
            words += ["--set", text]
    return shlex.join(words)
