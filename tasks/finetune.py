"""Step 4, fine-tuning: staged unfreezing (the article's Examples 2 and 3, made systematic).

Each stage unfreezes the base from a block upwards (``block5``, then ``block4``, … or ``all``),
starts from the best weights so far, recompiles with its own (smaller) learning rate, trains with
early stopping on validation loss and keeps its best weights. The sequence stops when a stage does
not improve on the best so far (``finetune.stop_when_no_improvement``).

Where a stage's lower blocks stay frozen and are still the original backbone, the stage trains
on their cached output (computed once with the features, see ``vggflow/stages.py``) instead of
recomputing them every epoch: same gradients for the trainable layers, a fraction of the compute.
"""

from __future__ import annotations

from pathlib import Path

from vggflow.caching import cached_task, code_version
from vggflow.config import Config, StageConfig
from vggflow.feature_cache import FeatureSet, load_layer
from vggflow.files import read_rows
from vggflow.hashing import stable_hash
from vggflow.precision import resolve_precision
from vggflow.runs import TrainingRun, in_stage_run
from vggflow.training import (
    StageResult,
    TrainedStages,
    checkpoint_is_valid,
    checkpoint_path,
    is_better,
    report_stage,
)

#: Settings that change how a stage trains (the others choose stages or stop the sequence).
STAGE_TRAINING_EXCLUDES = {"stages", "selection_metric", "min_improvement", "stop_when_no_improvement"}


def run_stage(
    previous: StageResult,
    stage: StageConfig,
    cfg: Config,
    features: FeatureSet,
    prefix: str | None,
    checkpoint: Path,
    on_epoch=None,
) -> StageResult:
    """Train one stage from ``previous``'s best weights; save the stage's best classifier.

    Args:
        previous: the stage to start from (its checkpoint is loaded).
        stage: which blocks to unfreeze and the head's learning rate.
        cfg: the config (fine-tuning, augmentation, precision, data folder, image size, seed).
        features: cached arrays (prefix outputs) and the row order.
        prefix: cached prefix layer to train from, or None to stream images through the full model.
        checkpoint: where this stage's best classifier is saved (float32, whatever trained it).
        on_epoch: optional ``callable(epoch, logs)``.
    """
    import math

    import keras

    from vggflow.datasets import array_dataset, common_image_shape, file_errors_as_data_errors, image_dataset
    from vggflow.model import augmentation, suffix_model, unfreeze_to
    from vggflow.precision import copy_weights, twin
    from vggflow.training import finish_stage, fit_stage, stage_optimizer

    finetune, size, seed = cfg.finetune, cfg.backbone.image_size, cfg.seed
    keras.utils.set_random_seed(seed)
    model = keras.saving.load_model(previous.checkpoint, compile=False)
    freeze = unfreeze_to(model, stage.unfreeze_from, stage.label)
    trained = twin(model, resolve_precision(cfg.backbone.precision))
    unfreeze_to(trained, stage.unfreeze_from, stage.label)
    if prefix is not None:
        trainable = suffix_model(trained, stage.unfreeze_from)
        x_train, y_train = load_layer(features, prefix, "train")
        x_val, y_val = load_layer(features, prefix, "val")
        train = array_dataset(x_train, y_train, finetune.batch_size, shuffle=True, seed=seed)
        val = array_dataset(x_val, y_val, finetune.batch_size, shuffle=False, seed=seed)
        n_train = len(y_train)
    else:
        # Images through the whole model, augmented in training only; a wrapper is what gets
        # compiled, so the saved classifier carries no optimizer state.
        images = keras.Input(shape=(size, size, 3), name="image")
        augment = augmentation(size, cfg.augment.translate, cfg.augment.flip, seed)
        trainable = keras.Model(images, trained(augment(images) if augment else images), name="stage")
        rows = read_rows(features.rows_file)
        index = {name: i for i, name in enumerate(features.class_names)}
        split = {name: rows[rows["split"] == name] for name in ("train", "val")}
        same_shape = common_image_shape(rows)
        train, val = (
            image_dataset(
                [Path(cfg.data.dir) / p for p in split[name]["path"]],
                split[name]["label"].map(index).to_numpy(),
                size,
                finetune.batch_size,
                shuffle=name == "train",
                seed=seed,
                same_shape=same_shape,
            )
            for name in ("train", "val")
        )
        n_train = len(split["train"])
    optimizer = stage_optimizer(finetune, stage, math.ceil(n_train / finetune.batch_size))
    with file_errors_as_data_errors():  # an image that changed since validation: named, one line
        fit = fit_stage(
            trainable,
            train,
            val,
            optimizer,
            stage.epochs,
            finetune.patience,
            on_epoch,
            label_smoothing=finetune.label_smoothing,
        )
    copy_weights(trained, model)
    return finish_stage(
        model, checkpoint, stage.label, stage.unfreeze_from, stage.learning_rate, freeze, fit, n_train, prefix
    )


