"""The training recipe's keys: a standardised head, per-stage schedules, discriminative rates,
augmentation in training only, and the compute precision."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("keras")

from tests.conftest import stage_config
from vggflow.config import FinetuneConfig, HeadConfig, StageConfig
from vggflow.feature_cache import load_layer
from vggflow.model import augmentation
from vggflow.precision import FLOAT32, MIXED_BFLOAT16, cpu_flags, resolve_precision
from vggflow.tasks.finetune import run_stage, stage_key
from vggflow.tasks.train_head import train_head_on_features as train_head
from vggflow.training import StageResult, block_lr_multipliers, stage_optimizer, warmup_cosine


def test_standardisation_is_adapted_on_training_features_only_and_saved_in_the_model(tmp_path, features):
    import keras

    fs, weights = features
    head = train_head(fs, weights, 32, HeadConfig(dense_units=8, epochs=2, patience=2), 7, tmp_path / "h.keras")
    x_train, _ = load_layer(fs, "avg_pool", "train")
    x_val, _ = load_layer(fs, "avg_pool", "val")
    x_train, x_val = np.asarray(x_train), np.asarray(x_val)
    # The saved classifier (what evaluation, registration and serving load) carries the statistics.
    norm = keras.saving.load_model(head.checkpoint).get_layer("head_norm")
    mean, variance = (np.asarray(w).ravel() for w in norm.get_weights()[:2])
    np.testing.assert_allclose(mean, x_train.mean(axis=0), rtol=1e-4, atol=1e-6)
    assert not np.allclose(mean, np.concatenate([x_train, x_val]).mean(axis=0), rtol=1e-4, atol=1e-6)
    # Dead units of the random base get the floor, never a division by ~0.
    assert variance.min() > 0 and np.all(variance >= x_train.var(axis=0) - 1e-6)


def test_a_linear_head_without_standardisation_is_the_articles_head_minus_the_hidden_layer(tmp_path, features):
    import keras

    fs, weights = features
    cfg = HeadConfig(dense_units=0, standardize=False, dropout=0.0, epochs=1, patience=1)
    model = keras.saving.load_model(train_head(fs, weights, 32, cfg, 7, tmp_path / "h.keras").checkpoint)
    names = {layer.name for layer in model.layers}
    assert "predictions" in names and not names & {"head_norm", "head_dense", "head_dropout"}


def test_warmup_cosine_rises_to_the_peak_and_ends_at_the_final_fraction():
    schedule = warmup_cosine(1e-3, total_steps=20, warmup_steps=4, final_fraction=0.1)
    rates = [float(schedule(step)) for step in range(21)]
    assert rates[0] == 0.0 and rates[4] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(rates[:5], rates[1:5]))  # rising during the warm-up
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))  # then only falling
    assert rates[20] == pytest.approx(1e-4)
    no_warmup = warmup_cosine(1e-3, total_steps=10, warmup_steps=0, final_fraction=0.0)
    assert float(no_warmup(0)) == pytest.approx(1e-3) and float(no_warmup(10)) == pytest.approx(0.0, abs=1e-12)


def _blocks_model():
    """Three dense layers named like VGG19's blocks and the head's output layer."""
    import keras

    x = inputs = keras.Input(shape=(4,))
    for name in ("block4_conv1", "block5_conv1", "predictions"):
        x = keras.layers.Dense(4, name=name)(x)
    return keras.Model(inputs, x)


def _step_sizes(model, optimizer, steps: int) -> list[dict[str, float]]:
    """Each variable's change per step under a constant gradient of ones: Adam's step is then the rate."""
    import keras

    variables = model.trainable_variables
    optimizer.build(variables)
    sizes = []
    for _ in range(steps):
        before = [np.asarray(v) for v in variables]
        optimizer.apply([keras.ops.ones(v.shape) for v in variables], variables)
        sizes.append({v.path: float(np.abs(b - np.asarray(v)).mean()) for v, b in zip(variables, before)})
    return sizes


def test_discriminative_rates_reach_the_right_layers():
    cfg = FinetuneConfig(schedule="constant", block_lr_multiplier=0.1, lower_block_lr_decay=0.5)
    stage = StageConfig(unfreeze_from="block4", learning_rate=1e-2, epochs=2)
    step = _step_sizes(_blocks_model(), stage_optimizer(cfg, stage, steps_per_epoch=3), 1)[0]
    assert step["predictions/kernel"] == pytest.approx(1e-2, rel=1e-3)
    assert step["block5_conv1/kernel"] == pytest.approx(1e-3, rel=1e-3)
    assert step["block4_conv1/kernel"] == pytest.approx(5e-4, rel=1e-3)
    assert block_lr_multipliers("all", 0.1, 0.5)["block1_.*"] == pytest.approx(0.1 * 0.5**4)


def test_a_stages_schedule_reaches_its_final_rate_in_every_layer_group():
    cfg = FinetuneConfig(warmup_epochs=1, final_lr_fraction=0.2, block_lr_multiplier=0.1, lower_block_lr_decay=0.5)
    stage = StageConfig(unfreeze_from="block4", learning_rate=1e-2, epochs=3)
    sizes = _step_sizes(_blocks_model(), stage_optimizer(cfg, stage, steps_per_epoch=2), 7)
    for path, multiplier in (("predictions/kernel", 1.0), ("block5_conv1/kernel", 0.1), ("block4_conv1/kernel", 0.05)):
        peak = 1e-2 * multiplier
        assert sizes[0][path] == 0.0  # the warm-up starts from zero
        assert sizes[2][path] == pytest.approx(peak, rel=1e-3)  # the peak after one epoch
        assert sizes[6][path] == pytest.approx(0.2 * peak, rel=1e-3)  # the final rate at the last step


def test_augmentation_changes_images_in_training_only():
    import keras

    augment = augmentation(32, translate=0.25, flip="horizontal", seed=3)
    images = keras.random.uniform((4, 32, 32, 3), seed=1) * 255
    np.testing.assert_array_equal(np.asarray(augment(images, training=False)), np.asarray(images))
    assert not np.allclose(np.asarray(augment(images, training=True)), np.asarray(images))
    assert augmentation(32, translate=0.0, flip="none", seed=3) is None


def test_an_augmenting_stage_streams_images_and_saves_no_augmentation(tmp_path, tiny_dataset, features):
    import keras

    fs, weights = features
    head = train_head(fs, weights, 32, HeadConfig(dense_units=8, epochs=1, patience=1), 7, tmp_path / "h.keras")
    cfg = stage_config(
        tiny_dataset,
        augment={"translate": 0.1, "flip": "horizontal"},
        finetune={"batch_size": 8, "schedule": "constant"},
    )
    stage = StageConfig(unfreeze_from="block5", learning_rate=1e-3, epochs=1)
    tuned = run_stage(head, stage, cfg, fs, None, tmp_path / "b5.keras")
    model = keras.saving.load_model(tuned.checkpoint)
    assert not [layer.name for layer in model.layers if layer.name.startswith("aug")]
    image = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    np.testing.assert_array_equal(model.predict(image, verbose=0), model.predict(image, verbose=0))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [({"avx2", "amx_bf16"}, MIXED_BFLOAT16), ({"avx512f", "avx512_bf16"}, MIXED_BFLOAT16), ({"avx2"}, FLOAT32)],
)
def test_auto_precision_resolves_from_cpu_flags(flags, expected):
    assert resolve_precision("auto", flags) == expected
    assert resolve_precision("float32", {"amx_bf16"}) == FLOAT32  # an explicit setting wins


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_precision_is_part_of_the_stage_key(tmp_path, features):
    fs, _ = features
    previous = StageResult(
        stage="head", unfreeze_from=None, learning_rate=1e-3, checkpoint=tmp_path / "h.keras", checkpoint_sha256="",
        history=[], best_epoch=0, best_val_accuracy=0.0, best_val_loss=0.0, first_trainable_layer="",
        trainable_layers=0, trainable_params=0, epochs_run=0, seconds=0.0, images_per_second=0.0, cache_key="head",
    )  # fmt: skip
    stage = StageConfig(unfreeze_from="block5", learning_rate=1e-3)
    keys = {stage_key(stage_config(tmp_path, p), previous, stage, fs) for p in (FLOAT32, MIXED_BFLOAT16)}
    assert len(keys) == 2


def test_a_bfloat16_stage_saves_a_float32_classifier(tmp_path, tiny_dataset, features):
    import keras

    fs, weights = features
    head = train_head(fs, weights, 32, HeadConfig(dense_units=8, epochs=1, patience=1), 7, tmp_path / "h.keras")
    stage = StageConfig(unfreeze_from="block5", learning_rate=1e-3, epochs=2)
    tuned = run_stage(head, stage, stage_config(tiny_dataset, MIXED_BFLOAT16), fs, "block4_pool", tmp_path / "b5.keras")
    model = keras.saving.load_model(tuned.checkpoint)
    assert {w.dtype for w in model.weights if "float" in w.dtype} == {"float32"}
    assert {layer.dtype_policy.name for layer in model.get_layer("vgg19").layers} == {"float32"}
    before = keras.saving.load_model(head.checkpoint).get_layer("vgg19").get_layer("block5_conv1").get_weights()[0]
    assert not np.array_equal(before, model.get_layer("vgg19").get_layer("block5_conv1").get_weights()[0])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["finetune.block_lr_multiplier=-0.1"], "finetune.block_lr_multiplier"),
        (["finetune.lower_block_lr_decay=0"], "finetune.lower_block_lr_decay"),
        (["finetune.warmup_epochs=-1"], "finetune.warmup_epochs"),
        (
            ["finetune.warmup_epochs=4", "finetune.stages=[{unfreeze_from: block5, learning_rate: 0.001, epochs: 3}]"],
            "finetune.stages.0.epochs",
        ),
        (["finetune.final_lr_fraction=1.5"], "finetune.final_lr_fraction"),
        (["head.lr_plateau_factor=2"], "head.lr_plateau_factor"),
        (["augment.translate=0.01", "backbone.image_size=64"], "augment.translate"),
        (["augment.translate=0.6"], "augment.translate"),
        (["augment.flip=vertical"], "augment.flip"),
        (["backbone.precision=float16"], "backbone.precision"),
    ],
)
def test_recipe_settings_that_make_no_sense_are_config_errors_naming_the_key(overrides, expected):
    from vggflow.config import load_config
    from vggflow.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, environ={})
    assert expected in str(err.value)
