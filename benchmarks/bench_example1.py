"""Feature-extraction training: vggflow end to end vs the seed's Example 1, same data, head and seed.

Run (from the repository root; writes benchmarks/results/example1.md)::

    .venv/bin/python benchmarks/bench_example1.py                    # 1,000 images, 64², 10 epochs, 3 rounds
    .venv/bin/python benchmarks/bench_example1.py --images 2000 --rounds 2
    .venv/bin/python benchmarks/bench_example1.py --smoke             # seconds; checks the script runs

The two ways, each in a fresh child process (TensorFlow's import is not timed), alternated
(seed, vggflow, vggflow, seed, …; medians):

- **the seed's Example 1, literally**: `VGG19(include_top=False, input_shape=(64, 64, 3))`, frozen,
  inside the model, + GlobalAveragePooling2D + Dense(128, relu) + Dense(n, softmax), compiled with
  Adam, `model.fit(train_images, train_labels, epochs=10, validation_data=(val_images, val_labels))`
  on preprocessed arrays held in memory (the recipe needs them there). Timed from decoding the
  files to the end of `fit`.
- **vggflow**: `tasks.features.compute_features` from the PNG files (the frozen base run once per
  training and validation image, cached) + `tasks.train_head.train_head` (the same head, fitted
  on the cached pooled features, checkpoint saved). Timed from the first file read to the saved
  checkpoint.

Neither way's test predictions are timed: the seed's `model.predict` on its test arrays, and
vggflow's saved classifier on the test images (what its evaluate step does; test images are not
in the feature cache).

Same Fashion-MNIST PNG files and content-hash split (vggflow's), same base weights (a seeded
random init: ImageNet weights cannot be downloaded here), the seed's head starts from a copy of
vggflow's head initialisation, same seed, batch size, epochs and (Keras) shuffle, so both
optimise the same function: the report gives both test accuracies and the largest difference
between the two trained heads' weights. vggflow keeps the epoch with the best validation loss
(early stopping's `restore_best_weights`); the seed keeps its last epoch: both are reported, and
the seed's head at its own best-validation-loss epoch too (recorded by a passive callback).
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
    emit,
    fashion_mnist_folder,
    header,
    med,
    publish,
    resolve_out,
    run_child,
    start,
    table,
)

NAME = "example1"
SEED = 42


def _setup(args):
    from vggflow.config import BackboneConfig
    from vggflow.model import resolve_weights

    folder = fashion_mnist_folder(args.images)
    rows = dataset_rows(folder)
    weights = resolve_weights(BackboneConfig(weights="none", image_size=args.size), common.cache_root(), seed=SEED)
    classes = sorted(rows["label"].unique())
    return folder, rows, weights, classes


def _head_cfg(args):
    from vggflow.config import HeadConfig

    # patience = epochs: early stopping never stops early (both ways run every epoch).
    return HeadConfig(epochs=args.epochs, patience=args.epochs, batch_size=32, learning_rate=1e-3, dense_units=128)


def _decoded(folder: Path, part, args):
    """The split's PNG files decoded and resized as vggflow's pipeline does, in one array."""
    import numpy as np

    from vggflow.datasets import image_dataset

    return np.concatenate(
        [b.numpy() for b in image_dataset([folder / p for p in part["path"]], None, args.size, args.batch_size)]
    )


def _accuracy(probabilities, labels) -> float:
    import numpy as np

    return float(np.mean(np.argmax(probabilities, axis=1) == labels))


def child_seed(args) -> dict:
    """The seed's Example 1, literally (plus a passive per-epoch weight recorder)."""
    import keras
    import numpy as np
    from keras.applications import VGG19, vgg19

    import vggflow.datasets  # noqa: F401  (used by _decoded; imported before anything is timed)
    from vggflow.model import build_base, build_classifier

    folder, rows, weights, classes = _setup(args)
    index = {name: i for i, name in enumerate(classes)}
    cfg = _head_cfg(args)
    # Not timed: vggflow's head initialisation (train_head has a base, seeds, builds the classifier).
    base = build_base(weights, args.size)
    keras.utils.set_random_seed(SEED)
    reference = build_classifier(base, len(classes), cfg, args.size, SEED)
    head_init = {name: reference.get_layer(name).get_weights() for name in ("head_dense", "predictions")}
    del reference

    started = time.perf_counter()
    data = {}
    for split in ("train", "val", "test"):
        part = rows[rows["split"] == split]
        data[split] = (vgg19.preprocess_input(_decoded(folder, part, args)), part["label"].map(index).to_numpy())
    loaded = time.perf_counter() - started

    keras.utils.set_random_seed(SEED)
    base_model = VGG19(weights=None, include_top=False, input_shape=(args.size, args.size, 3))
    base_model.load_weights(str(weights.path))
    base_model.trainable = False
    x = keras.layers.GlobalAveragePooling2D()(base_model.output)
    x = keras.layers.Dense(128, activation="relu", name="head_dense")(x)
    predictions = keras.layers.Dense(len(classes), activation="softmax", name="predictions")(x)
    model = keras.Model(inputs=base_model.input, outputs=predictions)
    for name, values in head_init.items():
        model.get_layer(name).set_weights(values)
    # sparse labels = the seed's one-hot categorical cross-entropy (same loss), as train_head uses.
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    per_epoch: list[dict] = []
    recorder = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: per_epoch.append(
            {name: model.get_layer(name).get_weights() for name in ("head_dense", "predictions")}
        )
    )
    keras.utils.set_random_seed(SEED)
    fitted = model.fit(*data["train"], epochs=args.epochs, validation_data=data["val"], callbacks=[recorder], verbose=0)
    seconds = time.perf_counter() - started

    x_test, y_test = data["test"]
    final_acc = _accuracy(model.predict(x_test, batch_size=args.batch_size, verbose=0), y_test)
    best_epoch = int(np.argmin(fitted.history["val_loss"]))
    for name, values in per_epoch[best_epoch].items():
        model.get_layer(name).set_weights(values)
    best_acc = _accuracy(model.predict(x_test, batch_size=args.batch_size, verbose=0), y_test)
    np.savez(
        Path(args.scratch) / "seed_head.npz",
        *[w for name in ("head_dense", "predictions") for w in per_epoch[best_epoch][name]],
    )
    return {
        "seconds": seconds,
        "load_s": loaded,
        "test_acc_final": final_acc,
        "test_acc_best_val_loss": best_acc,
        "best_epoch": best_epoch,
        "n_train": len(data["train"][1]),
        "n_val": len(data["val"][1]),
        "n_test": len(y_test),
        "val_loss": fitted.history["val_loss"],
    }


