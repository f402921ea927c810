"""The VGG19 classifier: backbone weights, the model graph, freeze configurations.

Shared by the feature-extraction, fine-tuning, evaluation and registration steps so they all
build exactly the same graph. Importing this module imports Keras (slow): import it only where
a model is needed. Slightly over ~400 lines on purpose: weights, graph and freezing share the
layer names and must agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras.applications import vgg19
from pydantic import BaseModel

from vggflow.caching import code_version
from vggflow.config import VGG19_BLOCKS, BackboneConfig, HeadConfig
from vggflow.errors import BackboneError
from vggflow.files import atomic_path
from vggflow.hashing import file_sha256

IMAGENET_NOTOP_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
# Where and what VGG19(weights="imagenet") downloads (keras/src/applications/vgg19.py). The public
# `keras.applications.vgg19` module does not export the URL, so it is spelled out here.
IMAGENET_NOTOP_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
IMAGENET_NOTOP_MD5 = "253f8cb515780f3b799900260a226db6"
BASE_NAME = "vgg19"
HEAD_LAYERS = ("head_norm", "head_dense", "head_dropout", "predictions")

#: Pooled features whose variance on the training rows is below this fraction of the median
#: variance are scaled as if they had this much: a random base has dead units, and a test image
#: that wakes one up must not be multiplied by the inverse square root of almost nothing.
VARIANCE_FLOOR = 1e-3


class ResolvedWeights(BaseModel):
    """Where the backbone weights come from.

    Attributes:
        path: a weights file every step loads (the same file, so they all see the same base).
        identity: a short stable id for cache keys and tags (e.g. ``imagenet:253f8cb5…``).
        random_init: True when the base is randomly initialised (no pretrained weights).
        note: human explanation, printed and logged (e.g. why random init was used).
    """

    path: Path
    identity: str
    random_init: bool
    note: str

    def with_absolute_path(self) -> ResolvedWeights:
        """The same weights with an absolute path (for a process with another working directory)."""
        return self.model_copy(update={"path": Path(self.path).resolve()})


def keras_cache_dir() -> Path:
    """Keras's download cache (``$KERAS_HOME`` or ``~/.keras``) + ``models``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def seeded_initial_weights(layers: list[keras.layers.Layer], seed: int) -> None:
    """Set the weights of ``layers`` to fresh initial values drawn from ``seed`` alone.

    Keras's default initialisers (Glorot-uniform kernels, zero biases), but drawn from NumPy
    generators seeded by ``(seed, layer position)``. Keras itself seeds each unseeded initialiser
    from Python's global ``random`` when the layer is built, which any other thread (Prefect's,
    MLflow's) may draw from meanwhile, so ``keras.utils.set_random_seed`` alone does not make the
    initial weights reproducible.
    """
    for position, layer in enumerate(layers):
        values = []
        for weight in layer.weights:
            shape = tuple(weight.shape)
            if len(shape) < 2:
                values.append(np.zeros(shape, dtype=np.float32))
                continue
            receptive = int(np.prod(shape[:-2]))
            limit = np.sqrt(6.0 / (receptive * shape[-2] + receptive * shape[-1]))
            generator = np.random.default_rng([seed, position, len(values)])
            values.append(generator.uniform(-limit, limit, shape).astype(np.float32))
        if values:
            layer.set_weights(values)


def _random_weights(cache_dir: Path, image_size: int, seed: int, note: str) -> ResolvedWeights:
    """Create (once) and cache a seeded random initialisation so every step loads the same base.

    Its identity names the seed and the version of this module's code that drew it.
    """
    identity = f"random-seed{seed}-{code_version(__name__)[:8]}"
    path = cache_dir / "backbones" / f"vgg19-{identity}.weights.h5"
    if not path.exists():
        base = vgg19.VGG19(include_top=False, weights=None, input_shape=(image_size, image_size, 3))
        seeded_initial_weights(base.layers, seed)
        with atomic_path(path) as tmp:
            base.save_weights(tmp)
    return ResolvedWeights(path=path, identity=identity, random_init=True, note=note)


