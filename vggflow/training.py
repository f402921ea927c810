"""Training one stage: compile, fit with early stopping, keep the best weights, report.

Shared by the feature-extraction (head) step and every fine-tuning stage so they train, stop
and report the same way. Keras is imported when a stage is fitted, not on import.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vggflow.config import FinetuneConfig, StageConfig
from vggflow.files import atomic_path, atomic_write_text
from vggflow.hashing import file_sha256

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


class StageResult(BaseModel):
    """What a finished stage leaves behind (a reference, not the model)."""

    stage: str
    unfreeze_from: str | None
    learning_rate: float
    checkpoint: Path
    checkpoint_sha256: str
    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    first_trainable_layer: str
    trainable_layers: int
    trainable_params: int
    epochs_run: int
    seconds: float
    images_per_second: float
    prefix_cache: str | None = None
    mlflow_run_id: str | None = None
    cache_key: str = ""

    def metric(self, name: str) -> float:
        """The stage's best ``val_accuracy`` or ``val_loss``."""
        return self.best_val_accuracy if name == "val_accuracy" else self.best_val_loss

    def freeze_configuration(self) -> dict[str, Any]:
        """The freeze configuration as logged (params and the stage-comparison JSON)."""
        return {
            "stage": self.stage,
            "unfreeze_from": self.unfreeze_from or "none (base frozen)",
            "first_trainable_layer": self.first_trainable_layer,
            "trainable_layers": self.trainable_layers,
            "trainable_params": self.trainable_params,
            "learning_rate": self.learning_rate,
        }

    def summary(self) -> dict[str, Any]:
        """The stage's row wherever stages are shown side by side (run summary, model card, MLflow)."""
        return self.freeze_configuration() | {
            "best_val_accuracy": self.best_val_accuracy,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "seconds": round(self.seconds, 2),
            "images_per_second": round(self.images_per_second, 1),
            "prefix_cache": self.prefix_cache,
        }


class TrainedStages(BaseModel):
    """Every stage that trained, in order (the head first), and the ones the stop rule skipped."""

    results: list[StageResult]
    skipped: list[str] = []

    def table(self, chosen: StageResult) -> list[dict[str, Any]]:
        """Every stage's :meth:`StageResult.summary` row, the chosen one marked."""
        return [result.summary() | {"chosen": result.stage == chosen.stage} for result in self.results]


def is_better(candidate: float, best: float, metric: str, margin: float = 0.0) -> bool:
    """Whether ``candidate`` beats ``best`` by more than ``margin`` (accuracy up, loss down)."""
    if math.isnan(candidate):
        return False
    if metric == "val_loss":
        return candidate < best - margin
    return candidate > best + margin


def adam(learning_rate, weight_decay: float = 0.0):
    """Adam, or AdamW with decoupled weight decay (biases excluded) when ``weight_decay`` > 0."""
    import keras

    if not weight_decay:
        return keras.optimizers.Adam(learning_rate=learning_rate)
    optimizer = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    return optimizer


def warmup_cosine(peak: float, total_steps: int, warmup_steps: int, final_fraction: float):
    """Linear warm-up from 0 to ``peak``, then cosine decay to ``peak × final_fraction`` at the last step."""
    import keras

    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else peak,
        decay_steps=max(total_steps - warmup_steps, 1),
        alpha=final_fraction,
        warmup_target=peak if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def block_lr_multipliers(unfreeze_from: str, top: float, decay: float) -> dict[str, float]:
    """Discriminative rates: the top block at ``top`` × the head's rate, each lower unfrozen block ``decay`` × more.

    Keys are patterns on variable paths (``block5_.*``), as :class:`keras.optimizers.OptimizerMap` takes.
    """
    blocks = ["block5", "block4", "block3", "block2", "block1"]
    lowest = blocks.index("block1" if unfreeze_from == "all" else unfreeze_from)
    return {f"{block}_.*": top * decay**depth for depth, block in enumerate(blocks[: lowest + 1])}


