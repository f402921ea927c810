"""Feature extraction from image files vs the best bare in-memory forward pass, and vs the FMA peak.

Run (from the repository root; writes benchmarks/results/extraction.md)::

    .venv/bin/python benchmarks/bench_extraction.py                  # 64² x 1024 images, 224² x 96, 5 rounds
    .venv/bin/python benchmarks/bench_extraction.py --rounds 3 --images64 2048 --sizes 64
    .venv/bin/python benchmarks/bench_extraction.py --smoke           # seconds; checks the script runs

For each image size, in one process and alternating (A, B, C, D, …; medians over the rounds):

- **files → `extract_features`** (vggflow): `vggflow.extraction.extract_features` on the PNG files
  (tf.data decode/resize, compiled forward loop, `.npy` files written batch by batch), pooled features only;
- **files → `extract_features`, flow layers**: the same call with the layers the training flow
  asks for (pooled features + every fine-tuning stage's frozen-prefix output);
- **memory → compiled loop**: the same base + global average pooling as a `tf.function` over
  batches of the *already decoded, resized and preprocessed* arrays held in memory (no I/O, no
  decode, no writes): the best bare forward pass;
- **memory → `model.predict`**: Keras's predict on the same arrays (for information).

GFLOP/s counts VGG19's conv MACs analytically (x2) and is compared with an FMA micro-benchmark
(large float32 matmuls in TensorFlow and NumPy), measured in the same run before and after. The
backbone is a seeded random init (`backbone.weights=none`): same FLOPs and speed as ImageNet
weights. The maximum absolute difference between the features from files and from the bare
loop is reported (they must be the same math).
"""

from __future__ import annotations

import argparse
import shutil
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
    fashion_mnist_folder,
    fma_peak,
    header,
    med,
    publish,
    resolve_out,
    start,
    table,
    vgg19_gflop_per_image,
)

NAME = "extraction"


def flow_layers(image_size: int, n_images: int) -> list[str]:
    """The layers the training flow extracts with the default stages (see flows/train.py)."""
    from vggflow.config import FinetuneConfig
    from vggflow.stages import plan_prefix_caches

    return sorted({layer for layer in plan_prefix_caches(FinetuneConfig(), image_size, n_images).values() if layer})


