"""Step 3, head: feature-extraction training on the cached base features.

The classifier is the article's: frozen VGG19 base → GlobalAveragePooling2D → Dense(128, relu) →
Dense(n, softmax). Because the base is frozen and pooling has no weights, training the head on
the cached pooled features is the same optimisation as fitting the whole model through the
frozen base, without running the base every epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vggflow.caching import cached_task, code_version
from vggflow.config import Config, HeadConfig
from vggflow.feature_cache import FeatureSet, load_layer
from vggflow.hashing import stable_hash
from vggflow.runs import TrainingRun, in_stage_run
from vggflow.stages import HEAD_STAGE
from vggflow.training import StageResult, checkpoint_is_valid, checkpoint_path, report_stage

if TYPE_CHECKING:
    from vggflow.model import ResolvedWeights


def train_head_on_features(
    features: FeatureSet,
    weights: ResolvedWeights,
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

    from vggflow.model import build_classifier, head_model, standardize_head, take_base, unfreeze_to
    from vggflow.training import adam, finish_stage, fit_stage

    base = take_base(weights, image_size)
    # The initial weights come from `seed` alone (build_classifier); the global seed is for
    # Keras's shuffling of the training rows.
    keras.utils.set_random_seed(seed)
    model = build_classifier(base, len(features.class_names), cfg, image_size, seed)
    freeze = unfreeze_to(model, None, HEAD_STAGE)
    # Pooled features are small (512 floats per image): fit on in-memory arrays with Keras's own
    # shuffle, exactly as `model.fit` over images through the frozen base would.
    x_train, y_train = (np.asarray(a[: len(a)]) for a in load_layer(features, "avg_pool", "train"))
    x_val, y_val = (np.asarray(a[: len(a)]) for a in load_layer(features, "avg_pool", "val"))
    standardize_head(model, x_train)  # on the training rows only: validation stays unseen
    # Trained to its plateau: the rate drops when validation loss stalls, early stopping ends it.
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", factor=cfg.lr_plateau_factor, patience=cfg.lr_plateau_patience, min_lr=1e-6
    )
    fit = fit_stage(
        head_model(model),
        (x_train, y_train),
        (x_val, y_val),
        adam(cfg.learning_rate, cfg.weight_decay),
        cfg.epochs,
        cfg.patience,
        on_epoch,
        batch_size=cfg.batch_size,
        label_smoothing=cfg.label_smoothing,
        callbacks=[plateau],
    )
    return finish_stage(model, checkpoint, HEAD_STAGE, None, cfg.learning_rate, freeze, fit, len(y_train), "avg_pool")


def head_key(cfg: Config, features: FeatureSet) -> str:
    """The head's cache key: its pooled features (not the stages' prefix layers beside them), config, seed and code.

    So adding stages after iterating on the head alone reuses the head already trained.
    """
    return stable_hash(features.pooled_key, cfg.head, cfg.seed, features.class_names, code_version(__name__))


@cached_task(
    "train-head",
    lambda p: head_key(p["cfg"], p["features"]),
    lambda p: checkpoint_is_valid(checkpoint_path(p["cfg"].work_dir, head_key(p["cfg"], p["features"]))),
)
def train_head_task(
    cfg: Config, weights: ResolvedWeights, features: FeatureSet, stage_run_id: str | None = None
) -> StageResult:
    """Train the head on the cached pooled features, each epoch logged to the stage's MLflow run."""
    key = head_key(cfg, features)
    return report_stage(
        HEAD_STAGE,
        cfg.head.epochs,
        stage_run_id,
        key,
        f"stage {HEAD_STAGE}: training the new head on cached features, lr {cfg.head.learning_rate:g}",
        lambda on_epoch: train_head_on_features(
            features,
            weights,
            cfg.backbone.image_size,
            cfg.head,
            cfg.seed,
            checkpoint_path(cfg.work_dir, key),
            on_epoch,
        ),
    )


def train_head(cfg: Config, weights: ResolvedWeights, features: FeatureSet, run: TrainingRun) -> StageResult:
    """The head, trained (or reused from the cache) inside its own nested MLflow run."""
    return in_stage_run(
        run,
        HEAD_STAGE,
        None,
        cfg.head.learning_rate,
        lambda stage_run_id: train_head_task(cfg, weights, features, stage_run_id),
    )