def stage_optimizer(cfg: FinetuneConfig, stage: StageConfig, steps_per_epoch: int):
    """The optimizer of a fine-tuning stage: one per layer group, each on its own schedule.

    The head's layers learn at the stage's ``learning_rate``; each unfrozen block at its
    :func:`block_lr_multipliers` fraction of it (fastai's gradual unfreezing), all warmed up and
    decayed together (``finetune.schedule``).
    """
    import keras

    total = steps_per_epoch * stage.epochs

    def optimizer(multiplier: float):
        peak = stage.learning_rate * multiplier
        if cfg.schedule == "constant":
            return adam(peak, cfg.weight_decay)
        return adam(
            warmup_cosine(peak, total, steps_per_epoch * cfg.warmup_epochs, cfg.final_lr_fraction), cfg.weight_decay
        )

    groups = keras.optimizers.OptimizerMap(default_optimizer=optimizer(1.0))
    for pattern, multiplier in block_lr_multipliers(
        stage.unfreeze_from, cfg.block_lr_multiplier, cfg.lower_block_lr_decay
    ).items():
        groups[pattern] = optimizer(multiplier)
    return keras.optimizers.MultiOptimizer(groups)


def sparse_crossentropy(label_smoothing: float = 0.0):
    """Cross-entropy on class indices, with label smoothing (Keras's sparse loss has none)."""
    import keras

    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy()

    def loss(y_true, y_pred):
        classes = keras.ops.shape(y_pred)[-1]
        one_hot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, [-1]), "int32"), classes)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=label_smoothing)

    return loss


def fit_stage(
    trainable,
    train_data,
    val_data,
    optimizer,
    epochs: int,
    patience: int,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    batch_size: int | None = None,
    label_smoothing: float = 0.0,
    callbacks: Sequence[Any] = (),
) -> tuple[list[dict[str, float]], int, float]:
    """Compile ``trainable`` (a Keras model) and fit it with early stopping on validation loss.

    ``train_data``/``val_data`` are datasets yielding batches, or ``(x, y)`` arrays fitted with
    ``batch_size`` and Keras's own per-epoch shuffle (as a plain ``model.fit`` does). The best
    epoch's weights are restored at the end (also when training ran to the last epoch), so the
    model leaves this function in its best state. ``callbacks`` come after early stopping (e.g. a
    ``ReduceLROnPlateau``).

    Returns:
        (per-epoch history, best epoch index, seconds spent fitting)
    """
    import logging

    import keras
    import tensorflow as tf

    from vggflow.datasets import without_autotune

    # Each stage compiles a new model; TensorFlow's retracing warnings about it are noise here.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    # Same data + config + seed must give the same weights and the same chosen stage.
    tf.config.experimental.enable_op_determinism()
    trainable.compile(
        optimizer=optimizer,
        loss=sparse_crossentropy(label_smoothing),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    callbacks = [stopper, keras.callbacks.TerminateOnNaN(), *callbacks]
    if on_epoch:
        # One report per epoch (MLflow metrics, a progress line), never per batch.
        callbacks.append(
            keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: on_epoch(epoch, _floats(logs)))
        )
    started = time.perf_counter()
    if isinstance(train_data, tuple):
        if isinstance(val_data, tuple):
            # The same batches and numbers as Keras's own array handling, faster: each epoch's
            # evaluation starts a new iterator, and over arrays Keras's pipeline (index
            # permutation and slicing maps) is slow to start (BENCHMARKS.md, benchmark 1).
            val_data = without_autotune(tf.data.Dataset.from_tensor_slices(val_data).batch(batch_size or 32))
        # The training arrays keep Keras's own pipeline on purpose: its shuffles are those of a
        # plain `model.fit`, so benchmark 1 compares identical heads with the article's Example 1.
        fitted = trainable.fit(
            *train_data,
            batch_size=batch_size,
            shuffle=True,
            validation_data=val_data,
            epochs=epochs,
            callbacks=callbacks,
            verbose=0,
        )
    else:
        # Datasets shuffle themselves, reproducibly (vggflow.datasets).
        fitted = trainable.fit(
            train_data, validation_data=val_data, epochs=epochs, callbacks=callbacks, shuffle=False, verbose=0
        )
    seconds = time.perf_counter() - started
    history = [
        {key: float(fitted.history[key][epoch]) for key in HISTORY_KEYS if key in fitted.history} | {"epoch": epoch}
        for epoch in range(len(fitted.history.get("loss", [])))
    ]
    best_epoch = stopper.best_epoch if history else 0
    return history, int(best_epoch), seconds