def measure_size(image_size: int, n_images: int, batch_size: int, rounds: int, scratch: Path, log=print) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf
    from keras.applications import vgg19

    from vggflow.config import BackboneConfig
    from vggflow.datasets import image_dataset
    from vggflow.extraction import extract_features
    from vggflow.model import build_base, resolve_weights

    folder = fashion_mnist_folder(n_images)
    rows = dataset_rows(folder)
    weights = resolve_weights(BackboneConfig(weights="none", image_size=image_size), scratch, seed=42)
    base = build_base(weights, image_size)
    layers_flow = flow_layers(image_size, len(rows))

    # The bare loop's input: exactly what extract_features feeds its model (decoded, resized),
    # then VGG19's preprocess_input, all held in memory.
    paths = [folder / p for p in rows["path"]]
    decoded = np.concatenate([b.numpy() for b in image_dataset(paths, None, image_size, batch_size)])
    arrays = vgg19.preprocess_input(decoded.copy())
    batches = [tf.constant(arrays[i : i + batch_size]) for i in range(0, len(arrays), batch_size)]
    gap = keras.layers.GlobalAveragePooling2D()
    forward = tf.function(lambda x: gap(base(x, training=False)), reduce_retracing=True)
    pooled_model = keras.Model(base.input, gap(base.output))

    def bare_loop() -> dict:
        t0 = time.perf_counter()
        out = [forward(b) for b in batches]
        out[-1].numpy()
        return {"seconds": time.perf_counter() - t0}

    def bare_predict() -> dict:
        t0 = time.perf_counter()
        pooled_model.predict(arrays, batch_size=batch_size, verbose=0)
        return {"seconds": time.perf_counter() - t0}

    def from_files(layers: list[str]):
        def run() -> dict:
            target = Path(tempfile.mkdtemp(dir=scratch))
            marks: list[float] = []
            t0 = time.perf_counter()
            extract_features(
                rows,
                folder,
                base,
                layers,
                image_size,
                batch_size,
                target,
                progress=lambda done, total: marks.append(time.perf_counter()),
            )
            seconds = time.perf_counter() - t0
            shutil.rmtree(target)
            # Steady state: after the first batch (model build + tracing are a fixed cost per call).
            steady = (len(rows) - batch_size) / (marks[-1] - marks[0]) if len(marks) > 1 else float("nan")
            return {"seconds": seconds, "first_batch_s": marks[0] - t0, "steady_images_s": steady}

        return run

    # Warm-up (tracing) and the identity check: features from files == the bare loop's.
    target = Path(tempfile.mkdtemp(dir=scratch))
    extract_features(rows, folder, base, ["avg_pool"], image_size, batch_size, target)
    from_disk = np.load(target / "avg_pool.npy")
    shutil.rmtree(target)
    in_memory = np.concatenate([forward(b).numpy() for b in batches])
    max_abs = float(np.max(np.abs(from_disk - in_memory)))
    scale = float(np.max(np.abs(in_memory)))
    pooled_model.predict(arrays[:batch_size], batch_size=batch_size, verbose=0)
    log(f"  {image_size}²: {len(rows)} images, max |files - memory| = {max_abs:.3g} (features up to {scale:.3g})")

    variants = {
        "files → extract_features (pooled)": from_files(["avg_pool"]),
        "files → extract_features (flow layers)": from_files(layers_flow),
        "memory → compiled loop": bare_loop,
        "memory → model.predict": bare_predict,
    }
    results = alternate(variants, rounds, log=log)
    return {
        "size": image_size,
        "n": len(rows),
        "batch": batch_size,
        "results": results,
        "max_abs": max_abs,
        "scale": scale,
        "layers_flow": layers_flow,
    }


