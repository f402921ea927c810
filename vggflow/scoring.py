"""Scoring a model on the test split: the metrics, and keeping a model's test-set scores.

Used by the evaluation step (the candidate) and the promotion gate (the champion, re-scored on
the candidate's test split), so both are measured the same way. Scores are kept in a folder per
data version, under a name that identifies the model and the rows: an identical later call
reuses them instead of running the model again.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from vggflow.caching import code_version
from vggflow.files import atomic_write_bytes
from vggflow.hashing import stable_hash


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
    test_prefix_seconds: float = 0.0


def scores_dir(work_dir: Path, fingerprint: str) -> Path:
    """The kept test-set scores of one data version (named by the validated dataset's fingerprint)."""
    return Path(work_dir) / "scores" / fingerprint


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
    scores_dir: Path | None,
    model_identity: str,
    test_rows: pd.DataFrame,
    class_names: list[str],
    batch_size: int,
    code: str,
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
        code: the version of the code that scores (``vggflow.caching.code_version`` of the caller's module).
    """
    if scores_dir is None:
        return None
    key = stable_hash(model_identity, list(test_rows["path"]), list(test_rows["label"]), class_names, batch_size, code)
    return Path(scores_dir) / f"{key}.npy"


#: The predicted label of a class the data does not have (a champion trained on other classes).
NOT_A_CLASS = "(not a class of this data)"

#: The name of the dataset (true and predicted test labels) the gate's evaluations log as their input.
EVALUATION_DATASET = "test-split-predictions"

#: The gate's metrics as MLflow's classifier evaluator names them (its averages set to macro).
MLFLOW_METRICS = {"accuracy": "accuracy_score", "macro_f1": "f1_score"}


def evaluate_registered(
    model_uri: str,
    test_rows: pd.DataFrame,
    data_dir: Path,
    class_names: list[str],
    batch_size: int,
    scores_cache: Path | None = None,
) -> list[str]:
    """A registered model's predicted labels for the test rows, through its public pyfunc interface.

    Labels are matched by name, so a champion trained on another class list is scored fairly
    (a class it does not know, :data:`NOT_A_CLASS`, is simply a wrong answer). With
    ``scores_cache`` (see :func:`registered_scores_file`), the predictions are kept there and reused.
    """
    index = {name: i for i, name in enumerate(class_names)}
    paths = [Path(data_dir) / p for p in test_rows["path"]]

    def predict_test_set():
        from vggflow.datasets import predict_in_batches
        from vggflow.tracking import load_pyfunc

        model = load_pyfunc(model_uri)

        def predict(batch):
            labels = model.predict(batch)["label"]
            return labels.map(index).fillna(-1).astype(int).to_numpy()[:, None]

        return predict_in_batches(predict, paths, batch_size)

    predicted, reused = reuse_or_compute(scores_cache, len(paths), predict_test_set)
    if reused:
        print(f"{model_uri}: same version, same test images: reused its {len(paths)} test-set predictions")
    return [class_names[i] if i >= 0 else NOT_A_CLASS for i in (predicted[:, 0] if len(predicted) else [])]


def mlflow_evaluation(
    run_id: str, labels: list[str], predicted: list[str], class_names: list[str], leave_running: bool = False
) -> dict[str, float]:
    """The gate's metrics of predicted labels, by MLflow's own evaluation API, logged to run ``run_id``.

    ``mlflow.models.evaluate`` on a static dataset (true and predicted labels): the models
    themselves take image tensors, which an evaluation dataset (rows of features) cannot hold, so
    vggflow runs them (and keeps their scores) and MLflow's classifier evaluator computes the
    metrics, per-class metrics and confusion matrix, macro-averaged like vggflow's own.

    The evaluation resumes the run and closes it ``FINISHED``; with ``leave_running`` a run
    that was ``RUNNING`` stays so (the training run: the flow closes it when it ends, and a
    killed process's run must still look abandoned, not finished). The labels and predictions
    are the run's input dataset :data:`EVALUATION_DATASET` (beside the training data's), and
    the figure MLflow's evaluator leaves open in pyplot is closed.

    Returns:
        ``accuracy`` and ``macro_f1`` (see :data:`MLFLOW_METRICS`).
    """
    import logging

    import matplotlib.pyplot as plt
    import mlflow
    from mlflow.tracking import MlflowClient

    data = mlflow.data.from_pandas(
        pd.DataFrame({"label": labels, "predicted": predicted}),
        targets="label",
        predictions="predicted",
        name=EVALUATION_DATASET,
    )
    config = {"average": "macro", "label_list": list(class_names), "log_model_explainability": False}
    evaluator_logger = logging.getLogger("mlflow.models.evaluation")
    level = evaluator_logger.level
    evaluator_logger.setLevel(logging.WARNING)  # its INFO lines narrate each evaluation
    client = MlflowClient()
    was_running = client.get_run(run_id).info.status == "RUNNING"
    figures = set(plt.get_fignums())
    try:
        with mlflow.start_run(run_id=run_id):
            result = mlflow.models.evaluate(data=data, model_type="classifier", evaluator_config=config)
    finally:
        evaluator_logger.setLevel(level)
        for number in set(plt.get_fignums()) - figures:  # its pyplot.clf() opens one that is never closed
            plt.close(number)
    if leave_running and was_running:
        client.update_run(run_id, status="RUNNING")  # start_run's exit closed it
    return {name: float(result.metrics[key]) for name, key in MLFLOW_METRICS.items()}


def registered_scores_file(
    scores_dir: Path | None, identity: str, test_rows: pd.DataFrame, class_names: list[str], batch_size: int
) -> Path | None:
    """Where :func:`evaluate_registered` keeps a registered version's predictions (see :func:`scores_file`)."""
    return scores_file(scores_dir, identity, test_rows, class_names, batch_size, code_version(__name__))


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
