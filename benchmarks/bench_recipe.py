"""The training recipe: `vggflow train`'s default against the article's three examples and a linear probe.

Run (from the repository root; writes benchmarks/results/recipe.md)::

    .venv/bin/python benchmarks/bench_recipe.py                 # 3 seeds of every row (~1 h on 2 idle cores)
    .venv/bin/python benchmarks/bench_recipe.py --rows vggflow   # only some rows
    .venv/bin/python benchmarks/bench_recipe.py --smoke          # minutes; checks the script runs

Data: 1,000 Fashion-MNIST images of the train split (100 per class, none of them in ``data/``)
to train on, and 1,000 other ones (100 per class) to test on, 28x28 PNGs resized to 64². Every
row starts from the same backbone weights (``--weights``: by default a seeded random init, as
ImageNet weights cannot be downloaded here; ``--weights imagenet`` or a weights file where they
can) and trains on the same images: vggflow's content-hash split of the 1,000 into
train / val / test (the examples and the probe train on its train split and validate on its val
split; vggflow holds its test split out for its own evaluation and gate). Rows, each in a fresh
process, for each seed (the seed moves shuffling, dropout and the head's initial weights):

- **Example 1/2/3, as written** in the article: VGG19 base + GlobalAveragePooling2D + Dense(128,
  relu) + Dense(10, softmax), `model.fit(..., epochs=10, validation_data=...)` on preprocessed
  arrays; Example 1 freezes the base (Adam 1e-3), Example 2 trains its last 5 layers (block5,
  Adam 1e-4), Example 3 every layer (Adam 1e-5). Timed: the fit.
- **linear probe**: the frozen base's pooled features (vggflow's own cache), standardised, and
  scikit-learn's LogisticRegression. Timed: extraction + fit.
- **vggflow train**: the whole command with the default config (`backbone.weights` pointed at the
  shared weights file, `backbone.image_size` 64), scored on the 1,000 test images through the
  registered model. With ``--precisions`` it runs per precision (``auto`` resolves to
  mixed_bfloat16 where the CPU has native bfloat16).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import common
from common import (
    base_args,
    dataset_rows,
    emit,
    header,
    measure_once,
    publish,
    resolve_out,
    run_child,
    run_process,
    start,
    table,
)

NAME = "recipe"
WEIGHTS_SEED = 7
SIZE = 64
PROBE = "linear probe (standardised pooled features)"
EXAMPLES = {1: ("frozen base", 1e-3), 2: ("block5 trainable", 1e-4), 3: ("every layer trainable", 1e-5)}


def recipe_data(per_class: int) -> tuple[Path, Path]:
    """Training pool and test folders (``per_class`` images per class each), disjoint and outside ``data/``."""
    import numpy as np
    from build_demo_data import CLASS_NAMES, read_idx, select_indices
    from PIL import Image

    root = common.cache_root() / f"recipe-{per_class}"
    pool, test = root / "train_pool", root / "test"
    if (root / ".complete").exists():
        return pool, test
    images = read_idx(common.FASHION_SOURCE, "train-images-idx3-ubyte")
    labels = read_idx(common.FASHION_SOURCE, "train-labels-idx1-ubyte")
    demo = {int(i) for indices in select_indices(labels).values() for i in indices}
    order = np.random.default_rng(1).permutation(len(labels))
    for cls, name in enumerate(CLASS_NAMES):
        chosen = [int(i) for i in order[labels[order] == cls] if int(i) not in demo][: 2 * per_class]
        for folder, indices in ((pool, chosen[:per_class]), (test, chosen[per_class:])):
            (folder / name).mkdir(parents=True, exist_ok=True)
            for index in indices:
                Image.fromarray(images[index]).save(folder / name / f"{name}_{index:05d}.png", compress_level=6)
    (root / ".complete").write_text("ok")
    return pool, test


def shared_weights(choice: str):
    """The backbone every row starts from: ``none`` (a seeded random init), ``imagenet`` or a weights file."""
    from vggflow.config import BackboneConfig
    from vggflow.model import resolve_weights

    return resolve_weights(BackboneConfig(weights=choice, image_size=SIZE), common.cache_root(), seed=WEIGHTS_SEED)


def _arrays(folder: Path, rows, classes: list[str]):
    """Decoded, resized, VGG19-preprocessed images of ``rows`` and their class indices."""
    import numpy as np
    from keras.applications import vgg19

    from vggflow.datasets import image_dataset

    x = np.concatenate([b.numpy() for b in image_dataset([folder / p for p in rows["path"]], None, SIZE, 64)])
    return vgg19.preprocess_input(x), rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()


def _test_rows(test: Path):
    import pandas as pd

    return pd.DataFrame(
        [{"path": p.relative_to(test).as_posix(), "label": p.parent.name} for p in sorted(test.glob("*/*.png"))]
    )


def child_example(args) -> dict:
    """The article's Example N, as written (at 64², from the shared weights)."""
    import keras
    import numpy as np
    from keras.applications import VGG19

    pool, test = recipe_data(args.per_class)
    rows = dataset_rows(pool)
    classes = sorted(rows["label"].unique())
    train, val = (_arrays(pool, rows[rows["split"] == s], classes) for s in ("train", "val"))
    x_test, y_test = _arrays(test, _test_rows(test), classes)
    keras.utils.set_random_seed(args.seed)
    base_model = VGG19(weights=None, include_top=False, input_shape=(SIZE, SIZE, 3))
    base_model.load_weights(str(shared_weights(args.weights).path))
    if args.example == 1:
        base_model.trainable = False
    elif args.example == 2:
        for layer in base_model.layers[:-5]:
            layer.trainable = False
        for layer in base_model.layers[-5:]:
            layer.trainable = True
    else:
        base_model.trainable = True
    x = keras.layers.GlobalAveragePooling2D()(base_model.output)
    x = keras.layers.Dense(128, activation="relu")(x)
    predictions = keras.layers.Dense(len(classes), activation="softmax")(x)
    model = keras.Model(inputs=base_model.input, outputs=predictions)
    learning_rate = EXAMPLES[args.example][1]
    # Sparse labels: the same loss as the article's one-hot categorical cross-entropy.
    model.compile(keras.optimizers.Adam(learning_rate), "sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(*train, epochs=args.epochs, validation_data=val, verbose=0)
    seconds = time.perf_counter() - started
    accuracy = float(np.mean(model.predict(x_test, batch_size=64, verbose=0).argmax(axis=1) == y_test))
    return {"seconds": seconds, "test_acc": accuracy, "n_train": len(train[1])}


def child_probe(args) -> dict:
    """Standardised pooled features of the frozen base + logistic regression."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from vggflow.extraction import extract_features
    from vggflow.feature_cache import load_layer
    from vggflow.model import build_base
    from vggflow.tasks.features import compute_features

    pool, test = recipe_data(args.per_class)
    rows = dataset_rows(pool)
    classes = sorted(rows["label"].unique())
    weights = shared_weights(args.weights)
    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    started = time.perf_counter()
    features = compute_features(rows, pool, weights, SIZE, 32, scratch, common.fingerprint(rows), [], classes)
    x_train, y_train = (np.asarray(a[: len(a)]) for a in load_layer(features, "avg_pool", "train"))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=args.seed))
    probe.fit(x_train, y_train)
    seconds = time.perf_counter() - started
    test_rows = _test_rows(test)
    paths = extract_features(test_rows, test, build_base(weights, SIZE), ["avg_pool"], SIZE, 32, scratch / "test")
    y_test = test_rows["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    accuracy = float(np.mean(probe.predict(np.load(paths["avg_pool"])) == y_test))
    return {"seconds": seconds, "test_acc": accuracy, "n_train": len(y_train)}


def child_score(args) -> dict:
    """The registered model of a project, through its pyfunc interface, on the test images."""
    import mlflow
    import numpy as np

    from vggflow.images import load_rgb

    _, test = recipe_data(args.per_class)
    rows = _test_rows(test)
    model = mlflow.pyfunc.load_model("models:/vgg19-classifier/1")
    predicted = []
    for start_at in range(0, len(rows), 64):
        batch = np.stack([load_rgb(test / p) for p in rows["path"][start_at : start_at + 64]])
        predicted += list(model.predict(batch)["label"])
    return {"test_acc": float(np.mean(np.asarray(predicted) == rows["label"].to_numpy()))}


def vggflow_row(args, seed: int, precision: str) -> dict:
    """`vggflow train` with the default config, timed as a user runs it, then scored on the test images."""
    pool, _ = recipe_data(args.per_class)
    project = common.new_project(Path(args.scratch), f"vggflow-{precision}-{seed}")
    (project / "bench.yaml").write_text(
        f"seed: {seed}\nbackbone:\n  weights: {args.backbone_path}\n  image_size: {SIZE}\n"
        f"  precision: {precision}\nregistry:\n  thresholds: {{accuracy: 0.0}}\n"
    )
    argv = [str(common.VGGFLOW), "train", "--config", "bench.yaml", "--data", str(pool)]
    if args.smoke:
        argv += ["--set", "head.epochs=2", "--set", "finetune.stages=[]"]
    result = run_process(argv, env=common.project_env(project), cwd=project, log_file=project / "train.log")
    if result["returncode"] != 0:
        raise RuntimeError(f"vggflow train failed:\n{(project / 'train.log').read_text()[-3000:]}")
    env = {"MLFLOW_TRACKING_URI": common.project_env(project)["MLFLOW_TRACKING_URI"]}
    score = run_child(Path(__file__), [*_child_args(args, "score", seed)], env=env)
    return {"seconds": result["wall_s"], "test_acc": score["test_acc"]}


def _child_args(args, kind: str, seed: int, example: int = 0) -> list[str]:
    return [
        "--child", kind, "--seed", str(seed), "--example", str(example), "--scratch", str(args.scratch),
        "--per-class", str(args.per_class), "--epochs", str(args.epochs), "--weights", args.weights,
    ]  # fmt: skip


def summarize(results: dict[str, list[dict]]) -> tuple[str, dict[str, float]]:
    import numpy as np

    lines, means = [], {}
    for name, runs in results.items():
        accuracy = np.array([r["test_acc"] for r in runs])
        means[name] = float(accuracy.mean())
        lines.append(
            [
                name,
                f"{accuracy.mean():.3f} ± {accuracy.std(ddof=1) if len(runs) > 1 else 0:.3f}",
                ", ".join(f"{a:.3f}" for a in accuracy),
                f"{np.median([r['seconds'] for r in runs]):.0f}",
            ]
        )
    return table(["row", "test accuracy (mean ± sd)", "per seed", "seconds (median)"], lines, "lrlr"), means


def goal_lines(results: dict[str, list[dict]]) -> str:
    """The issue's goal, read off the rows: vggflow's default against the best example and the probe."""
    import numpy as np

    def mean(name: str, key: str = "test_acc") -> float:
        return float(np.mean([r[key] for r in results[name]]))

    examples = [name for name in results if name.startswith("Example")]
    ours = [name for name in results if name.startswith("vggflow")]
    if not examples or not ours:
        return ""
    best = max(examples, key=mean)
    lines = [f"Best example: {best}: {mean(best):.3f}, fit {np.median([r['seconds'] for r in results[best]]):.0f} s."]
    for name in ours:
        line = f"- {name}: {100 * (mean(name) - mean(best)):+.1f} points vs the best example"
        if PROBE in results:
            line += f", {100 * (mean(name) - mean(PROBE)):+.1f} vs the linear probe"
        ratio = np.median([r["seconds"] for r in results[name]]) / np.median([r["seconds"] for r in results[best]])
        lines.append(line + f"; whole command {ratio:.2f}x the best example's fit time.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base_args(parser, default_rounds=3)
    parser.add_argument("--rows", nargs="+", default=["examples", "probe", "vggflow"])
    parser.add_argument("--precisions", nargs="+", default=["float32", "auto"])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10, help="the examples' epochs (as written: 10)")
    parser.add_argument("--weights", default="none", help="every row's backbone: none (random init), imagenet, a file")
    parser.add_argument("--child", choices=["example", "probe", "score"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    parser.add_argument("--example", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        emit({"example": child_example, "probe": child_probe, "score": child_score}[args.child](args))
        return 0
    if args.smoke:
        args.per_class, args.epochs, args.rounds, args.precisions = 6, 1, 1, args.precisions[:1]
    info = start(args)
    from vggflow.errors import BackboneError

    try:
        backbone = shared_weights(args.weights)
    except BackboneError as err:
        print(f"bench_recipe.py: --weights {args.weights}: {err}", file=sys.stderr)
        return 2
    out = resolve_out(args, NAME)
    seeds = [42 + i for i in range(args.rounds)]
    args.scratch = tempfile.mkdtemp(prefix="vggflow-bench-recipe-", dir=common.cache_root())
    recipe_data(args.per_class)
    args.backbone_path = backbone.path  # resolved once for every vggflow row (the children resolve their own)
    backbone_name = "a seeded random init" if backbone.random_init else backbone.identity
    results: dict[str, list[dict]] = {}
    for done, seed in enumerate(seeds, 1):  # seeds outermost: a drift of the machine hits every row alike
        if "vggflow" in args.rows:
            for precision in args.precisions:
                name = f"vggflow train, default config, precision {precision}"
                results.setdefault(name, []).append(measure_once(lambda p=precision, s=seed: vggflow_row(args, s, p)))
        if "probe" in args.rows and seed == seeds[0]:  # deterministic: once
            probe_args = _child_args(args, "probe", seed)
            results[PROBE] = [measure_once(lambda probe_args=probe_args: run_child(Path(__file__), probe_args))]
        if "examples" in args.rows:
            for number, (what, rate) in EXAMPLES.items():
                if args.smoke and number != 1:  # one example (the cheapest) checks the script runs
                    continue
                name = f"Example {number} ({what}, Adam {rate:g}, {args.epochs} epochs)"
                child = _child_args(args, "example", seed, number)
                results.setdefault(name, []).append(measure_once(lambda child=child: run_child(Path(__file__), child)))
        # Published after every seed: a long run cut short still leaves its finished seeds.
        text, _ = summarize(results)
        body = header(
            "Training recipe: vggflow train vs the article's examples and a linear probe",
            "python benchmarks/bench_recipe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            f"{10 * args.per_class} training images and {10 * args.per_class} test images (Fashion-MNIST train "
            f"split, none in data/), {SIZE}², one shared backbone ({backbone_name}), seeds {seeds[:done]}"
            f"{'' if done == len(seeds) else f' (of {seeds}: the run was cut short)'}. See the script's docstring.",
        )
        body += "\n## Results\n\n" + text + "\n\n" + goal_lines(results) + "\n"
        publish(out, body, info, results)
        print(text, flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
