"""Step 5: evaluate the chosen classifier on the test split.

The classifier is fed raw decoded images exactly as a client of the registered model would
(its own resize and preprocessing inside), so the reported numbers are the exported model's.
When the chosen model's lower layers are the frozen backbone (a head-only model, or a stage
trained on a cached prefix), their output for the test images is cached once per data version
(``tasks/features.py``, :func:`~tasks.features.compute_scoring_prefix`) and only the layers
above it run: iterating on the head no longer pushes every test image through VGG19 again.
A spread sample of test images is still scored through the whole saved model and must agree;
if it does not, every test image is scored that way instead.
Its test-set probabilities are kept, keyed by the checkpoint's content and the test images: a
re-run that chose the same checkpoint on the same data reuses them instead of scoring again.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel

from vggflow.config import EvaluateConfig
from vggflow.files import atomic_write_bytes, atomic_write_text, read_rows
from vggflow.hashing import file_sha256, stable_hash
from vggflow.tasks.features import ScoringPrefix


class Evaluation(BaseModel):
    """Test metrics and the report files written for them."""

    metrics: dict[str, float]
    n_test: int
    confusion: list[list[int]]
    class_names: list[str]
    files: dict[str, Path]
    seconds: float = 0.0
    scores_reused: bool = False
    scored_from: str = "images"


#: Test images scored through the whole saved model when the rest come from a cached prefix.
CHECKED_IMAGES = 8

#: Largest difference in any class probability allowed between the two routes: they are the
#: same layers on the same pixels, differing only by float round-off (batch composition).
PREFIX_TOLERANCE = 1e-4


def reuse_or_compute(
    cache_file: Path | None, n_rows: int, compute: Callable[[], np.ndarray]
) -> tuple[np.ndarray, bool]:
    """``compute()``, or the array an identical earlier call saved in ``cache_file``.

    The file's name must identify everything the array depends on (see :func:`scores_file`). An
    unreadable file or one with another number of rows is recomputed and replaced.

    Returns:
        The array, and whether it was reused.
    """
    if cache_file is not None:
        try:
            cached = np.load(cache_file, allow_pickle=False)
            if len(cached) == n_rows:
                return cached, True
        except (OSError, ValueError, EOFError):
            pass
    values = np.asarray(compute())
    if cache_file is not None:
        buffer = io.BytesIO()
        np.save(buffer, values, allow_pickle=False)
        atomic_write_bytes(cache_file, buffer.getvalue())
    return values, False


def scores_file(
    scores_dir: Path | None, model_identity: str, test_rows: pd.DataFrame, class_names: list[str], batch_size: int
) -> Path | None:
    """Where the test-set scores of one model on one data version are kept (None: not kept).

    Args:
        scores_dir: the kept scores of one data version: a folder named by the validated
            dataset's content fingerprint, which covers the test images' content (``None``
            turns keeping off).
        model_identity: what identifies the model's weights (a checkpoint's sha256, a registered version).
        test_rows: the rows scored (paths and labels, in order).
        class_names: the class list the scores are indexed by.
        batch_size: batch size of the scoring (batches change float round-off).
    """
    if scores_dir is None:
        return None
    key = stable_hash(model_identity, list(test_rows["path"]), list(test_rows["label"]), class_names, batch_size)
    return Path(scores_dir) / f"{key}.npy"


def score(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> tuple[dict[str, float], np.ndarray]:
    """Accuracy, macro/weighted F1, macro precision/recall and the confusion matrix.

    Args:
        y_true: true class indices.
        y_pred: predicted class indices (-1 for a label outside the class list: always wrong).
        n_classes: number of classes (absent classes still get a confusion-matrix row).
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
    )

    labels = list(range(n_classes))
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "macro_precision": float(precision_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "macro_recall": float(recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }
    return metrics, confusion_matrix(y_true, y_pred, labels=labels)


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
    from vggflow.tasks.features import RowView, verified_arrays

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
    cache = scores_file(scores_dir, identity, test_rows, class_names, cfg.batch_size)
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
    checkpoint: Path,
    rows_file: Path,
    data_dir: Path,
    class_names: list[str],
    cfg: EvaluateConfig,
    out_dir: Path,
    scores_dir: Path | None = None,
    prefix: ScoringPrefix | None = None,
) -> Evaluation:
    """Prefect shell: evaluate the chosen classifier on the test split of the validated rows."""
    rows = read_rows(rows_file)
    evaluation = evaluate_classifier(
        checkpoint, rows[rows["split"] == "test"], data_dir, class_names, cfg, out_dir, scores_dir, prefix
    )
    if evaluation.scores_reused:
        print(f"evaluate: same checkpoint, same test images: reused its {evaluation.n_test} test-set scores")
    else:
        print(f"evaluate: {evaluation.n_test} test images scored from {evaluation.scored_from}")
    return evaluation
