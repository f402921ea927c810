"""Step 3: staged-unfreezing fine-tuning (the seed's Examples 2 and 3, made systematic).

Each stage unfreezes the base from a block upwards (``block5``, then ``block4``, … or ``all``),
starts from the previous stage's best weights, recompiles with its own (smaller) learning rate,
trains with early stopping on validation loss and keeps its best weights. The flow stops the
sequence when a stage does not improve on the best so far.

Where a stage's lower blocks stay frozen and are still the original backbone, the stage trains
on their cached output (computed once with the features) instead of recomputing them every
epoch: same gradients for the trainable layers, a fraction of the compute.
"""

from __future__ import annotations

from pathlib import Path

from vggflow.caching import cached_task
from vggflow.config import VGG19_BLOCKS, FinetuneConfig, StageConfig
from vggflow.files import read_rows
from vggflow.tasks.features import FeatureSet
from vggflow.training import StageResult, checkpoint_is_valid

#: Output channels of each VGG19 block (its pooling layer's depth).
BLOCK_CHANNELS = {"block1": 64, "block2": 128, "block3": 256, "block4": 512, "block5": 512}


def block_index(unfreeze_from: str) -> int:
    """1-based block number; ``all`` counts as block 1."""
    return 1 if unfreeze_from == "all" else VGG19_BLOCKS.index(unfreeze_from) + 1


def prefix_layer(unfreeze_from: str) -> str:
    """The last frozen layer below a stage (its output is the stage's input)."""
    index = block_index(unfreeze_from)
    return "input_layer" if index == 1 else f"block{index - 1}_pool"


def prefix_bytes(unfreeze_from: str, image_size: int, n_images: int) -> int:
    """Size on disk of a stage's cached prefix output (float32)."""
    index = block_index(unfreeze_from)
    if index == 1:
        side, channels = image_size, 3
    else:
        side, channels = image_size // 2 ** (index - 1), BLOCK_CHANNELS[f"block{index - 1}"]
    return 4 * n_images * side * side * channels


def plan_prefix_caches(cfg: FinetuneConfig, image_size: int, n_images: int) -> dict[str, str | None]:
    """For each stage: the prefix layer it trains from (cached), or None to run the full model.

    A prefix cache is valid only while every layer in it is still the original backbone, i.e. no
    earlier stage unfroze anything at or below it. Caches above ``prefix_cache_max_gb`` are not
    used (they are read from disk batch by batch, but disk is finite).
    """
    plan: dict[str, str | None] = {}
    lowest_touched = len(VGG19_BLOCKS) + 1  # no block trained yet
    budget = cfg.prefix_cache_max_gb * 1e9
    for stage in cfg.stages:
        index = block_index(stage.unfreeze_from)
        usable = (
            cfg.cache_frozen_prefix
            and index <= lowest_touched
            and prefix_bytes(stage.unfreeze_from, image_size, n_images) <= budget
        )
        plan[stage.label] = prefix_layer(stage.unfreeze_from) if usable else None
        lowest_touched = min(lowest_touched, index)
    return plan


def run_stage(
    previous: StageResult,
    stage: StageConfig,
    cfg: FinetuneConfig,
    features: FeatureSet,
    prefix: str | None,
    data_dir: Path,
    image_size: int,
    seed: int,
    checkpoint: Path,
    on_epoch=None,
) -> StageResult:
    """Train one stage from ``previous``'s best weights; save the stage's best classifier.

    Args:
        previous: the stage to start from (its checkpoint is loaded).
        stage: which blocks to unfreeze and the learning rate.
        cfg: shared fine-tuning settings (batch size, patience).
        features: cached arrays (prefix outputs) and the row order.
        prefix: cached prefix layer to train from, or None to stream images through the full model.
        data_dir: dataset root (for streaming images).
        image_size: square input side.
        seed: reproducible shuffling and dropout.
        checkpoint: where this stage's best classifier is saved.
        on_epoch: optional ``callable(epoch, logs)``.
    """
    import keras

    from vggflow.datasets import array_dataset, common_image_shape, file_errors_as_data_errors, image_dataset
    from vggflow.model import suffix_model, unfreeze_to
    from vggflow.tasks.features import load_layer
    from vggflow.training import finish_stage, fit_stage

    keras.utils.set_random_seed(seed)
    model = keras.saving.load_model(previous.checkpoint)
    freeze = unfreeze_to(model, stage.unfreeze_from, stage.label)
    if prefix is not None:
        trainable = suffix_model(model, stage.unfreeze_from)
        x_train, y_train = load_layer(features, prefix, "train")
        x_val, y_val = load_layer(features, prefix, "val")
        train = array_dataset(x_train, y_train, cfg.batch_size, shuffle=True, seed=seed)
        val = array_dataset(x_val, y_val, cfg.batch_size, shuffle=False, seed=seed)
        n_train = len(y_train)
    else:
        trainable = model
        rows = read_rows(features.rows_file)
        index = {name: i for i, name in enumerate(features.class_names)}
        split = {name: rows[rows["split"] == name] for name in ("train", "val")}
        same_shape = common_image_shape(rows)
        train, val = (
            image_dataset(
                [Path(data_dir) / p for p in split[name]["path"]],
                split[name]["label"].map(index).to_numpy(),
                image_size,
                cfg.batch_size,
                shuffle=name == "train",
                seed=seed,
                same_shape=same_shape,
            )
            for name in ("train", "val")
        )
        n_train = len(split["train"])
    with file_errors_as_data_errors():  # an image that changed since validation: named, one line
        fit = fit_stage(trainable, train, val, stage.learning_rate, stage.epochs, cfg.patience, on_epoch)
    return finish_stage(
        model, checkpoint, stage.label, stage.unfreeze_from, stage.learning_rate, freeze, fit, n_train, prefix
    )


@cached_task(
    "finetune-stage",
    lambda p: checkpoint_is_valid(Path(p["checkpoint"])),
    task_run_name="finetune-{stage.unfreeze_from}",
)
def finetune_stage_task(
    previous: StageResult,
    stage: StageConfig,
    cfg: FinetuneConfig,
    features: FeatureSet,
    prefix: str | None,
    data_dir: Path,
    image_size: int,
    seed: int,
    checkpoint: Path,
    cache_key: str,
    stage_run_id: str | None = None,
) -> StageResult:
    """Prefect shell: train one stage, logging each epoch to the stage's MLflow run."""
    from vggflow.training import epoch_reporter, stage_summary_line

    print(
        f"stage {stage.label}: training from {previous.stage}, lr {stage.learning_rate:g}, "
        f"{'on cached ' + prefix if prefix else 'on images'}"
    )
    on_epoch = epoch_reporter(stage.label, stage.epochs, stage_run_id)
    result = run_stage(previous, stage, cfg, features, prefix, data_dir, image_size, seed, checkpoint, on_epoch)
    print(stage_summary_line(result, stage.epochs))
    return result.model_copy(update={"mlflow_run_id": stage_run_id})