def resolve_weights(cfg: BackboneConfig, cache_dir: Path, seed: int) -> ResolvedWeights:
    """Find (or download) the backbone weights, or fail before any work is done.

    Args:
        cfg: the backbone section (``weights`` is ``imagenet``, ``none`` or a file path).
        cache_dir: where a seeded random initialisation is cached.
        seed: seeds a random initialisation.

    Raises:
        BackboneError: the weights cannot be obtained and random init is not allowed; the message
            names the Keras cache path and the alternatives.
    """
    choice = cfg.weights
    if choice.lower() == "none":
        return _random_weights(cache_dir, cfg.image_size, seed, "backbone.weights is `none`: randomly initialised")
    if choice.lower() == "imagenet":
        expected = keras_cache_dir() / IMAGENET_NOTOP_FILE
        try:
            # Keras's own loader, as VGG19(weights="imagenet") calls it: its cache, a download when
            # missing, the published hash checked; without building a model just to find out.
            found = keras.utils.get_file(
                IMAGENET_NOTOP_FILE,
                IMAGENET_NOTOP_URL,
                cache_dir=str(expected.parent.parent),
                cache_subdir="models",
                file_hash=IMAGENET_NOTOP_MD5,
            )
        except Exception as err:  # Keras raises a bare Exception for fetch failures
            return _random_or_fail(
                cfg,
                cache_dir,
                seed,
                f"ImageNet weights for VGG19 are not in the Keras cache ({expected}) and could not be "
                f"downloaded: {err}",
                "Fix one of:\n"
                f"  - copy {IMAGENET_NOTOP_FILE} into {expected.parent} (or set KERAS_HOME),\n"
                "  - set backbone.weights to the path of a local VGG19 weights file (--set "
                "backbone.weights=/path/file.h5),\n"
                "  - for a pipeline test only: --set backbone.allow_random_init=true (or backbone.weights=none).",
            )
        return ResolvedWeights(
            path=Path(found),
            identity=f"imagenet:{IMAGENET_NOTOP_MD5[:16]}",
            random_init=False,
            note=f"ImageNet weights from {found}",
        )
    path = Path(choice).expanduser()
    if not path.is_file():
        return _random_or_fail(
            cfg,
            cache_dir,
            seed,
            f"backbone.weights: weights file not found: {path}",
            "Give the path of a VGG19 `include_top=False` weights file (.h5 or .weights.h5), `imagenet` or `none`.",
        )
    try:
        vgg19.VGG19(include_top=False, weights=str(path), input_shape=(32, 32, 3))
    except Exception as err:
        raise BackboneError(
            f"backbone.weights: {path} is not a loadable VGG19 (include_top=False) weights file: {err}"
        ) from None
    return ResolvedWeights(
        path=path, identity=f"file:{file_sha256(path)[:16]}", random_init=False, note=f"weights from {path}"
    )


def _random_or_fail(cfg: BackboneConfig, cache_dir: Path, seed: int, problem: str, fix: str) -> ResolvedWeights:
    """A seeded random init when the config allows one, else a :class:`BackboneError` saying how to fix it."""
    if cfg.allow_random_init:
        return _random_weights(cache_dir, cfg.image_size, seed, f"{problem}. Using a random init (allowed by config).")
    raise BackboneError(f"{problem}\n{fix}") from None


def build_base(weights: ResolvedWeights, image_size: int) -> keras.Model:
    """The VGG19 convolutional base (``include_top=False``), loaded from ``weights.path``."""
    return vgg19.VGG19(include_top=False, weights=str(weights.path), input_shape=(image_size, image_size, 3))


# One loaded base that has only run inference (the feature extraction's), handed to the next
# step in the same process that needs an unmodified base (the head's classifier) instead of
# building and loading VGG19 again (~0.3 s). Taken at most once: the taker trains it.
_spare_base: dict[tuple[str, str, int], keras.Model] = {}


def set_aside_base(base: keras.Model, weights: ResolvedWeights, image_size: int) -> None:
    """Keep ``base`` (unmodified: inference only) for the next :func:`take_base` of the same weights."""
    _spare_base.clear()  # one at most: a base is 80 MB
    _spare_base[(weights.identity, str(weights.path), image_size)] = base


def take_base(weights: ResolvedWeights, image_size: int) -> keras.Model:
    """The base set aside for these weights and size, if any (once), else a newly loaded one."""
    spare = _spare_base.pop((weights.identity, str(weights.path), image_size), None)
    return spare if spare is not None else build_base(weights, image_size)


