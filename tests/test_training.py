"""Training steps: reproducible (same data + config + seed → same weights and metrics), best
weights kept, stages start from the previous stage's checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("keras")

from tests.conftest import stage_config
from vggflow.config import HeadConfig, StageConfig
from vggflow.tasks.finetune import run_stage
from vggflow.tasks.train_head import train_head_on_features as train_head
from vggflow.training import checkpoint_is_valid


def test_head_and_stage_training_are_reproducible(tmp_path, tiny_dataset, features):
    import keras

    fs, weights = features
    head_cfg = HeadConfig(dense_units=16, epochs=4, patience=4)
    stage = StageConfig(unfreeze_from="block5", learning_rate=1e-4, epochs=2)
    runs = []
    for attempt in range(2):
        head = train_head(fs, weights, 32, head_cfg, 7, tmp_path / f"head{attempt}.keras")
        tuned = run_stage(head, stage, stage_config(tiny_dataset), fs, "block4_pool", tmp_path / f"b5{attempt}.keras")
        runs.append((head, tuned))
    (h0, s0), (h1, s1) = runs
    assert h0.history == h1.history and s0.history == s1.history
    for a, b in zip(
        keras.saving.load_model(s0.checkpoint).get_weights(), keras.saving.load_model(s1.checkpoint).get_weights()
    ):
        np.testing.assert_array_equal(a, b)
    assert checkpoint_is_valid(s0.checkpoint)
    # The stage started from the head's weights: only block5 and the head changed.
    before, after = keras.saving.load_model(h0.checkpoint), keras.saving.load_model(s0.checkpoint)
    base_before, base_after = before.get_layer("vgg19"), after.get_layer("vgg19")
    np.testing.assert_array_equal(
        base_before.get_layer("block4_conv4").get_weights()[0], base_after.get_layer("block4_conv4").get_weights()[0]
    )
    assert not np.array_equal(
        base_before.get_layer("block5_conv1").get_weights()[0], base_after.get_layer("block5_conv1").get_weights()[0]
    )


def test_best_epoch_weights_are_kept(tmp_path, features):
    fs, weights = features
    head = train_head(
        fs, weights, 32, HeadConfig(dense_units=16, epochs=6, patience=6, learning_rate=0.05), 3, tmp_path / "h.keras"
    )
    losses = [epoch["val_loss"] for epoch in head.history]
    assert head.best_epoch == int(np.argmin(losses)) and head.best_val_loss == pytest.approx(min(losses))


def test_stage_on_streamed_images_ends_epochs_cleanly(tmp_path, tiny_dataset, features):
    """Without a prefix cache the stage streams images; Keras must know where each epoch ends."""
    import warnings

    fs, weights = features
    head = train_head(fs, weights, 32, HeadConfig(dense_units=16, epochs=1, patience=1), 7, tmp_path / "head.keras")
    stage = StageConfig(unfreeze_from="block5", learning_rate=1e-4, epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = run_stage(head, stage, stage_config(tiny_dataset), fs, None, tmp_path / "b5.keras")
    assert tuned.epochs_run == 2 and tuned.prefix_cache is None and checkpoint_is_valid(tuned.checkpoint)
    assert tuned.images_per_second > 0
    # Keras knows where each epoch ends, and is not told to shuffle a dataset that shuffles itself.
    assert not [w for w in caught if "ran out of data" in str(w.message) or "shuffle=True" in str(w.message)]


def test_head_is_the_same_whether_the_extraction_set_its_base_aside_or_not(tmp_path, tiny_dataset, features):
    """The extraction hands its loaded base to the head's classifier (not loaded twice); whether
    that happened (extraction run here) or not (extraction cached) must not change the head."""
    import keras

    from vggflow import model as model_module

    fs, weights = features  # compute_features ran: its base is set aside for these weights
    assert model_module._spare_base
    cfg = HeadConfig(dense_units=16, epochs=2, patience=2)
    reused = train_head(fs, weights, 32, cfg, 7, tmp_path / "reused.keras")
    assert not model_module._spare_base  # taken once
    loaded = train_head(fs, weights, 32, cfg, 7, tmp_path / "loaded.keras")
    assert reused.history == loaded.history
    for a, b in zip(
        keras.saving.load_model(reused.checkpoint).get_weights(),
        keras.saving.load_model(loaded.checkpoint).get_weights(),
    ):
        np.testing.assert_array_equal(a, b)


def test_stage_batches_do_not_depend_on_other_users_of_the_global_random_state(tmp_path, tiny_dataset, features):
    """Prefect and MLflow draw from Python's global `random` on their own threads while a stage
    trains; the stage's batch order (hence its weights) must not depend on that."""
    import random
    import threading

    import keras

    fs, weights = features
    head = train_head(fs, weights, 32, HeadConfig(dense_units=16, epochs=1, patience=1), 7, tmp_path / "head.keras")
    stage = StageConfig(unfreeze_from="block5", learning_rate=1e-3, epochs=3)
    results = []
    for attempt in range(2):
        stop = threading.Event()

        def draw(stop: threading.Event = stop) -> None:
            while not stop.wait(0.001):
                random.random()

        other = threading.Thread(target=draw, daemon=True)
        if attempt:
            other.start()
        try:
            results.append(
                run_stage(
                    head,
                    stage,
                    stage_config(tiny_dataset, finetune={"batch_size": 4, "patience": 3}),
                    fs,
                    "block4_pool",
                    tmp_path / f"b5-{attempt}.keras",
                )
            )
        finally:
            stop.set()
    assert results[0].history == results[1].history
    for a, b in zip(*(keras.saving.load_model(r.checkpoint).get_weights() for r in results)):
        np.testing.assert_array_equal(a, b)
