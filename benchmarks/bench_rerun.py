"""Re-running `vggflow train` with unchanged data and a changed head config vs the cold run.

Run (from the repository root; writes benchmarks/results/rerun.md)::

    .venv/bin/python benchmarks/bench_rerun.py                 # 1,000 images, 2 rounds
    .venv/bin/python benchmarks/bench_rerun.py --images 4000 --rounds 1
    .venv/bin/python benchmarks/bench_rerun.py --smoke          # a second: runs `vggflow config` through the harness
    # the head-only workflow at the default size (not the benchmark's config; for comparison):
    .venv/bin/python benchmarks/bench_rerun.py --set backbone.image_size=224 --set 'finetune.stages=[]' \
        --out benchmarks/results/rerun-head-only-224.md

Each round, in a fresh project folder (own Prefect home and result store, MLflow store, caches):

1. **cold**: `vggflow train --config bench.yaml --data DIR --no-promote` (demo-like config at 64²:
   random backbone, head 10 epochs, every stage 1 epoch; `common.BENCH_TRAIN_CONFIG`);
2. **changed head**: the same command with `--set head.learning_rate=0.002` — same data, same
   result store and feature cache, so validation and feature extraction are reused; the head is
   retrained, and so is every fine-tuning stage (each starts from the head's weights: a changed
   head legitimately invalidates them);
3. **unchanged**: the cold command again (everything reusable is reused: the fixed cost).

The per-task breakdown comes from the task runs recorded by each run's Prefect server
(`task_run` table: state, run time).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import common
from common import (
    base_args, fashion_mnist_folder, header, measure_once, median, new_project, publish, resolve_out, start, table,
    task_runs, vggflow_train,
)

NAME = "rerun"
CHANGED = ["head.learning_rate=0.002"]


def _task_seconds(runs: list[dict]) -> dict[str, tuple[float, str]]:
    """Task name → (seconds, state); runs of the same name are summed."""
    out: dict[str, tuple[float, str]] = {}
    for run in runs:
        seconds, state = out.get(run["name"], (0.0, run["state"]))
        out[run["name"]] = (seconds + run["seconds"], state if state == run["state"] else "mixed")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base_args(parser, default_rounds=2)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--keep", action="store_true", help="keep the project folders (logs, stores) for inspection")
    parser.add_argument("--set", dest="base_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run of every round, on top of the benchmark config (repeatable)")
    args = parser.parse_args(argv)
    command = "config" if args.smoke else "train"
    if args.smoke:
        args.images, args.rounds = 20, 1
    info = start(args)
    out = resolve_out(args, NAME)
    data = fashion_mnist_folder(args.images)
    scratch = Path(tempfile.mkdtemp(prefix="rerun-", dir=common.cache_root()))
    kinds = ("cold", "changed head", "unchanged")
    results: dict[str, list[dict]] = defaultdict(list)
    try:
        for index in range(args.rounds):
            project = new_project(scratch, f"round{index + 1}")
            for kind in kinds:
                overrides = args.base_overrides + (CHANGED if kind == "changed head" else [])
                result = measure_once(lambda: vggflow_train(project, data, overrides, log_name=f"{kind}.log", command=command))
                result["tasks"] = task_runs(project)
                results[kind].append(result)
                print(f"  round {index + 1} {kind}: {result['wall_s']:.1f} s (other processes {result['others_cores']:.2f} cores)")
            if not args.keep:
                shutil.rmtree(project, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    cold = median([r["wall_s"] for r in results["cold"]])
    rows = []
    for kind in kinds:
        wall = median([r["wall_s"] for r in results[kind]])
        rows.append([kind, f"{wall:.1f}", f"**{cold / wall:.2f}x**" if kind == "changed head" else f"{cold / wall:.2f}x",
                     ", ".join(f"{r['wall_s']:.0f}" for r in results[kind]),
                     ", ".join(f"{r['others_cores']:.2f}" for r in results[kind])])
    text = header(
        "Re-run with unchanged data and a changed head config",
        "python benchmarks/bench_rerun.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        f"The real CLI on {args.images:,} Fashion-MNIST PNG files, demo-like config at 64² (random backbone, head 10 "
        "epochs, stages block5/block4/all 1 epoch each, every stage run). Per round: a cold run in a fresh project, "
        f"then `--set {CHANGED[0]}` with the same result store and caches, then the unchanged command again. "
        "Wall time of the whole CLI process (Python/TensorFlow imports, the temporary Prefect server, MLflow included). "
        f"{args.rounds} rounds, medians. Goal: changed head ≥ 3x faster than cold."
        + (f" **Every run also had** `{' '.join('--set ' + o for o in args.base_overrides)}`: not the benchmark's "
           "config above where they differ." if args.base_overrides else ""),
    )
    text += "\n## Results (medians)\n\n" + table(["run", "wall s", "cold / this", "per round (s)", "other processes' cores per round"], rows) + "\n"
    # Per-task breakdown of round 1 (Prefect's task runs of that run only: the DB accumulates).
    if not args.smoke:
        per_kind = {kind: _task_seconds(results[kind][0]["tasks"]) for kind in kinds}
        names = list(dict.fromkeys(n for kind in kinds for n in per_kind[kind]))
        breakdown = [[f"`{n}`", *(f"{per_kind[k][n][0]:.1f} ({per_kind[k][n][1]})" if n in per_kind[k] else "—" for k in kinds)]
                     for n in names]
        totals = [sum(v[0] for v in per_kind[k].values()) for k in kinds]
        breakdown.append(["**sum of task run times**", *(f"{t:.1f}" for t in totals)])
        breakdown.append(["**wall time of the CLI**", *(f"{results[k][0]['wall_s']:.1f}" for k in kinds)])
        breakdown.append(["outside tasks (imports, Prefect server, flow, MLflow runs)", *(f"{results[k][0]['wall_s'] - t:.1f}" for k, t in zip(kinds, totals))])
        text += "\n## Where the time goes (round 1; seconds, Prefect task state)\n\n" + table(["task", *kinds], breakdown, "lrrr") + "\n"
    publish(out, text, info, dict(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
