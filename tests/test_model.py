"""Unit tests of the classifier graph: preprocessing, freeze configurations, shared layers."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from keras.applications import vgg19  # noqa: E402

from vggflow.config import BackboneConfig, HeadConfig  # noqa: E402
from vggflow.model import (  # noqa: E402
    base_of,
    build_base,
    build_classifier,
    feature_extractor,
    head_model,
    make_resizing,
    prefix_layer_name,
    resolve_weights,
    suffix_model,
    unfreeze_to,
)

SIZE = 32


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    cfg = BackboneConfig(weights="none", image_size=SIZE)
    return resolve_weights(cfg, tmp_path_factory.mktemp("cache"), seed=1)


@pytest.fixture(scope="module")
def classifier(weights):
    return build_classifier(build_base(weights, SIZE), 3, HeadConfig(dense_units=8), SIZE)


def test_random_weights_are_cached_and_reproducible(weights, tmp_path):
    again = resolve_weights(BackboneConfig(weights="none", image_size=SIZE), weights.path.parent.parent, seed=1)
    assert again.path == weights.path and again.random_init and again.identity.startswith("random-seed1-")
    other = resolve_weights(BackboneConfig(weights="none", image_size=SIZE), tmp_path, seed=1)
    a, b = build_base(weights, SIZE), build_base(other, SIZE)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_initial_weights_do_not_depend_on_other_threads_drawing_random_numbers(weights, tmp_path):
    """Keras seeds unseeded initialisers from Python's global `random`, which Prefect's and
    MLflow's threads share: the base's random init and the head's initial weights must not care."""
    import random
    import threading

    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            random.random()

    def build() -> list[np.ndarray]:
        resolved = resolve_weights(BackboneConfig(weights="none", image_size=SIZE), tmp_path / str(random.random()), 7)
        classifier = build_classifier(build_base(resolved, SIZE), 3, HeadConfig(dense_units=8, dropout=0.2), SIZE, 7)
        return classifier.get_weights()

    quiet = build()
    drawer = threading.Thread(target=draw, daemon=True)
    drawer.start()
    try:
        busy = build()
    finally:
        stop.set()
        drawer.join()
    assert len(quiet) == len(busy)
    for a, b in zip(quiet, busy):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(w != 0) for w in quiet[-4:])  # the head's kernels are initialised, not left at zero


def test_in_graph_preprocessing_is_vgg19_preprocess_input(classifier):
    images = np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3)).astype(np.float32)
    # By hand: the shared resize, VGG19's own preprocess_input, then the classifier's layers.
    x = vgg19.preprocess_input(make_resizing(SIZE)(images).numpy().copy())
    x = classifier.get_layer("avg_pool")(base_of(classifier)(x))
    for name in ("head_dense", "predictions"):
        x = classifier.get_layer(name)(x)
    np.testing.assert_allclose(classifier(images).numpy(), np.asarray(x), atol=1e-6)


def test_classifier_accepts_any_size_uint8(classifier):
    batch = np.random.default_rng(1).integers(0, 256, (2, 45, 37, 3)).astype(np.uint8)
    probabilities = classifier.predict_on_batch(batch.astype(np.float32))
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_loader_resize_matches_model_resize():
    image = np.random.default_rng(2).integers(0, 256, (1, 50, 70, 3)).astype(np.float32)
    once = make_resizing(SIZE)(image).numpy()
    twice = make_resizing(SIZE)(once).numpy()
    np.testing.assert_allclose(once, twice, atol=1e-4)


def test_unfreeze_to_counts_layers(classifier):
    head_only = unfreeze_to(classifier, None, "head")
    assert head_only.first_trainable_layer == "head_dense" and head_only.trainable_layers == 2
    block5 = unfreeze_to(classifier, "block5", "block5")
    assert block5.first_trainable_layer == "block5_conv1" and block5.trainable_layers == 6
    everything = unfreeze_to(classifier, "all", "all")
    assert everything.first_trainable_layer == "block1_conv1" and everything.trainable_layers == 18
    # Every weight but the standardisation's statistics (adapted, never trained).
    statistics = sum(int(np.prod(w.shape)) for w in classifier.get_layer("head_norm").weights)
    assert everything.trainable_params == classifier.count_params() - statistics
    assert prefix_layer_name(base_of(classifier), "block5") == "block4_pool"


def test_suffix_and_head_models_share_the_classifiers_layers(classifier):
    images = np.random.default_rng(3).integers(0, 256, (3, SIZE, SIZE, 3)).astype(np.float32)
    extractor = feature_extractor(base_of(classifier), ["avg_pool", "block4_pool", "input_layer"], SIZE)
    outputs = extractor(images)
    full = classifier(images).numpy()
    np.testing.assert_allclose(head_model(classifier)(outputs["avg_pool"]).numpy(), full, atol=1e-5)
    np.testing.assert_allclose(suffix_model(classifier, "block5")(outputs["block4_pool"]).numpy(), full, atol=1e-5)
    np.testing.assert_allclose(suffix_model(classifier, "all")(outputs["input_layer"]).numpy(), full, atol=1e-4)
    # Changing a shared layer through the suffix model changes the classifier.
    dense = classifier.get_layer("predictions")
    kernel, bias = dense.get_weights()
    suffix = suffix_model(classifier, "block5")
    suffix.get_layer("predictions").set_weights([kernel * 0, bias * 0])
    np.testing.assert_allclose(classifier(images).numpy(), 1 / 3, atol=1e-6)
    dense.set_weights([kernel, bias])


def test_feature_extractor_ends_at_the_deepest_layer_asked_for(classifier):
    names = [layer.name for layer in feature_extractor(base_of(classifier), ["block4_pool"], SIZE).layers]
    assert "block4_pool" in names and "block5_conv1" not in names and "avg_pool" not in names
    with pytest.raises(ValueError, match="unknown"):
        feature_extractor(base_of(classifier), ["block9_pool"], SIZE)
