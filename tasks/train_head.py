"""Step 2b: feature-extraction training (the seed's Example 1) on cached base features.

The classifier is the seed's: frozen VGG19 base → GlobalAveragePooling2D → Dense(128, relu) →
Dense(n, softmax). Because the base is frozen and pooling has no weights, training the head on
the cached pooled features is the same optimisation as the seed's ``fit`` through the frozen
base, without running the base every epoch.
"""

from __future__ import annotations

from pathlib import Path

from vggflow.caching import cached_task
from vggflow.config import HeadConfig
from vggflow.tasks.features import FeatureSet
from vggflow.training import StageResult, checkpoint_is_valid

HEAD_STAGE = "head"


def train_head(
    features: FeatureSet,
    weights,
    image_size: int,
    cfg: HeadConfig,
    seed: int,
    checkpoint: Path,
    on_epoch=None,
) -> StageResult:
    """Build the classifier, train its head on cached pooled features, save it.

    Args:
        features: cached ``avg_pool`` features with their rows and class names.
        weights: the resolved backbone weights (the base inside the saved classifier).
        image_size: square input side of the classifier.
        cfg: head architecture and training settings.
        seed: makes initialisation and shuffling reproducible.
        checkpoint: where the whole classifier (``.keras``) is saved.
        on_epoch: optional ``callable(epoch, logs)``.
    """
    import keras
    import numpy as np

    from vggflow.model import build_classifier, head_model, take_base, unfreeze_to
    from vggflow.tasks.features import load_layer
    from vggflow.training import finish_stage, fit_stage

    base = take_base(weights, image_size)
    # Seeded after the base exists: building VGG19 draws from Keras's global RNG, so the head's
    # initial weights would otherwise depend on whether the base was built here or set aside
    # by the extraction (i.e. on whether the extraction was cached).
    keras.utils.set_random_seed(seed)
    model = build_classifier(base, len(features.class_names), cfg, image_size)
    freeze = unfreeze_to(model, None, HEAD_STAGE)
    # Pooled features are small (512 floats per image): fit on in-memory arrays with Keras's own
    # shuffle, exactly as the seed's `model.fit` over images through the frozen base would.
    x_train, y_train = (np.asarray(a[: len(a)]) for a in load_layer(features, "avg_pool", "train"))
    x_val, y_val = (np.asarray(a[: len(a)]) for a in load_layer(features, "avg_pool", "val"))
    fit = fit_stage(
        head_model(model),
        (x_train, y_train),
        (x_val, y_val),
        cfg.learning_rate,
        cfg.epochs,
        cfg.patience,
        on_epoch,
        batch_size=cfg.batch_size,
    )
    return finish_stage(model, checkpoint, HEAD_STAGE, None, cfg.learning_rate, freeze, fit, len(y_train), "avg_pool")


@cached_task("train-head", lambda p: checkpoint_is_valid(Path(p["checkpoint"])))
def train_head_task(
    features: FeatureSet,
    weights,
    image_size: int,
    cfg: HeadConfig,
    seed: int,
    checkpoint: Path,
    cache_key: str,
    stage_run_id: str | None = None,
) -> StageResult:
    """Prefect shell: train the head, logging each epoch to the stage's MLflow run."""
    from vggflow.training import epoch_reporter, stage_summary_line

    print(f"stage {HEAD_STAGE}: training the new head on cached features, lr {cfg.learning_rate:g}")
    result = train_head(
        features, weights, image_size, cfg, seed, checkpoint, epoch_reporter(HEAD_STAGE, cfg.epochs, stage_run_id)
    )
    print(stage_summary_line(result, cfg.epochs))
    return result.model_copy(update={"mlflow_run_id": stage_run_id})