def make_resizing(image_size: int) -> keras.layers.Layer:
    """The one resize used by the data pipeline and inside the model (so they cannot differ)."""
    return keras.layers.Resizing(image_size, image_size, interpolation="bilinear", antialias=True, name="resize")


def build_classifier(
    base: keras.Model, n_classes: int, head: HeadConfig, image_size: int, seed: int | None = None
) -> keras.Model:
    """Raw RGB images (any size, uint8 or float 0..255) → class probabilities.

    The graph carries its own resize and VGG19's own ``preprocess_input`` (RGB→BGR, ImageNet mean
    subtraction), so a client needs nothing else: VGG19 conv base → GlobalAveragePooling2D →
    [standardisation] → Dense(units, relu) → [Dropout] → Dense(n_classes, softmax), the article's
    head with its input standardised (adapted by :func:`standardize_head` on the training rows).
    With ``seed``, the head's initial weights and its dropout masks depend on ``seed`` alone
    (:func:`seeded_initial_weights`).
    """
    images = keras.Input(shape=(None, None, 3), name="image")
    x = make_resizing(image_size)(images)
    x = vgg19.preprocess_input(x)
    x = base(x)
    features = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = _head(features, n_classes, head, seed)
    model = keras.Model(images, outputs, name="vggflow_classifier")
    if seed is not None:
        # The standardisation has no initial weights: it is adapted on the training features.
        seeded_initial_weights([layer for layer in head_layers(model) if layer.trainable_weights], seed)
    return model


def _head(features: keras.KerasTensor, n_classes: int, head: HeadConfig, seed: int | None) -> keras.KerasTensor:
    x = features
    if head.standardize:
        x = keras.layers.Normalization(axis=-1, dtype="float32", name="head_norm")(x)
    if head.dense_units:  # 0: a linear classifier on the (standardised) pooled features
        x = keras.layers.Dense(head.dense_units, activation="relu", name="head_dense")(x)
    if head.dropout > 0:
        x = keras.layers.Dropout(head.dropout, seed=seed, name="head_dropout")(x)
    return keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="predictions")(x)


def standardize_head(model: keras.Model, train_features: np.ndarray) -> None:
    """Adapt the head's standardisation (if it has one) on the training rows' pooled features only.

    The mean and variance are weights of the model: they travel with every checkpoint and the
    registered model, so serving standardises exactly as training did.
    """
    if "head_norm" not in {layer.name for layer in model.layers}:
        return
    norm = model.get_layer("head_norm")
    norm.adapt(np.asarray(train_features, dtype=np.float32))
    variance = np.asarray(norm.adapt_variance.numpy())
    positive = variance[variance > 0]
    floor = VARIANCE_FLOOR * (float(np.median(positive)) if positive.size else 1.0)
    norm.adapt_variance.assign(np.maximum(variance, floor).astype(np.float32))
    norm.finalize_state()


def augmentation(image_size: int, translate: float, flip: str, seed: int) -> keras.Model | None:
    """Random shifts (and mirrors) of resized images, a training-time layer: identity at inference.

    Shifted-in pixels are black, as the background of product photos on a plain ground is.
    """
    layers = []
    if translate > 0:
        layers.append(
            keras.layers.RandomTranslation(translate, translate, fill_mode="constant", seed=seed, name="aug_shift")
        )
    if flip != "none":
        layers.append(keras.layers.RandomFlip(flip, seed=seed, name="aug_flip"))
    if not layers:
        return None
    images = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = images
    for layer in layers:
        x = layer(x)
    return keras.Model(images, x, name="augment")


def base_of(model: keras.Model) -> keras.Model:
    """The nested VGG19 base of a classifier built by :func:`build_classifier`."""
    return model.get_layer(BASE_NAME)


def head_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The classifier's head layers, input to output."""
    names = {layer.name for layer in model.layers}
    return [model.get_layer(name) for name in HEAD_LAYERS if name in names]


def head_model(model: keras.Model) -> keras.Model:
    """A model over pooled base features that *shares* the classifier's head layers.

    Training it trains the classifier's head: this is how the head learns from cached features.
    """
    features = keras.Input(shape=(base_of(model).output_shape[-1],), name="features")
    x = features
    for layer in head_layers(model):
        x = layer(x)
    return keras.Model(features, x, name="head")


