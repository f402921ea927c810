"""Step 5: evaluate the chosen classifier on the test split.

The classifier is fed raw decoded images exactly as a client of the registered model would
(its own resize and preprocessing inside), so the reported numbers are the exported model's.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel

from vggflow.config import EvaluateConfig
from vggflow.files import atomic_write_text, read_rows


class Evaluation(BaseModel):
    """Test metrics and the report files written for them."""

    metrics: dict[str, float]
    n_test: int
    confusion: list[list[int]]
    class_names: list[str]
    files: dict[str, Path]
    seconds: float = 0.0


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


def evaluate_classifier(
    checkpoint: Path, test_rows: pd.DataFrame, data_dir: Path, class_names: list[str], cfg: EvaluateConfig, out_dir: Path
) -> Evaluation:
    """Score a saved classifier on the test rows and write the report files into ``out_dir``.

    Files: confusion matrix PNG, per-class CSV + chart, predictions CSV, a grid of the worst
    misclassified test images.
    """
    import keras

    from tasks import report
    from vggflow.datasets import predict_in_batches
    from vggflow.images import load_rgb

    model = keras.saving.load_model(checkpoint, compile=False)
    paths = [Path(data_dir) / p for p in test_rows["path"]]
    started = time.perf_counter()
    probabilities = predict_in_batches(lambda batch: model.predict_on_batch(batch.astype(np.float32)), paths, cfg.batch_size)
    seconds = time.perf_counter() - started
    index = {name: i for i, name in enumerate(class_names)}
    y_true = test_rows["label"].map(index).to_numpy()
    y_pred = probabilities.argmax(axis=1)
    metrics, confusion = score(y_true, y_pred, len(class_names))
    out_dir.mkdir(parents=True, exist_ok=True)
    table = report.per_class_metrics(y_true, y_pred, class_names)
    files = {"confusion_matrix": report.plot_confusion_matrix(confusion, class_names, out_dir / "confusion_matrix.png")}
    files["per_class_csv"], files["per_class_png"] = report.write_per_class_outputs(
        table, out_dir / "per_class_metrics.csv", out_dir / "per_class_metrics.png"
    )
    predictions = test_rows[["path", "label"]].assign(
        predicted=[class_names[i] for i in y_pred], confidence=probabilities.max(axis=1) if len(y_pred) else []
    )
    files["predictions"] = out_dir / "test_predictions.csv"
    atomic_write_text(files["predictions"], predictions.to_csv(index=False))
    worst = report.worst_misclassified(y_true, probabilities, cfg.worst_examples)
    files["misclassified"] = report.plot_misclassified_grid(
        [report.shrink_for_figure(load_rgb(paths[i])) for i in worst],  # not 16 full-size photos at once
        [class_names[y_true[i]] for i in worst],
        [class_names[y_pred[i]] for i in worst],
        [float(probabilities[i].max()) for i in worst],
        out_dir / "worst_misclassified.png",
    )
    for _, row in table.iterrows():
        for name in ("precision", "recall", "f1"):
            metrics[f"{name}_{row['class']}"] = float(row[name])
    return Evaluation(
        metrics=metrics, n_test=len(y_true), confusion=confusion.tolist(), class_names=class_names, files=files,
        seconds=seconds,
    )


@task(name="evaluate")
def evaluate_task(
    checkpoint: Path, rows_file: Path, data_dir: Path, class_names: list[str], cfg: EvaluateConfig, out_dir: Path
) -> Evaluation:
    """Prefect shell: evaluate the chosen classifier on the test split of the validated rows."""
    rows = read_rows(rows_file)
    return evaluate_classifier(checkpoint, rows[rows["split"] == "test"], data_dir, class_names, cfg, out_dir)
