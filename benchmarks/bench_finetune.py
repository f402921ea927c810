"""Fine-tuning stages: training on the cached frozen-prefix output vs the same stage done naively.

Run (from the repository root; writes benchmarks/results/finetune.md)::

    .venv/bin/python benchmarks/bench_finetune.py                  # 1,000 images, 64², 2 epochs/stage, 3 rounds
    .venv/bin/python benchmarks/bench_finetune.py --images 2000 --epochs 3 --rounds 2
    .venv/bin/python benchmarks/bench_finetune.py --smoke           # seconds; checks the script runs

For each default stage (`block5`, `block4`, `all`; the seed's Examples 2 and 3 made systematic),
both variants start from the same trained head checkpoint and run `tasks.finetune.run_stage` with
the same data, epochs, batch size, learning rate and seed, in one process, alternated:

- **vggflow (cached prefix)**: the stage trains `suffix_model` on the cached output of its frozen
  lower blocks (`block4_pool` for block5, `block3_pool` for block4, the preprocessed input for
  `all`), read from the `.npy` cache files batch by batch (what `finetune.cache_frozen_prefix: true` does);
- **naive**: the full classifier with its lower blocks frozen, images streamed from the PNG files
  with tf.data every epoch, the frozen blocks recomputed every batch (`cache_frozen_prefix: false`,
  i.e. the seed's Example 2 fed from disk).

images/s = training images x epochs / `fit` seconds (validation passes included, as users wait for
them). The one-off cost of building the prefix caches (one extra pass, shared with the pooled
features) is reported separately.
"""

from __future__ import annotations

import argparse
import gc
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
    header,
    med,
    publish,
    resolve_out,
    start,
    table,
)