@dataclass(frozen=True)
class FreezeInfo:
    """A freeze configuration, as logged to MLflow."""

    stage: str
    first_trainable_layer: str
    trainable_layers: int
    trainable_params: int


def first_layer_of(base: keras.Model, unfreeze_from: str) -> int:
    """Index in ``base.layers`` of the first layer of a block (``all`` → the first conv layer)."""
    block = "block1" if unfreeze_from == "all" else unfreeze_from
    if block not in VGG19_BLOCKS:
        raise ValueError(f"unknown block {unfreeze_from!r}; expected one of {VGG19_BLOCKS} or 'all'")
    for index, layer in enumerate(base.layers):
        if layer.name.startswith(f"{block}_"):
            return index
    raise ValueError(f"the base has no layer of {block}")


def count_params(weights: list) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def unfreeze_to(model: keras.Model, unfreeze_from: str | None, stage: str) -> FreezeInfo:
    """Freeze the base below ``unfreeze_from`` and make everything above (and the head) trainable.

    Args:
        model: a classifier from :func:`build_classifier`.
        unfreeze_from: ``block1``..``block5``, ``all``, or None for head-only (base frozen).
        stage: the stage name recorded in the returned info.
    """
    base = base_of(model)
    base.trainable = True
    start = len(base.layers) if unfreeze_from is None else first_layer_of(base, unfreeze_from)
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= start
    for layer in head_layers(model):
        layer.trainable = True
    trainable = [layer for layer in base.layers if layer.trainable and layer.weights] + [
        layer for layer in head_layers(model) if layer.trainable_weights
    ]
    first = trainable[0].name if trainable else ""
    return FreezeInfo(
        stage=stage,
        first_trainable_layer=first,
        trainable_layers=len(trainable),
        trainable_params=count_params(model.trainable_weights),
    )


def prefix_layer_name(base: keras.Model, unfreeze_from: str) -> str:
    """The frozen part's last layer for a stage: its output is what the stage can cache."""
    return base.layers[first_layer_of(base, unfreeze_from) - 1].name


def suffix_model(model: keras.Model, unfreeze_from: str) -> keras.Model:
    """A model from the frozen prefix's output to the probabilities, *sharing* the classifier's layers.

    Training it on cached prefix outputs trains the classifier's upper blocks and head without
    recomputing the frozen lower blocks every epoch.
    """
    base = base_of(model)
    start = first_layer_of(base, unfreeze_from)
    shape = base.layers[start - 1].output.shape[1:]
    inputs = keras.Input(shape=shape, name=f"{base.layers[start - 1].name}_output")
    x = inputs
    for layer in base.layers[start:]:
        x = layer(x)
    x = model.get_layer("avg_pool")(x)
    for layer in head_layers(model):
        x = layer(x)
    return keras.Model(inputs, x, name=f"from_{unfreeze_from}")


def feature_extractor(base: keras.Model, layer_names: list[str], image_size: int) -> keras.Model:
    """Raw resized images → {layer name: output} for the frozen base, for exactly ``layer_names``.

    One forward pass yields the head's pooled features (``avg_pool``) and every stage's cached
    prefix output; the graph ends at the deepest layer asked for (a test split's ``block4_pool``
    alone does not run ``block5``).
    """
    images = keras.Input(shape=(image_size, image_size, 3), name="image")
    wanted = set(layer_names)
    known = {layer.name for layer in base.layers[1:]} | {"input_layer", "avg_pool"}
    if not wanted or not wanted <= known:
        raise ValueError(f"feature_extractor: unknown or no layers {sorted(wanted - known) or layer_names}")
    x = vgg19.preprocess_input(images)
    outputs: dict[str, keras.KerasTensor] = {}
    if "input_layer" in wanted:
        outputs["input_layer"] = x
    deepest = (
        len(base.layers)
        if "avg_pool" in wanted
        else max((i for i, layer in enumerate(base.layers) if layer.name in wanted), default=0)
    )
    for layer in base.layers[1 : deepest + 1]:
        x = layer(x)
        if layer.name in wanted:
            outputs[layer.name] = x
    if "avg_pool" in wanted:
        outputs["avg_pool"] = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(images, outputs, name="feature_extractor")
