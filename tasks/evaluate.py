"""Step 6, evaluate: score the chosen classifier on the test split and write its report files.

The classifier is fed raw decoded images exactly as a client of the registered model would
(its own resize and preprocessing inside), so the reported numbers are the exported model's.
When the chosen model's lower layers are the frozen backbone (a head-only model, or a stage
trained on a cached prefix), their output for the test images is cached once per data version
and only the layers above it run, so iterating on the head does not push every test image
through VGG19 again. A spread sample of test images is still scored through the whole saved
model and must agree; if it does not, every test image is scored that way instead. The
test-set probabilities are kept, keyed by the checkpoint's content and the test images
(``vggflow/scoring.py``): a re-run that chose the same checkpoint on the same data reuses them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from prefect import task

from vggflow.caching import code_version
from vggflow.checks import check_disk_space, required_bytes
from vggflow.config import Config, EvaluateConfig
from vggflow.extraction import extract_features
from vggflow.feature_cache import (
    TEST_DIR,
    FeatureSet,
    RowView,
    ScoringPrefix,
    bytes_per_image,
    scoring_prefix_layer,
    verified_arrays,
)
from vggflow.files import atomic_write_text, read_rows
from vggflow.hashing import file_sha256
from vggflow.progress import progress_logger
from vggflow.runs import TrainingRun
from vggflow.scoring import Evaluation, reuse_or_compute, score, scores_dir, scores_file
from vggflow.training import StageResult

if TYPE_CHECKING:
    from vggflow.model import ResolvedWeights
    from vggflow.validation import ValidatedData


#: Test images scored through the whole saved model when the rest come from a cached prefix.
CHECKED_IMAGES = 8

#: Largest difference in any class probability allowed between the two routes: they are the
#: same layers on the same pixels, differing only by float round-off (batch composition).
PREFIX_TOLERANCE = 1e-4


def compute_scoring_prefix(
    rows: pd.DataFrame,
    data_dir: Path,
    weights,
    image_size: int,
    batch_size: int,
    features_dir: Path,
    prefix_cache: str | None,
    unfreeze_from: str | None,
    progress=None,
) -> ScoringPrefix | None:
    """Make sure the test rows' output of the chosen model's frozen part is cached (once per data version).

    Args:
        rows: usable manifest rows (only the test split is used).
        data_dir: dataset root.
        weights: the resolved backbone weights (the frozen part's weights).
        image_size: square input side.
        batch_size: images per forward pass.
        features_dir: this data version's feature cache folder (:attr:`FeatureSet.directory`).
        prefix_cache: the chosen stage's ``prefix_cache`` (see :func:`scoring_prefix_layer`).
        unfreeze_from: the chosen stage's first trainable block (None: head only).

    Returns:
        A reference to the cached array, or None when the chosen model has no frozen part to
        skip or there are no test rows (then the test images are scored through the whole model).
    """
    from vggflow.model import build_base

    layer = scoring_prefix_layer(prefix_cache)
    test = rows[rows["split"] == "test"].reset_index(drop=True)
    if layer is None or len(test) == 0:
        return None
    directory = Path(features_dir) / TEST_DIR
    started, seconds = time.perf_counter(), 0.0
    if layer not in verified_arrays(directory, test):
        check_disk_space(directory, required_bytes(len(test), bytes_per_image([layer], image_size), 0))
        extract_features(
            test, data_dir, build_base(weights, image_size), [layer], image_size, batch_size, directory, progress
        )
        seconds = time.perf_counter() - started
    return ScoringPrefix(
        directory=directory, layer=layer, unfreeze_from=unfreeze_from, n_images=len(test), seconds=seconds
    )


def scores_from_prefix(
    model,
    prefix: ScoringPrefix,
    test_rows: pd.DataFrame,
    whole_model: Callable[[list[Path]], np.ndarray],
    paths: list[Path],
    batch_size: int,
) -> tuple[np.ndarray | None, str]:
    """Test-set probabilities from the cached frozen-part outputs, checked against the whole model.

    Args:
        model: the loaded classifier (its layers above ``prefix.layer`` run here).
        prefix: the test images' cached output of the model's frozen part.
        test_rows: the test rows, in the order the prefix was cached for.
        whole_model: scores image files through the whole classifier (the check).
        paths: the test image files, aligned with ``test_rows``.
        batch_size: rows per forward pass.

    Returns:
        The probabilities, or None when the cache does not match these rows or the check
        disagrees (then score the images); and a line saying which and why.
    """
    from vggflow.model import head_model, suffix_model

    if prefix.layer not in verified_arrays(prefix.directory, test_rows.reset_index(drop=True)):
        return None, f"images (the cached {prefix.layer} of the test images does not match them)"
    upper = head_model(model) if prefix.layer == "avg_pool" else suffix_model(model, prefix.unfreeze_from)
    rows = RowView(prefix.directory / f"{prefix.layer}.npy", np.arange(len(test_rows)))
    probabilities = np.concatenate(
        [np.asarray(upper.predict_on_batch(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]
    )
    sample = np.unique(np.linspace(0, len(paths) - 1, min(CHECKED_IMAGES, len(paths))).round().astype(int))
    difference = float(np.max(np.abs(whole_model([paths[i] for i in sample]) - probabilities[sample])))
    if not difference <= PREFIX_TOLERANCE:
        return None, (
            f"images (the cached {prefix.layer} route differed from the whole model by {difference:.2g} "
            f"on {len(sample)} test images, more than {PREFIX_TOLERANCE:g})"
        )
    return probabilities, (
        f"cached {prefix.layer} of the test images ({len(sample)} also scored through the whole "
        f"model: max |difference| {difference:.1g})"
    )


def evaluate_classifier(
    checkpoint: Path,
    test_rows: pd.DataFrame,
    data_dir: Path,
    class_names: list[str],
    cfg: EvaluateConfig,
    out_dir: Path,
    scores_dir: Path | None = None,
    prefix: ScoringPrefix | None = None,
) -> Evaluation:
    """Score a saved classifier on the test rows and write the report files into ``out_dir``.

    Files: confusion matrix PNG, per-class CSV + chart, predictions CSV, a grid of the worst
    misclassified test images. With ``scores_dir`` (this data version's, see :func:`scores_file`),
    the probabilities are kept there and reused by a later call on the same checkpoint content.
    With ``prefix``, the test images' cached frozen-part outputs feed the layers above them
    (:func:`scores_from_prefix`).
    """
    from vggflow.datasets import predict_in_batches
    from vggflow.images import load_rgb
    from vggflow.reports import evaluation_figures

    paths = [Path(data_dir) / p for p in test_rows["path"]]
    route = {"from": "kept scores"}

    def predict_test_set() -> np.ndarray:
        import keras

        model = keras.saving.load_model(checkpoint, compile=False)

        def whole_model(files: list[Path]) -> np.ndarray:
            return predict_in_batches(
                lambda batch: model.predict_on_batch(batch.astype(np.float32)), files, cfg.batch_size
            )

        if prefix is not None:
            probabilities, route["from"] = scores_from_prefix(
                model, prefix, test_rows, whole_model, paths, cfg.batch_size
            )
            if probabilities is not None:
                return probabilities
            print(f"evaluate: scoring the test images through the whole model: {route['from']}")
        else:
            route["from"] = "images"
        return whole_model(paths)

    # The route is part of the key: the two differ by float round-off, and kept scores are exact.
    identity = f"checkpoint-{file_sha256(checkpoint)}" + (f"-from-{prefix.layer}" if prefix is not None else "")
    cache = scores_file(scores_dir, identity, test_rows, class_names, cfg.batch_size, code_version(__name__))
    started = time.perf_counter()
    probabilities, reused = reuse_or_compute(cache, len(paths), predict_test_set)
    seconds = 0.0 if reused else time.perf_counter() - started
    index = {name: i for i, name in enumerate(class_names)}
    y_true = test_rows["label"].map(index).to_numpy()
    y_pred = probabilities.argmax(axis=1)
    metrics, confusion = score(y_true, y_pred, len(class_names))
    out_dir.mkdir(parents=True, exist_ok=True)
    table = evaluation_figures.per_class_metrics(y_true, y_pred, class_names)
    files = {
        "confusion_matrix": evaluation_figures.plot_confusion_matrix(
            confusion, class_names, out_dir / "confusion_matrix.png"
        )
    }
    files["per_class_csv"], files["per_class_png"] = evaluation_figures.write_per_class_outputs(
        table, out_dir / "per_class_metrics.csv", out_dir / "per_class_metrics.png"
    )
    predictions = test_rows[["path", "label"]].assign(
        predicted=[class_names[i] for i in y_pred], confidence=probabilities.max(axis=1) if len(y_pred) else []
    )
    files["predictions"] = out_dir / "test_predictions.csv"
    atomic_write_text(files["predictions"], predictions.to_csv(index=False))
    worst = evaluation_figures.worst_misclassified(y_true, probabilities, cfg.worst_examples)
    files["misclassified"] = evaluation_figures.plot_misclassified_grid(
        [evaluation_figures.shrink_for_figure(load_rgb(paths[i])) for i in worst],  # not 16 full-size photos at once
        [class_names[y_true[i]] for i in worst],
        [class_names[y_pred[i]] for i in worst],
        [float(probabilities[i].max()) for i in worst],
        out_dir / "worst_misclassified.png",
    )
    for _, row in table.iterrows():
        for name in ("precision", "recall", "f1"):
            metrics[f"{name}_{row['class']}"] = float(row[name])
    return Evaluation(
        metrics=metrics,
        n_test=len(y_true),
        confusion=confusion.tolist(),
        class_names=class_names,
        files=files,
        seconds=seconds,
        scores_reused=reused,
        scored_from=route["from"],
    )


@task(name="evaluate")
def evaluate_task(
    cfg: Config,
    weights: ResolvedWeights,
    validated: ValidatedData,
    features: FeatureSet,
    chosen: StageResult,
    run: TrainingRun,
) -> Evaluation:
    """Evaluate the chosen classifier on the test split; its report files go to the run's folder."""
    rows = read_rows(validated.rows_file)
    prefix = None
    if scoring_prefix_layer(chosen.prefix_cache) is not None:
        # The test images' output of the chosen model's frozen part, cached once per data version.
        prefix = compute_scoring_prefix(
            rows,
            cfg.data.dir,
            weights,
            cfg.backbone.image_size,
            cfg.features.batch_size,
            features.directory,
            chosen.prefix_cache,
            chosen.unfreeze_from,
            progress_logger("test images' frozen-part outputs"),
        )
    prefix_seconds = prefix.seconds if prefix is not None else 0.0
    evaluation = evaluate_classifier(
        chosen.checkpoint,
        rows[rows["split"] == "test"],
        cfg.data.dir,
        validated.class_names,
        cfg.evaluate,
        run.report_dir,
        scores_dir(cfg.work_dir, validated.fingerprint),
        prefix,
    )
    if evaluation.scores_reused:
        print(f"evaluate: same checkpoint, same test images: reused its {evaluation.n_test} test-set scores")
    else:
        print(f"evaluate: {evaluation.n_test} test images scored from {evaluation.scored_from}")
    return evaluation.model_copy(update={"test_prefix_seconds": prefix_seconds})
