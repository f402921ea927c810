"""CPU settings for the frozen-base pass: batch size, threads, XLA, oneDNN.

Run (from the repository root; writes benchmarks/results/settings.md)::

    .venv/bin/python benchmarks/bench_settings.py                  # 3 rounds (~20 min on 2 cores)
    .venv/bin/python benchmarks/bench_settings.py --rounds 2 --images64 256 --images224 32
    .venv/bin/python benchmarks/bench_settings.py --smoke           # seconds; checks the script runs

oneDNN (`TF_ENABLE_ONEDNN_OPTS`) and the thread pools are fixed when TensorFlow starts, so each
setting runs in its own child process; the processes are alternated round by round (A, B, C, D,
B, C, D, A, …; medians). Inside the default process (oneDNN on, TensorFlow's default threads),
the feature-extraction batch size is swept at 64² and 224² (`vggflow.extraction.extract_features` on
PNG files, pooled features), and XLA (`jit_compile=True`) is compared with the plain compiled
forward loop over in-memory arrays at 64². The other processes measure the default batch size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import common
from common import (
    alternate,
    base_args,
    best,
    dataset_rows,
    emit,
    fashion_mnist_folder,
    header,
    med,
    publish,
    resolve_out,
    run_child,
    start,
    table,
    vgg19_gflop_per_image,
)

NAME = "settings"
#: name → (environment, intra-op threads, inter-op threads); 0 = TensorFlow's default.
PROCESSES = {
    "oneDNN on, default threads": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, 0, 0),
    "oneDNN off, default threads": ({"TF_ENABLE_ONEDNN_OPTS": "0"}, 0, 0),
    "oneDNN on, intra 2 / inter 1": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, 2, 1),
    "oneDNN on, intra 1 / inter 1": ({"TF_ENABLE_ONEDNN_OPTS": "1"}, 1, 1),
}
DEFAULT_PROCESS = "oneDNN on, default threads"


def child(args) -> dict:
    import tensorflow as tf

    if args.intra:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra)
    if args.inter:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter)
    import keras
    import numpy as np
    from keras.applications import vgg19

    from vggflow.config import BackboneConfig
    from vggflow.datasets import image_dataset
    from vggflow.extraction import extract_features
    from vggflow.model import build_base, resolve_weights

    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    out: dict[str, float] = {}
    plan = []  # (key, size, function)
    for size, n, batches in ((64, args.images64, args.batches64), (224, args.images224, args.batches224)):
        folder = fashion_mnist_folder(n)
        rows = dataset_rows(folder)
        weights = resolve_weights(BackboneConfig(weights="none", image_size=size), common.cache_root(), seed=42)
        base = build_base(weights, size)

        def extract(batch, rows=rows, folder=folder, base=base, size=size):
            target = Path(tempfile.mkdtemp(dir=scratch))
            t0 = time.perf_counter()
            extract_features(rows, folder, base, ["avg_pool"], size, batch, target)
            return len(rows) / (time.perf_counter() - t0)

        extract(batches[0])  # warm-up: oneDNN kernels for this size
        for batch in batches:
            plan.append((f"extract {size}² batch {batch}", size, lambda b=batch, e=extract: e(b)))
        if size == 64 and args.xla:
            gap = keras.layers.GlobalAveragePooling2D()
            paths = [folder / p for p in rows["path"]]
            arrays = vgg19.preprocess_input(
                np.concatenate([b.numpy() for b in image_dataset(paths, None, size, args.batch)])
            )
            tensors = [tf.constant(arrays[i : i + args.batch]) for i in range(0, len(arrays), args.batch)]
            for jit in (False, True):
                forward = tf.function(lambda x, base=base, gap=gap: gap(base(x, training=False)), jit_compile=jit)
                forward(tensors[0]).numpy()
                if len(tensors[-1]) != len(tensors[0]):
                    forward(tensors[-1]).numpy()

                def loop(forward=forward, tensors=tensors, n=len(arrays)):  # noqa: B008 (bound per iteration)
                    t0 = time.perf_counter()
                    results = [forward(x) for x in tensors]
                    results[-1].numpy()
                    return n / (time.perf_counter() - t0)

                plan.append((f"compiled loop 64² batch {args.batch}, XLA {'on' if jit else 'off'}", size, loop))
    shift = args.round % len(plan)
    for key, _, run in plan[shift:] + plan[:shift]:
        out[key] = run()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base_args(parser, default_rounds=3)
    parser.add_argument("--images64", type=int, default=384)
    parser.add_argument("--images224", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--intra", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--inter", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batches64", type=int, nargs="+", default=[16, 32, 64, 128], help=argparse.SUPPRESS)
    parser.add_argument("--batches224", type=int, nargs="+", default=[16, 32, 64], help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--xla", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from vggflow.config import FeaturesConfig

    default_batch = FeaturesConfig().batch_size
    if args.child:
        emit(child(args))
        return 0
    processes = dict(PROCESSES)
    if args.smoke:
        args.images64, args.images224, args.rounds = 16, 4, 1
        processes = {DEFAULT_PROCESS: PROCESSES[DEFAULT_PROCESS]}
    info = start(args)
    out = resolve_out(args, NAME)
    for n in (args.images64, args.images224):
        fashion_mnist_folder(n)
    scratch = Path(tempfile.mkdtemp(prefix="settings-", dir=common.cache_root()))
    counter = {"round": 0}

    def process(name: str):
        env, intra, inter = processes[name]
        full = name == DEFAULT_PROCESS
        b64 = ([8, 16] if args.smoke else args.batches64) if full else [default_batch]
        b224 = ([4] if args.smoke else args.batches224) if full else [default_batch]

        def run() -> dict:
            counter["round"] += 1
            child_args = [
                "--child",
                "--scratch",
                str(scratch),
                "--intra",
                str(intra),
                "--inter",
                str(inter),
                "--images64",
                str(args.images64),
                "--images224",
                str(args.images224),
                "--batches64",
                *map(str, b64),
                "--batches224",
                *map(str, b224),
                "--batch",
                str(8 if args.smoke else default_batch),
                "--round",
                str(counter["round"]),
            ]
            if full:
                child_args.append("--xla")
            if args.smoke:  # in this process (no TensorFlow start-up); threads and oneDNN as they are
                return child(parser.parse_args(child_args))
            return run_child(Path(__file__), child_args, env=env)

        return run

    import shutil

    try:
        results = alternate({name: process(name) for name in processes}, args.rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    text = header(
        "CPU settings for the frozen VGG19 pass",
        "python benchmarks/bench_settings.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        f"Feature extraction from PNG files (`extract_features`, pooled features; {args.images64} images at 64², "
        f"{args.images224} at 224²) and a compiled forward loop over in-memory arrays, VGG19 seeded random init. "
        f"One child process per oneDNN/thread setting, alternated over {args.rounds} rounds; medians of images/s. "
        f"Product default: features.batch_size = {default_batch}, oneDNN on, TensorFlow's default threads, no XLA.",
    )
    default = results[DEFAULT_PROCESS]
    sweep = []
    for key in [k for k in default[0] if k.startswith(("extract", "compiled"))]:
        size = 224 if "224²" in key else 64
        rate = med(default, key)
        if key.startswith("compiled loop"):
            ref_key = next(k for k in default[0] if k.startswith("compiled loop") and k.endswith("off"))
        else:
            same_size = [k for k in default[0] if k.startswith(f"extract {size}² ")]
            ref_key = (
                f"extract {size}² batch {default_batch}"
                if f"extract {size}² batch {default_batch}" in same_size
                else same_size[0]
            )
        top = best(default, key, lowest=False)
        sweep.append(
            [
                key,
                f"{rate:.2f}",
                f"{top:.2f}",
                f"{rate / med(default, ref_key):.3f}",
                f"{top / best(default, ref_key, lowest=False):.3f}",
                f"{top * vgg19_gflop_per_image(size):.0f}",
                " ".join(f"{r[key]:.1f}" for r in default),
            ]
        )
    text += (
        f"\n## Batch size and XLA ({DEFAULT_PROCESS}; medians)\n\n"
        + table(
            [
                "measurement",
                "images/s (median)",
                "images/s (best)",
                f"vs batch {default_batch} / XLA off (median)",
                "(best)",
                "GFLOP/s (best)",
                "per round",
            ],
            sweep,
        )
        + "\n"
    )
    cross = []
    for size in (64, 224):
        key = f"extract {size}² batch {default_batch}"
        if key not in default[0]:
            continue
        ref = med(default, key)
        for name, runs in results.items():
            if key in runs[0]:
                cross.append(
                    [
                        f"{size}²",
                        name,
                        f"{med(runs, key):.2f}",
                        f"{best(runs, key, lowest=False):.2f}",
                        f"{med(runs, key) / ref:.3f}",
                        f"{best(runs, key, lowest=False) / best(default, key, lowest=False):.3f}",
                        " ".join(f"{r[key]:.1f}" for r in runs),
                        " ".join(f"{r['others_cores']:.2f}" for r in runs),
                    ]
                )
    text += (
        f"\n## oneDNN and threads (extraction, batch {default_batch}; medians)\n\n"
        + table(
            [
                "size",
                "process",
                "images/s (median)",
                "images/s (best)",
                "vs default (median)",
                "vs default (best)",
                "per round",
                "other processes' cores per round",
            ],
            cross,
            "llrrrrrr",
        )
        + "\n"
    )
    text += (
        "\nA round in which another process takes a core runs at up to half speed (TensorFlow splits each "
        "convolution statically over the cores); the *other processes' cores* column shows each round's "
        "neighbours, and *best* is each setting's least disturbed round.\n"
    )
    publish(out, text, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