def child_vggflow(args) -> dict:
    """vggflow: features computed once from the files, cached; the head trained on them."""
    import keras
    import numpy as np

    from vggflow.tasks.features import compute_features
    from vggflow.tasks.train_head import train_head_on_features as train_head

    folder, rows, weights, classes = _setup(args)
    cache = Path(tempfile.mkdtemp(dir=args.scratch))
    checkpoint = cache / "head.keras"
    epochs_seen: list[dict] = []
    started = time.perf_counter()
    features = compute_features(
        rows, folder, weights, args.size, args.batch_size, cache, common.fingerprint(rows), [], classes
    )
    extracted = time.perf_counter() - started
    result = train_head(
        features,
        weights,
        args.size,
        _head_cfg(args),
        SEED,
        checkpoint,
        on_epoch=lambda epoch, logs: epochs_seen.append(logs),
    )
    seconds = time.perf_counter() - started

    # Not timed, like the seed's test predictions: the whole saved classifier on the test images,
    # as a client of the registered model would (test images are not in the training extraction).
    model = keras.saving.load_model(checkpoint)
    test = rows[rows["split"] == "test"]
    y_test = test["label"].map({name: i for i, name in enumerate(classes)}).to_numpy()
    acc = _accuracy(model.predict(_decoded(folder, test, args), batch_size=args.batch_size, verbose=0), y_test)
    np.savez(
        Path(args.scratch) / "vggflow_head.npz",
        *[w for name in ("head_dense", "predictions") for w in model.get_layer(name).get_weights()],
    )
    shutil.rmtree(cache)
    return {
        "seconds": seconds,
        "extract_s": extracted,
        "head_fit_s": result.seconds,
        "test_acc": acc,
        "best_epoch": result.best_epoch,
        "n_test": len(y_test),
        "val_loss": [e["val_loss"] for e in epochs_seen],
    }