NAME = "finetune"
SEED = 42


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base_args(parser, default_rounds=3)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per stage (both variants)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.size, args.epochs, args.rounds = 30, 32, 1, 1
    info = start(args)
    out = resolve_out(args, NAME)

    import keras

    from vggflow.config import BackboneConfig, Config, FeaturesConfig, FinetuneConfig, HeadConfig, StageConfig
    from vggflow.model import resolve_weights
    from vggflow.stages import plan_prefix_caches
    from vggflow.tasks.features import compute_features
    from vggflow.tasks.finetune import run_stage
    from vggflow.tasks.train_head import train_head_on_features as train_head

    folder = fashion_mnist_folder(args.images)
    rows = dataset_rows(folder)
    classes = sorted(rows["label"].unique())
    weights = resolve_weights(BackboneConfig(weights="none", image_size=args.size), common.cache_root(), seed=SEED)
    scratch = Path(tempfile.mkdtemp(prefix="finetune-", dir=common.cache_root()))
    defaults = FinetuneConfig()
    cfg = Config(
        seed=SEED,
        data={"dir": str(folder)},
        backbone={"weights": "none", "image_size": args.size, "precision": "float32"},
        finetune=FinetuneConfig(
            stages=[
                StageConfig(unfreeze_from=s.unfreeze_from, learning_rate=s.learning_rate, epochs=args.epochs)
                for s in defaults.stages[: 1 if args.smoke else None]
            ],
            patience=args.epochs,  # never stop early: both variants run every epoch
        ),
    )
    plan = plan_prefix_caches(cfg.finetune, args.size, len(rows))
    layers = sorted({layer for layer in plan.values() if layer})
    batch = FeaturesConfig().batch_size
    try:
        # Warm-up (first oneDNN kernels in this process), then the two one-off extractions.
        compute_features(
            rows.iloc[: 2 * batch], folder, weights, args.size, batch, scratch / "cache", "warm-up", [], classes
        )
        t0 = time.perf_counter()
        compute_features(rows, folder, weights, args.size, batch, scratch / "cache", "pooled-only", [], classes)
        pooled_only = time.perf_counter() - t0
        t0 = time.perf_counter()
        features = compute_features(
            rows, folder, weights, args.size, batch, scratch / "cache", common.fingerprint(rows), layers, classes
        )
        with_prefixes = time.perf_counter() - t0
        head = train_head(
            features, weights, args.size, HeadConfig(epochs=3 if not args.smoke else 1), SEED, scratch / "head.keras"
        )
        n_train = int((rows["split"] == "train").sum())

        def variant(stage: StageConfig, prefix: str | None):
            def run() -> dict:
                gc.collect()
                keras.backend.clear_session()
                t = time.perf_counter()
                result = run_stage(head, stage, cfg, features, prefix, scratch / "stage.keras")
                return {
                    "images_s": result.images_per_second,
                    "fit_s": result.seconds,
                    "stage_wall_s": time.perf_counter() - t,
                    "val_acc": result.best_val_accuracy,
                    "val_loss": result.best_val_loss,
                }

            return run

        variants = {}
        for stage in cfg.finetune.stages:
            variants[f"{stage.label} | vggflow (cached {plan[stage.label]})"] = variant(stage, plan[stage.label])
            variants[f"{stage.label} | naive (full model on images)"] = variant(stage, None)
        results = alternate(variants, args.rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    table_rows, speedups = [], []
    for stage in cfg.finetune.stages:
        cached = results[f"{stage.label} | vggflow (cached {plan[stage.label]})"]
        naive = results[f"{stage.label} | naive (full model on images)"]
        speed = med(cached, "images_s") / med(naive, "images_s")
        speed_best = best(cached, "images_s", lowest=False) / best(naive, "images_s", lowest=False)
        speedups.append(f"{stage.label} **{speed:.1f}x** (best rounds: {speed_best:.1f}x)")
        for label, runs in (
            (f"vggflow, trains on cached `{plan[stage.label]}`", cached),
            ("naive: full model, images streamed", naive),
        ):
            table_rows.append(
                [
                    f"`{stage.label}` (lr {stage.learning_rate:g})",
                    label,
                    f"{med(runs, 'images_s'):.1f}",
                    f"{best(runs, 'images_s', lowest=False):.1f}",
                    f"{med(runs, 'images_s') / med(naive, 'images_s'):.2f}x",
                    f"{med(runs, 'fit_s'):.1f}",
                    f"{med(runs, 'stage_wall_s'):.1f}",
                    f"{med(runs, 'val_acc'):.3f}",
                    f"{med(runs, 'val_loss'):.4f}",
                    f"{med(runs, 'cpu_per_wall'):.2f}",
                    f"{med(runs, 'others_cores'):.2f}",
                ]
            )
    text = header(
        "Fine-tuning stages: cached frozen prefix vs naive",
        "python benchmarks/bench_finetune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        f"{args.images} Fashion-MNIST PNG files at {args.size}² ({n_train} training images), {args.epochs} epochs per "
        f"stage, "
        f"finetune.batch_size {cfg.finetune.batch_size}, seed {SEED}; every run starts from the same head checkpoint; "
        f"VGG19 = a seeded random init. {args.rounds} alternating rounds in one process, medians.",
    )
    text += (
        "\n## Results (medians)\n\n"
        + table(
            [
                "stage",
                "variant",
                "images/s (median)",
                "images/s (best)",
                "vs naive (median)",
                "fit s",
                "stage s (incl. load/save)",
                "best val acc",
                "best val loss",
                "CPU s / wall s",
                "other processes' cores",
            ],
            table_rows,
            "llrrrrrrrrr",
        )
        + "\n"
    )
    text += (
        f"\n- Speed-up per stage: {', '.join(speedups)}.\n"
        f"- One-off cost of the prefix caches: extracting pooled features only took {pooled_only:.1f} s, pooled "
        f"features "
        f"+ {', '.join(f'`{layer}`' for layer in layers)} {with_prefixes:.1f} s (one pass computes all of them).\n"
        "- The `all` stage unfreezes every layer: nothing is frozen, so its only saving is decoding and resizing "
        "(its cache holds the preprocessed input).\n"
        "- Validation metrics differ slightly between variants: same data and epochs, but a different shuffle "
        "(tf.data over cached row indices vs over file paths) and float round-off.\n"
    )
    publish(out, text, info, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
