"""Backbone weights: ImageNet through Keras's real loader, a local file, or none — and a clear stop
when they cannot be obtained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras")

from vggflow.config import BackboneConfig
from vggflow.errors import BackboneError
from vggflow.model import IMAGENET_NOTOP_FILE, build_base, resolve_weights


@pytest.fixture
def empty_keras_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    return tmp_path / "keras-home" / "models"


def test_imagenet_unavailable_stops_with_the_cache_path_and_alternatives(tmp_path, empty_keras_cache):
    # This machine has no internet: Keras's own download attempt fails fast.
    with pytest.raises(BackboneError) as err:
        resolve_weights(BackboneConfig(weights="imagenet", image_size=32), tmp_path / "cache", seed=0)
    message = str(err.value)
    assert str(empty_keras_cache / IMAGENET_NOTOP_FILE) in message
    assert "backbone.weights" in message and "allow_random_init" in message


def test_imagenet_unavailable_falls_back_only_when_allowed(tmp_path, empty_keras_cache):
    weights = resolve_weights(
        BackboneConfig(weights="imagenet", allow_random_init=True, image_size=32), tmp_path, seed=0
    )
    assert weights.random_init and weights.identity.startswith("random-seed0-")
    assert str(empty_keras_cache / IMAGENET_NOTOP_FILE) in weights.note


def test_imagenet_weights_in_the_keras_cache_are_found_and_loaded(tmp_path, empty_keras_cache, monkeypatch):
    # The real ImageNet file cannot be downloaded here: write a VGG19 notop weights file in the same
    # legacy HDF5 layout where Keras caches it, and accept its md5 as the published one (only the
    # hash is substituted; the lookup is Keras's own get_file, the loading VGG19's own).
    import hashlib

    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    import vggflow.model

    random = resolve_weights(BackboneConfig(weights="none", image_size=32), tmp_path, seed=3)
    empty_keras_cache.mkdir(parents=True)
    cached = empty_keras_cache / IMAGENET_NOTOP_FILE
    with h5py.File(cached, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, build_base(random, 32))
    monkeypatch.setattr(vggflow.model, "IMAGENET_NOTOP_MD5", hashlib.md5(cached.read_bytes()).hexdigest())
    weights = resolve_weights(BackboneConfig(weights="imagenet", image_size=32), tmp_path / "other", seed=0)
    assert not weights.random_init and weights.identity.startswith("imagenet:")
    assert weights.path == cached and str(cached) in weights.note
    loaded = build_base(weights, 32)
    assert all((x == y).all() for x, y in zip(build_base(random, 32).get_weights(), loaded.get_weights()))


def test_local_weights_file_is_loaded(tmp_path):
    random = resolve_weights(BackboneConfig(weights="none", image_size=32), tmp_path, seed=5)
    local = tmp_path / "my_vgg19_notop.weights.h5"
    local.write_bytes(random.path.read_bytes())
    weights = resolve_weights(BackboneConfig(weights=str(local), image_size=32), tmp_path / "other", seed=0)
    assert not weights.random_init and weights.identity.startswith("file:") and weights.path == local
    a, b = build_base(random, 32), build_base(weights, 32)
    assert all((x == y).all() for x, y in zip(a.get_weights(), b.get_weights()))


def test_missing_or_broken_local_file_is_reported(tmp_path):
    with pytest.raises(BackboneError, match="weights file not found"):
        resolve_weights(BackboneConfig(weights=str(tmp_path / "nope.h5"), image_size=32), tmp_path, seed=0)
    broken = tmp_path / "broken.h5"
    broken.write_text("not hdf5")
    with pytest.raises(BackboneError, match="not a loadable VGG19"):
        resolve_weights(BackboneConfig(weights=str(broken), image_size=32), tmp_path, seed=0)


@pytest.mark.slow
def test_train_stops_before_any_work_when_weights_are_missing(project, tiny_dataset, tmp_path):
    env = {**__import__("os").environ, "KERAS_HOME": str(tmp_path / "keras-home")}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("vggflow")), "train", "--data", str(tiny_dataset)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 4, done.stderr[-3000:]
    assert IMAGENET_NOTOP_FILE in done.stderr and "Traceback" not in done.stderr
    assert not (project / ".vggflow" / "cache" / "features").exists()  # nothing was computed