def _head_diff(scratch: Path) -> float:
    import numpy as np

    a, b = np.load(scratch / "seed_head.npz"), np.load(scratch / "vggflow_head.npz")
    return float(max(np.max(np.abs(a[k] - b[k])) for k in a.files))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base_args(parser, default_rounds=3)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument(
        "--batch-size", type=int, help="forward-pass batch (default: the product's features.batch_size)"
    )
    parser.add_argument("--in-process", action="store_true", help="run both ways in this process (smoke tests)")
    parser.add_argument("--child", choices=["seed", "vggflow"], help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from vggflow.config import FeaturesConfig

    args.batch_size = args.batch_size or FeaturesConfig().batch_size
    if args.smoke:
        args.images, args.size, args.epochs, args.rounds, args.in_process = 30, 32, 1, 1, True
    if args.cache:
        import os

        os.environ["VGGFLOW_BENCH_CACHE"] = str(args.cache)
    if args.child:
        emit((child_seed if args.child == "seed" else child_vggflow)(args))
        return 0

    info = start(args)
    out = resolve_out(args, NAME)
    _setup(args)  # generate the data and the random weights once, before timing anything
    scratch = Path(tempfile.mkdtemp(prefix="example1-", dir=common.cache_root()))
    args.scratch = str(scratch)

    def way(name: str):
        def run() -> dict:
            if args.in_process:
                return child_seed(args) if name == "seed" else child_vggflow(args)
            child_args = [
                "--child",
                name,
                "--scratch",
                str(scratch),
                "--images",
                str(args.images),
                "--size",
                str(args.size),
                "--epochs",
                str(args.epochs),
                "--batch-size",
                str(args.batch_size),
            ]
            t0 = time.perf_counter()
            result = run_child(Path(__file__), child_args)
            result["process_s"] = time.perf_counter() - t0
            return result

        return run

    try:
        results = alternate({"seed's Example 1": way("seed"), "vggflow": way("vggflow")}, args.rounds)
        diff = _head_diff(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seed, ours = results["seed's Example 1"], results["vggflow"]
    ratio = med(seed, "seconds") / med(ours, "seconds")
    ratio_best = best(seed, "seconds") / best(ours, "seconds")
    rows = [
        [
            "seed's Example 1 (frozen base inside the model, fit on images)",
            f"{med(seed, 'seconds'):.1f}",
            f"{med(seed, 'load_s'):.1f} load to memory",
            "1.0x",
            f"{100 * med(seed, 'test_acc_final'):.2f} %",
            f"{100 * med(seed, 'test_acc_best_val_loss'):.2f} %",
        ],
        [
            "vggflow (compute_features once + train_head)",
            f"{med(ours, 'seconds'):.1f}",
            f"{med(ours, 'extract_s'):.1f} extraction, {med(ours, 'head_fit_s'):.1f} head fit",
            f"**{ratio:.1f}x**",
            "—",
            f"{100 * med(ours, 'test_acc'):.2f} %",
        ],
    ]
    n = seed[0]
    text = header(
        "Feature-extraction training: vggflow vs the seed's Example 1",
        "python benchmarks/bench_example1.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        f"{args.images} Fashion-MNIST PNG files (28x28, resized to {args.size}²), split by content hash as vggflow's "
        f"validation does: {n['n_train']} train / {n['n_val']} val / {n['n_test']} test. {args.epochs} epochs, "
        f"batch 32, Adam 1e-3, seed {SEED}, head Dense(128, relu) + Dense(10, softmax) with the same initial "
        "weights in both ways; VGG19 base = a seeded random init (same compute as ImageNet weights). Each way "
        f"runs in a fresh process; {args.rounds} alternating rounds, medians. See the docstring of the script "
        "for exactly what is timed.",
    )
    text += (
        "\n## Results (medians)\n\n"
        + table(
            [
                "way",
                "wall s (end to end)",
                "of which",
                "speed-up",
                "test acc, last epoch",
                "test acc, best-val-loss epoch",
            ],
            rows,
            "lrlrrr",
        )
        + "\n"
    )
    acc_gap = 100 * abs(med(ours, "test_acc") - med(seed, "test_acc_best_val_loss"))
    acc_gap_final = 100 * abs(med(ours, "test_acc") - med(seed, "test_acc_final"))
    lines = [
        f"- Speed-up end to end: **{ratio:.1f}x** with medians, {ratio_best:.1f}x with each way's best round (goal ≥ "
        "10x). "
        "Per round (seed vs vggflow; other processes' cores during each): "
        + ", ".join(
            f"{s['seconds']:.0f} s ({s['others_cores']:.2f}) vs {o['seconds']:.1f} s ({o['others_cores']:.2f})"
            for s, o in zip(seed, ours)
        )
        + ".",
        f"- Test accuracy: vggflow {100 * med(ours, 'test_acc'):.2f} % vs the seed "
        f"{100 * med(seed, 'test_acc_best_val_loss'):.2f} % "
        f"with the same selection rule (best validation loss; |Δ| = {acc_gap:.2f} points) and "
        f"{100 * med(seed, 'test_acc_final'):.2f} % "
        f"at its last epoch (|Δ| = {acc_gap_final:.2f} points); goal: equal within ±1 point. "
        f"Best epochs (0-based): seed {[s['best_epoch'] for s in seed]}, vggflow {[o['best_epoch'] for o in ours]}.",
        f"- Largest |weight difference| between the two trained heads (same epoch, last round): {diff:.2g} "
        "(float32 round-off of the same optimisation when small).",
        f"- Validation loss per epoch, round 1 — seed: {', '.join(f'{v:.4f}' for v in seed[0]['val_loss'])}; "
        f"vggflow: {', '.join(f'{v:.4f}' for v in ours[0]['val_loss'])}.",
    ]
    if not args.in_process:
        lines.append(
            f"- Child process wall time incl. Python/TensorFlow start-up (not in the comparison): seed "
            f"{med(seed, 'process_s'):.1f} s, vggflow {med(ours, 'process_s'):.1f} s."
        )
    text += "\n" + "\n".join(lines) + "\n"
    publish(out, text, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