def epoch_reporter(stage: str, epochs: int, run_id: str | None):
    """Per epoch: the metrics into the stage's MLflow run and the progress (``vggflow/progress.py``).

    Returns the ``on_epoch(epoch, logs)`` callback; call its ``close()`` when the stage ends.
    """
    from prefect.logging import get_run_logger

    from vggflow.progress import EpochProgress
    from vggflow.tracking import log_epoch

    progress = EpochProgress(stage, epochs, get_run_logger().info)

    def report(epoch: int, logs: dict[str, float]) -> None:
        if run_id:
            log_epoch(run_id, epoch, logs)
        progress(epoch, logs)

    report.close = progress.close
    return report


def report_stage(
    stage: str,
    epochs: int,
    stage_run_id: str | None,
    cache_key: str,
    intro: str,
    train: Callable[[Callable[[int, dict[str, float]], None]], StageResult],
) -> StageResult:
    """Train a stage with per-epoch reporting: a line before, one per few seconds, one after.

    Args:
        stage: the stage's label.
        epochs: its epoch budget.
        stage_run_id: its nested MLflow run (per-epoch metrics go there).
        cache_key: the key its checkpoint is saved and reused under (recorded in the result).
        intro: the line printed before training.
        train: trains the stage given an ``on_epoch(epoch, logs)`` callback.
    """
    print(intro)
    reporter = epoch_reporter(stage, epochs, stage_run_id)
    try:
        result = train(reporter)
    finally:
        reporter.close()
    print(stage_summary_line(result, epochs))
    return result.model_copy(update={"mlflow_run_id": stage_run_id, "cache_key": cache_key})


def checkpoint_path(work_dir: Path, key: str) -> Path:
    """Where a stage's classifier with cache key ``key`` is saved."""
    return Path(work_dir) / "checkpoints" / f"{key}.keras"


def stage_summary_line(result: StageResult, epochs: int) -> str:
    """One line closing a stage: epochs run, best epoch and its validation metrics, speed."""
    stopped = " (early stop)" if result.epochs_run < epochs else ""
    return (
        f"stage {result.stage} done: {result.epochs_run}/{epochs} epochs{stopped}, best epoch {result.best_epoch + 1}: "
        f"val_acc {result.best_val_accuracy:.3f} val_loss {result.best_val_loss:.4f}, "
        f"{result.seconds:.1f} s, {result.images_per_second:.0f} images/s"
    )


def finish_stage(
    model,
    checkpoint: Path,
    stage: str,
    unfreeze_from: str | None,
    learning_rate: float,
    freeze,
    fit: tuple[list[dict[str, float]], int, float],
    n_train: int,
    prefix_cache: str | None,
) -> StageResult:
    """Save a trained stage's classifier (checksummed) and describe it.

    Args:
        model: the whole classifier, in its best state.
        checkpoint: where to save it.
        stage, unfreeze_from, learning_rate: the stage's configuration.
        freeze: the :class:`vggflow.model.FreezeInfo` it trained with.
        fit: what :func:`fit_stage` returned.
        n_train: training images per epoch (for images/s).
        prefix_cache: the cached layer it trained from, if any.
    """
    history, best_epoch, seconds = fit
    digest = save_checkpoint(model, checkpoint)
    best = history[best_epoch] if history else {}
    return StageResult(
        stage=stage,
        unfreeze_from=unfreeze_from,
        learning_rate=learning_rate,
        checkpoint=checkpoint,
        checkpoint_sha256=digest,
        history=history,
        best_epoch=best_epoch,
        best_val_accuracy=best.get("val_accuracy", float("nan")),
        best_val_loss=best.get("val_loss", float("nan")),
        first_trainable_layer=freeze.first_trainable_layer,
        trainable_layers=freeze.trainable_layers,
        trainable_params=freeze.trainable_params,
        epochs_run=len(history),
        seconds=seconds,
        images_per_second=n_train * len(history) / seconds if seconds else 0.0,
        prefix_cache=prefix_cache,
    )


def _floats(logs: dict | None) -> dict[str, float]:
    return {key: float(value) for key, value in (logs or {}).items()}


def save_checkpoint(model, path: Path) -> str:
    """Save the whole classifier atomically, with a ``.sha256`` sidecar checked before reuse."""
    with atomic_path(path) as tmp:
        model.save(tmp)
        digest = file_sha256(tmp)
    atomic_write_text(_sidecar(path), digest)
    return digest


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def checkpoint_is_valid(path: Path) -> bool:
    """True when the checkpoint exists and matches the checksum recorded when it was saved."""
    try:
        expected = _sidecar(path).read_text().strip()
    except OSError:
        return False
    return path.is_file() and file_sha256(path) == expected