def report(measured: list[dict], peaks: list[dict], command: str) -> str:
    peak = max(p["peak"] for p in peaks)
    text = header(
        "Feature extraction: files on disk vs the best in-memory forward pass",
        command,
        "vggflow's `extract_features` streams PNG files (tf.data: parallel decode + resize, batching, "
        "prefetch) through a compiled forward loop and writes `.npy` files batch by batch. It is compared, "
        "in one process with the variants alternated, with a compiled forward loop over the same images "
        "already decoded, resized and preprocessed in memory (the best bare pass), and with "
        "`model.predict` on those arrays. Backbone: VGG19 conv base, seeded random init (same FLOPs as "
        "ImageNet weights).",
    )
    rows, goals = [], []
    for m in measured:
        res, n, size = m["results"], m["n"], m["size"]
        gflop = vgg19_gflop_per_image(size)
        bare = n / med(res["memory → compiled loop"], "seconds")
        bare_best = n / best(res["memory → compiled loop"], "seconds")
        for name, runs in res.items():
            rate, rate_best = n / med(runs, "seconds"), n / best(runs, "seconds")
            steady = med(runs, "steady_images_s")
            rows.append(
                [
                    f"{size}²",
                    name,
                    f"{med(runs, 'seconds'):.2f}",
                    f"{rate:.1f}",
                    f"{rate_best:.1f}",
                    "" if steady != steady else f"{steady:.1f}",
                    f"{rate / bare:.3f}",
                    f"{rate_best / bare_best:.3f}",
                    f"{rate * gflop:.0f}",
                    f"{100 * rate * gflop / peak:.0f} %",
                    f"{100 * rate_best * gflop / peak:.0f} %",
                    f"{med(runs, 'cpu_per_wall'):.2f}",
                    f"{med(runs, 'others_cores'):.2f}",
                ]
            )
        files_runs = res["files → extract_features (pooled)"]
        files, files_best = n / med(files_runs, "seconds"), n / best(files_runs, "seconds")
        target = 85 if size >= 224 else 70
        goals.append(
            f"- {size}² ({n} images, batch {m['batch']}): files/bare = **{files / bare:.3f}** with medians, "
            f"{files_best / bare_best:.3f} with each variant's best round (goal ≥ 0.95); from files "
            f"**{100 * files * gflop / peak:.0f} %** of the FMA peak (best round {100 * files_best * gflop / peak:.0f} "
            f"%), "
            f"the bare loop {100 * bare * gflop / peak:.0f} % (best {100 * bare_best * gflop / peak:.0f} %) (goal ≥ "
            f"{target} %); "
            f"max |features from files − bare loop| = {m['max_abs']:.2g} (features up to {m['scale']:.3g}); "
            f"flow layers = {', '.join(['avg_pool', *m['layers_flow']])}."
        )
    text += (
        "\n## Results\n\n"
        + table(
            [
                "size",
                "variant",
                "median s",
                "images/s (median)",
                "images/s (best)",
                "steady images/s",
                "vs bare (median)",
                "vs bare (best)",
                "GFLOP/s (median)",
                "of FMA peak (median)",
                "of FMA peak (best)",
                "CPU s / wall s",
                "other processes' cores",
            ],
            rows,
            "llrrrrrrrrrrr",
        )
        + "\n\n"
        + "\n".join(goals)
        + "\n"
    )
    fma_rows = []
    for label, p in zip(("before", "after"), peaks):
        for n in p["tf"]:
            fma_rows.append([label, n, f"{p['tf'][n]:.1f}", f"{p['numpy'][n]:.1f}"])
    text += (
        "\n## FMA micro-benchmark (the machine's compute peak)\n\n"
        + table(["when", "matmul n", "TF GFLOP/s", "NumPy GFLOP/s"], fma_rows)
        + f"\n\nPeak used above: **{peak:.1f} GFLOP/s** (best of all, 2·n³ FLOP per n×n matmul, float32).\n"
        + "\nGFLOP per image (conv layers, 2 × MACs): "
        + ", ".join(f"{m['size']}² = {vgg19_gflop_per_image(m['size']):.3f}" for m in measured)
        + ".\n"
    )
    text += (
        "\n## Reading the numbers\n\n"
        "- *steady images/s* excludes the first batch of each `extract_features` call (building the "
        "multi-output model and tracing the loop, a fixed cost per call, paid once per data version).\n"
        "- *CPU s / wall s* is this process's CPU time per wall second: 2.0 means both cores worked for it; "
        "less means a variant left a core idle or a neighbour took it.\n"
        "- *other processes' cores*: CPU used by everything else on this shared machine during the measurement "
        "(0 = undisturbed). *best* is each variant's least disturbed round.\n"
    )
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base_args(parser, default_rounds=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--images64", type=int, default=1024, help="images at sizes below 224")
    parser.add_argument("--images224", type=int, default=96, help="images at 224² and above")
    parser.add_argument("--batch-size", type=int, help="default: the product's features.batch_size")
    args = parser.parse_args(argv)
    from vggflow.config import FeaturesConfig

    batch = args.batch_size or FeaturesConfig().batch_size
    if args.smoke:
        args.sizes, args.images64, args.images224, args.rounds, batch = [32], 24, 8, 1, 8
    info = start(args)
    out = resolve_out(args, NAME)
    scratch = Path(tempfile.mkdtemp(prefix="extraction-", dir=common.cache_root()))
    try:
        fma_sizes = (256,) if args.smoke else (1024, 2048, 3072)
        fma_seconds = 0.2 if args.smoke else 3.0
        peaks = [fma_peak(fma_sizes, fma_seconds)]
        measured = [
            measure_size(size, args.images224 if size >= 224 else args.images64, batch, args.rounds, scratch)
            for size in args.sizes
        ]
        peaks.append(fma_peak(fma_sizes, fma_seconds))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    command = "python benchmarks/bench_extraction.py " + " ".join(argv if argv is not None else sys.argv[1:])
    runs_by_size = {str(m["size"]): [r for runs in m["results"].values() for r in runs] for m in measured}
    publish(out, report(measured, peaks, command.strip()), info, runs_by_size, raw={"measured": measured, "fma": peaks})
    return 0


if __name__ == "__main__":
    sys.exit(main())