def stage_key(cfg: Config, previous: StageResult, stage: StageConfig, features: FeatureSet) -> str:
    """A stage's cache key: chained from the stage it starts from, plus its own settings, input and code."""
    shared = cfg.finetune.model_dump(exclude=STAGE_TRAINING_EXCLUDES)
    precision = resolve_precision(cfg.backbone.precision)
    prefix = features.prefix_plan.get(stage.label)
    return stable_hash(previous.cache_key, stage, shared, prefix, cfg.augment, precision, code_version(__name__))


def _stage_key(parameters: dict) -> str:
    return stage_key(parameters["cfg"], parameters["previous"], parameters["stage"], parameters["features"])


@cached_task(
    "finetune-stage",
    _stage_key,
    lambda p: checkpoint_is_valid(checkpoint_path(p["cfg"].work_dir, _stage_key(p))),
    task_run_name="finetune-{stage.unfreeze_from}",
)
def finetune_stage_task(
    cfg: Config, previous: StageResult, stage: StageConfig, features: FeatureSet, stage_run_id: str | None = None
) -> StageResult:
    """Train one stage from ``previous``, each epoch logged to the stage's MLflow run."""
    key = stage_key(cfg, previous, stage, features)
    prefix = features.prefix_plan.get(stage.label)
    return report_stage(
        stage.label,
        stage.epochs,
        stage_run_id,
        key,
        f"stage {stage.label}: training from {previous.stage}, lr {stage.learning_rate:g}, "
        f"{'on cached ' + prefix if prefix else 'on images'}",
        lambda on_epoch: run_stage(
            previous, stage, cfg, features, prefix, checkpoint_path(cfg.work_dir, key), on_epoch
        ),
    )


def finetune(cfg: Config, features: FeatureSet, head: StageResult, run: TrainingRun) -> TrainedStages:
    """Train the configured stages in order, each from the best so far, until one does not improve.

    Every stage runs in its own nested MLflow run. Returns the head and every stage that trained,
    and the stages the stop rule skipped.
    """
    metric = cfg.finetune.selection_metric
    results, best = [head], head
    for position, stage in enumerate(cfg.finetune.stages):
        result = in_stage_run(
            run,
            stage.label,
            stage.unfreeze_from,
            stage.learning_rate,
            lambda stage_run_id, start=best, stage=stage: finetune_stage_task(
                cfg, start, stage, features, stage_run_id
            ),
        )
        results.append(result)
        if is_better(result.metric(metric), best.metric(metric), metric, cfg.finetune.min_improvement):
            best = result
        elif cfg.finetune.stop_when_no_improvement:
            skipped = [s.label for s in cfg.finetune.stages[position + 1 :]]
            print(
                f"stage {stage.label} did not improve {metric} on {best.stage}: "
                f"stopping (skipped: {', '.join(skipped) or 'none'})"
            )
            return TrainedStages(results=results, skipped=skipped)
    return TrainedStages(results=results)
