"""Evaluation from the test images' cached frozen-part outputs: the same scores as the whole
model, computed once per data version, and a fall-back to the images whenever the cache or
the check disagrees."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("keras")

from vggflow.config import BackboneConfig, Config, EvaluateConfig, HeadConfig, StageConfig
from vggflow.feature_cache import TEST_DIR
from vggflow.model import resolve_weights
from vggflow.tasks.evaluate import compute_scoring_prefix, evaluate_classifier
from vggflow.tasks.features import compute_features
from vggflow.tasks.finetune import run_stage
from vggflow.tasks.train_head import train_head_on_features as train_head

pytestmark = pytest.mark.slow


@pytest.fixture
def trained(tmp_path, tiny_dataset):
    """Rows with a test split, cached train/val features, a head and a block5 stage on them."""
    paths = sorted(p.relative_to(tiny_dataset).as_posix() for p in tiny_dataset.rglob("*.png"))
    rows = pd.DataFrame(
        {"path": paths, "label": [p.split("/")[0] for p in paths], "split": ["train", "val", "test"] * 12}
    )
    classes = sorted(rows["label"].unique())
    weights = resolve_weights(BackboneConfig(weights="none", image_size=32), tmp_path, seed=1)
    features = compute_features(rows, tiny_dataset, weights, 32, 8, tmp_path / "cache", "fp", ["block4_pool"], classes)
    head = train_head(
        features, weights, 32, HeadConfig(dense_units=16, epochs=3, patience=3), 7, tmp_path / "head.keras"
    )
    stage = StageConfig(unfreeze_from="block5", learning_rate=1e-4, epochs=1)
    cfg = Config(
        seed=7,
        data={"dir": str(tiny_dataset)},
        backbone={"weights": "none", "image_size": 32, "precision": "float32"},
        finetune={"batch_size": 8},
    )
    block5 = run_stage(head, stage, cfg, features, "block4_pool", tmp_path / "b5.keras")
    return rows, classes, weights, features, head, block5


def _evaluate(tmp_path, tiny_dataset, rows, classes, result, prefix, name):
    test = rows[rows["split"] == "test"]
    # No kept scores (scores_dir None): every call scores.
    return evaluate_classifier(
        result.checkpoint, test, tiny_dataset, classes, EvaluateConfig(batch_size=4), tmp_path / name, None, prefix
    )


def _probabilities(evaluation) -> pd.DataFrame:
    return pd.read_csv(evaluation.files["predictions"])


@pytest.mark.parametrize("which", ["head", "block5"])
def test_cached_prefix_scores_match_the_whole_model_and_are_computed_once(tmp_path, tiny_dataset, trained, which):
    rows, classes, weights, features, head, block5 = trained
    result = head if which == "head" else block5
    assert result.prefix_cache == ("avg_pool" if which == "head" else "block4_pool")
    prefix = compute_scoring_prefix(
        rows, tiny_dataset, weights, 32, 8, features.directory, result.prefix_cache, result.unfreeze_from
    )
    array = features.directory / TEST_DIR / f"{result.prefix_cache}.npy"
    assert prefix is not None and prefix.n_images == 12 and array.is_file()
    # Computed once per data version: a second call (the next head or stage) reuses the file.
    written = os.stat(array).st_mtime_ns
    again = compute_scoring_prefix(
        rows, tiny_dataset, weights, 32, 8, features.directory, result.prefix_cache, result.unfreeze_from
    )
    assert os.stat(array).st_mtime_ns == written
    assert prefix.seconds > 0 and again == prefix.model_copy(update={"seconds": 0.0})

    whole = _evaluate(tmp_path, tiny_dataset, rows, classes, result, None, "whole")
    cached = _evaluate(tmp_path, tiny_dataset, rows, classes, result, prefix, "cached")
    assert whole.scored_from == "images"
    assert cached.scored_from.startswith(f"cached {result.prefix_cache} of the test images (8 also scored")
    assert cached.metrics == whole.metrics and cached.confusion == whole.confusion
    a, b = _probabilities(whole), _probabilities(cached)
    assert list(a["predicted"]) == list(b["predicted"])
    np.testing.assert_allclose(a["confidence"], b["confidence"], atol=1e-5)


def test_a_damaged_or_mismatched_prefix_falls_back_to_scoring_the_images(tmp_path, tiny_dataset, trained):
    rows, classes, weights, features, head, _ = trained
    whole = _evaluate(tmp_path, tiny_dataset, rows, classes, head, None, "whole")

    # Cached by another backbone (a different random init): intact, but not this model's frozen part.
    other = resolve_weights(BackboneConfig(weights="none", image_size=32), tmp_path / "other", seed=2)
    foreign = compute_scoring_prefix(rows, tiny_dataset, other, 32, 8, tmp_path / "other-cache", "avg_pool", None)
    mismatched = _evaluate(tmp_path, tiny_dataset, rows, classes, head, foreign, "mismatched")
    assert mismatched.scored_from.startswith("images (the cached avg_pool route differed from the whole model by")
    assert mismatched.metrics == whole.metrics

    # A truncated cache file fails its checksum: the images are scored, nothing crashes.
    prefix = compute_scoring_prefix(rows, tiny_dataset, weights, 32, 8, features.directory, "avg_pool", None)
    array = prefix.directory / "avg_pool.npy"
    array.write_bytes(array.read_bytes()[:-64])
    damaged = _evaluate(tmp_path, tiny_dataset, rows, classes, head, prefix, "damaged")
    assert damaged.scored_from == "images (the cached avg_pool of the test images does not match them)"
    assert damaged.metrics == whole.metrics
    # The next call rebuilds it.
    rebuilt = compute_scoring_prefix(rows, tiny_dataset, weights, 32, 8, features.directory, "avg_pool", None)
    assert _evaluate(tmp_path, tiny_dataset, rows, classes, head, rebuilt, "rebuilt").scored_from.startswith(
        "cached avg_pool"
    )


def test_nothing_is_cached_when_the_chosen_model_has_no_frozen_part(tmp_path, tiny_dataset, trained):
    rows, _, weights, features, _, _ = trained
    for prefix_cache, unfreeze_from in ((None, "block5"), ("input_layer", "all")):
        assert (
            compute_scoring_prefix(rows, tiny_dataset, weights, 32, 8, features.directory, prefix_cache, unfreeze_from)
            is None
        )
    no_test = rows[rows["split"] != "test"]
    assert compute_scoring_prefix(no_test, tiny_dataset, weights, 32, 8, features.directory, "avg_pool", None) is None
    assert not (features.directory / TEST_DIR).exists()
