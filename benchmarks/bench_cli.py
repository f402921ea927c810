"""The short CLI commands' wall time, with and without `imports_without_gc` (Python's collector and the big imports).

Run (from the repository root; writes benchmarks/results/cli.md)::

    .venv/bin/python benchmarks/bench_cli.py              # 5 alternating rounds (~3 min)
    .venv/bin/python benchmarks/bench_cli.py --smoke      # one round on a tiny model: checks the script works

A project folder is trained once (`vggflow train` on 200 Fashion-MNIST PNGs, the benchmarks'
64² config, version 1 registered), then each command is timed as a user runs it, a whole process
from start to exit:

- ``vggflow registry`` (imports MLflow, opens the store, lists the versions);
- ``vggflow predict --model models:/vgg19-classifier/1 FILE`` (also imports TensorFlow and loads
  the model for one image).

Two variants alternate: the console script as installed, and the same console script with
``vggflow.runtime.imports_without_gc`` made a no-op (Python's cyclic collector runs during the
imports as usual, and nothing is frozen: the code before it). TensorFlow, Keras and MLflow leave
hundreds of thousands of long-lived objects, and every full collection during the imports walks
all of them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import common
from common import (
    alternate,
    base_args,
    fashion_mnist_folder,
    header,
    med,
    new_project,
    project_env,
    publish,
    resolve_out,
    run_process,
    start,
    table,
    vggflow_train,
)

NAME = "cli"
#: The installed console script, and the same with `imports_without_gc` turned into a no-op.
CONSOLE = [str(common.VGGFLOW)]
GC_AS_USUAL = [
    common.PYTHON,
    "-c",
    "import contextlib, vggflow.runtime as r; r.imports_without_gc = contextlib.nullcontext; "
    "from vggflow.cli import console; console()",
]
VARIANTS = {"as installed": CONSOLE, "GC as usual": GC_AS_USUAL}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base_args(parser, default_rounds=5)
    parser.add_argument("--images", type=int, default=200, help="images the project's model is trained on")
    args = parser.parse_args(argv)
    overrides: list[str] = []
    if args.smoke:
        args.images, args.rounds = 40, 1
        overrides = ["head.epochs=1", "finetune.stages=[]", "backbone.image_size=32"]
    info = start(args)
    out = resolve_out(args, NAME)
    folder = fashion_mnist_folder(args.images)
    scratch = Path(tempfile.mkdtemp(prefix="cli-", dir=common.cache_root()))
    try:
        project = new_project(scratch, "project")
        vggflow_train(project, folder, overrides)
        image = next(iter(sorted(folder.glob("*/*.png"))))
        commands = {
            "registry": ["registry", "--config", "bench.yaml"],
            "predict": ["predict", "--config", "bench.yaml", "--model", "models:/vgg19-classifier/1", str(image)],
        }
        env = project_env(project)

        def run(variant: str, command: str):
            def go() -> dict:
                log = project / f"{command}.log"
                result = run_process([*VARIANTS[variant], *commands[command]], env=env, cwd=project, log_file=log)
                if result["returncode"] != 0:
                    raise RuntimeError(f"vggflow {command} ({variant}) failed:\n{log.read_text()[-3000:]}")
                return result

            return go

        results = alternate({f"{c} · {v}": run(v, c) for c in commands for v in VARIANTS}, args.rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rows = []
    for command in commands:
        installed, usual = (med(results[f"{command} · {v}"], "wall_s") for v in VARIANTS)
        rows.append(
            [
                f"`vggflow {command}`",
                f"{installed:.2f}",
                f"{usual:.2f}",
                f"**{usual / installed:.2f}x**",
                ", ".join(
                    f"{a['wall_s']:.2f}/{b['wall_s']:.2f}"
                    for a, b in zip(*(results[f"{command} · {v}"] for v in VARIANTS))
                ),
            ]
        )
    text = header(
        "Short CLI commands: wall time, with and without `imports_without_gc`",
        ("python benchmarks/bench_cli.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
        f"Whole processes, start to exit, in a project trained once on {args.images} Fashion-MNIST PNGs (64² config). "
        f"Variants alternated (the order rotates), {args.rounds} rounds, medians. See the script's docstring.",
    )
    text += (
        "\n## Results (seconds, medians)\n\n"
        + table(
            ["command", "as installed", "GC as usual", "GC as usual / installed", "per round (installed/as usual)"],
            rows,
            align="lrrrl",
        )
        + "\n"
    )
    publish(out, text, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
