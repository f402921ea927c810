"""The feature cache: one pass of the frozen base, checksummed, rebuilt when corrupted."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("keras")

from vggflow.config import BackboneConfig, HeadConfig
from vggflow.datasets import common_image_shape, file_errors_as_data_errors
from vggflow.errors import DataError
from vggflow.feature_cache import layer_cache_dir, load_layer, verified_layers
from vggflow.files import read_rows
from vggflow.images import load_rgb
from vggflow.model import build_base, build_classifier, resolve_weights
from vggflow.tasks.features import compute_features


@pytest.fixture
def rows(tiny_dataset) -> pd.DataFrame:
    paths = sorted(p.relative_to(tiny_dataset).as_posix() for p in tiny_dataset.rglob("*.png"))
    labels = [p.split("/")[0] for p in paths]
    splits = ["train", "val", "test"] * (len(paths) // 3)
    # As read back from validation's rows file: strings, each image's measured size included.
    return pd.DataFrame({"path": paths, "label": labels, "split": splits, "height": "32", "width": "32"})


def test_features_are_the_classifiers_pooled_base_output_and_are_cached(tmp_path, tiny_dataset, rows):
    weights = resolve_weights(BackboneConfig(weights="none", image_size=32), tmp_path, seed=3)
    classes = sorted(rows["label"].unique())
    kwargs = dict(
        rows=rows,
        data_dir=tiny_dataset,
        weights=weights,
        image_size=32,
        batch_size=5,
        cache_dir=tmp_path / "cache",
        fingerprint="fp",
        layers=["block4_pool"],
        class_names=classes,
    )
    features = compute_features(**kwargs)
    assert set(features.layers) == {"avg_pool", "block4_pool"}
    # Train and val rows only, in manifest order: the test images' outputs are cached apart, after the choice.
    cached = rows[rows["split"] != "test"].reset_index(drop=True)
    assert features.n_images == len(cached) < len(rows)
    pooled, labels = load_layer(features, "avg_pool")
    assert pooled.shape == (len(cached), 512) and list(labels[:3]) == [classes.index(x) for x in cached["label"][:3]]

    # Same numbers as the classifier's own pooled features on the decoded image files.
    classifier = build_classifier(build_base(weights, 32), len(classes), HeadConfig(), 32)
    import keras

    pool = keras.Model(classifier.input, classifier.get_layer("avg_pool").output)
    images = np.stack([load_rgb(tiny_dataset / p) for p in cached["path"][:4]]).astype(np.float32)
    np.testing.assert_allclose(pool(images).numpy(), pooled[:4], rtol=1e-4, atol=1e-4)

    train, train_labels = load_layer(features, "block4_pool", "train")
    assert train.shape[0] == len(train_labels) == (rows["split"] == "train").sum()
    # The rows the stages stream from keep the measured sizes (so they decode whole groups too).
    assert common_image_shape(read_rows(features.rows_file)) == (32, 32)

    # Second call: nothing recomputed (files untouched).
    directory = layer_cache_dir(tmp_path / "cache", "fp", weights.identity, 32)
    stamp = (directory / "avg_pool.npy").stat().st_mtime_ns
    compute_features(**kwargs)
    assert (directory / "avg_pool.npy").stat().st_mtime_ns == stamp


def test_a_cache_folder_that_still_holds_test_rows_is_rebuilt_and_relisted(tmp_path, tiny_dataset, rows):
    """Earlier versions cached every split: such a folder must not be read as train+val arrays."""
    import json

    from vggflow.feature_cache import _paths_digest

    weights = resolve_weights(BackboneConfig(weights="none", image_size=32), tmp_path, seed=3)
    kwargs = dict(
        rows=rows,
        data_dir=tiny_dataset,
        weights=weights,
        image_size=32,
        batch_size=8,
        cache_dir=tmp_path / "cache",
        fingerprint="fp",
        layers=[],
        class_names=sorted(rows["label"].unique()),
    )
    features = compute_features(**kwargs)
    expected_listing = features.rows_file.read_text()
    good = np.load(features.directory / "avg_pool.npy").copy()
    # What an earlier version left: every row listed, arrays and meta for every row.
    features.rows_file.write_text(rows[["path", "label", "split"]].to_csv(index=False))
    meta_file = features.directory / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["paths_sha256"] = _paths_digest(rows)
    meta_file.write_text(json.dumps(meta))
    assert verified_layers(features.directory, rows) == set()

    again = compute_features(**kwargs)
    assert again.rows_file.read_text() == expected_listing
    np.testing.assert_array_equal(np.load(again.directory / "avg_pool.npy"), good)
    assert verified_layers(again.directory, rows) == {"avg_pool"}


def test_corrupted_or_truncated_cache_is_detected_and_rebuilt(tmp_path, tiny_dataset, rows):
    weights = resolve_weights(BackboneConfig(weights="none", image_size=32), tmp_path, seed=3)
    kwargs = dict(
        rows=rows,
        data_dir=tiny_dataset,
        weights=weights,
        image_size=32,
        batch_size=8,
        cache_dir=tmp_path / "cache",
        fingerprint="fp",
        layers=[],
        class_names=sorted(rows["label"].unique()),
    )
    features = compute_features(**kwargs)
    good = np.load(features.directory / "avg_pool.npy").copy()
    path = features.directory / "avg_pool.npy"

    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF  # flip bits in the last value
    path.write_bytes(bytes(data))
    assert "avg_pool" not in verified_layers(features.directory, rows)
    compute_features(**kwargs)
    np.testing.assert_array_equal(np.load(path), good)

    path.write_bytes(path.read_bytes()[:-100])  # truncated
    assert "avg_pool" not in verified_layers(features.directory, rows)
    compute_features(**kwargs)
    np.testing.assert_array_equal(np.load(path), good)

    # A different row order invalidates the whole folder (arrays are aligned to rows).
    assert verified_layers(features.directory, rows.iloc[::-1]) == set()


def test_every_pipeline_runs_without_tf_data_autotuning(tmp_path):
    """Autotuning's optimisation loop made dropping an iterator wait for its next wake-up."""
    import numpy as np
    from PIL import Image

    from vggflow.datasets import array_dataset, image_dataset

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (9, 7), (i, 2 * i, 3 * i)).save(paths[-1])
    pipelines = {
        "images": image_dataset(paths, None, 32, 2),
        "images+labels": image_dataset(paths, [0, 1, 0], 32, 2, shuffle=True, seed=1),
        "arrays": array_dataset(np.zeros((5, 2), np.float32), np.zeros(5), 2, shuffle=True, seed=1),
    }
    for name, dataset in pipelines.items():
        assert dataset.options().autotune.enabled is False, name
        assert sum(1 for _ in dataset) == dataset.cardinality().numpy(), name
    assert [len(b) for b in pipelines["images"]] == [2, 1]


def test_image_dataset_resizes_mixed_sizes_and_modes_exactly_like_the_model(tmp_path):
    """Grouped decoding: same pixels, order and labels as resizing each decoded file on its own."""
    from PIL import Image

    from vggflow.datasets import image_dataset
    from vggflow.model import make_resizing

    rng = np.random.default_rng(0)
    paths = []
    for i, (size, mode) in enumerate(
        [
            ((40, 30), "RGB"),
            ((40, 30), "L"),
            ((17, 50), "RGBA"),
            ((40, 30), "RGB"),
            ((64, 64), "P"),
            ((33, 33), "RGB"),
            ((40, 30), "RGB"),
        ]
    ):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert(mode)
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    resize = make_resizing(32)
    expected = np.stack([resize(load_rgb(p).astype(np.float32)[None])[0].numpy() for p in paths])

    # 14 files: decode groups of 8 + 6 (mixed sizes), batches of 3 across group boundaries.
    dataset = image_dataset(paths * 2, None, 32, 3)
    assert int(dataset.cardinality()) == 5  # known to Keras: no "ran out of data" at epoch end
    batches = [b.numpy() for b in dataset]
    assert [len(b) for b in batches] == [3, 3, 3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(batches), np.concatenate([expected, expected]))
    # Files validation measured as all alike are resized a whole decode group per op: same pixels.
    same = [paths[i] for i in (0, 3, 6)]
    for batch_size in (3, 2):
        grouped = [b.numpy() for b in image_dataset(same, None, 32, batch_size, same_shape=(30, 40))]
        np.testing.assert_array_equal(np.concatenate(grouped), expected[[0, 3, 6]])
    x, y = next(iter(image_dataset(same, [5, 6, 7], 32, 3, same_shape=(30, 40))))
    np.testing.assert_array_equal(x.numpy(), expected[[0, 3, 6]])
    assert list(y.numpy()) == [5, 6, 7]
    # A file that changed since validation is named in one line, not reshaped into garbage.
    with pytest.raises(DataError, match=r"^\S+2\.png: 17x50 pixels, but validation measured 40x30: .*run it again$"):
        with file_errors_as_data_errors():
            list(image_dataset(same + [paths[2]], None, 32, 4, same_shape=(30, 40)))
    (tmp_path / "7.png").write_bytes(b"no longer an image")
    with pytest.raises(DataError, match=r"^\S+7\.png: not a recognised image format; it changed during this run"):
        with file_errors_as_data_errors():
            list(image_dataset(paths + [tmp_path / "7.png"], None, 32, 4))

    labels = np.arange(len(paths))
    seen = [(x.numpy(), y.numpy()) for x, y in image_dataset(paths, labels, 32, 2, shuffle=True, seed=1)]
    order = np.concatenate([y for _, y in seen])
    assert sorted(order) == list(labels) and list(order) != list(labels)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in seen]), expected[order])


def test_common_image_shape_only_when_validation_measured_one_size_for_all():
    rows = pd.DataFrame({"path": ["a", "b"], "height": ["30", "30"], "width": ["40", "40"]})
    assert common_image_shape(rows) == (30, 40)
    assert common_image_shape(rows.assign(width=["40", "41"])) is None
    assert common_image_shape(rows[["path"]]) is None  # a rows file from an older version
    assert common_image_shape(rows.iloc[:0]) is None


@pytest.mark.slow
def test_large_uniform_groups_are_resized_image_by_image_with_the_same_pixels(tmp_path, monkeypatch):
    """Above BATCH_MAX_PIXELS a same-size group is resized one image at a time (float32
    copies of one photo, not of eight): same pixels, and peak memory stays well under the
    group's float32 copy."""
    import subprocess
    import sys

    from PIL import Image

    import vggflow.datasets as datasets
    import vggflow.images
    from vggflow.model import make_resizing

    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(paths[-1])
    resize = make_resizing(32)
    expected = np.stack([resize(load_rgb(p).astype(np.float32)[None])[0].numpy() for p in paths])
    monkeypatch.setattr(vggflow.images, "BATCH_MAX_PIXELS", 40 * 30)  # one image fits, a group does not
    same = datasets.image_dataset(paths, None, 32, 3, same_shape=(30, 40))
    np.testing.assert_array_equal(next(iter(same)).numpy(), expected)

    # Eight 4000x3000 photos in one group: resizing them at once held a 1.15 GB float32 copy
    # (measured: the process grew by 1.47 GB that way, by 0.6 GB image by image).
    big = tmp_path / "big"
    big.mkdir()
    photo = Image.fromarray(rng.integers(0, 256, (3000 // 50, 4000 // 50, 3), dtype=np.uint8)).resize((4000, 3000))
    for i in range(8):
        photo.save(big / f"{i}.bmp")  # uncompressed: quick to write and to decode
    script = (
        "import resource, sys; from pathlib import Path; from vggflow.datasets import image_dataset; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        f"[b.shape for b in image_dataset(sorted(Path({str(big)!r}).iterdir()), None, 32, 8, same_shape=(3000, "
        f"4000))]; "
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)"
    )
    grown_mb = int(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()[-1]
    )
    assert grown_mb < 1000, f"decoding + resizing 8 photos of 12 MP grew the process by {grown_mb} MB"


def test_array_dataset_gives_every_row_once_per_epoch_in_a_seeded_order(tmp_path):
    """Cached stage batches: exact number of batches, each row once per epoch, a new order each
    epoch, the same orders for the same seed, and rows read from a cache file's row view."""
    import math

    from vggflow.datasets import array_dataset
    from vggflow.feature_cache import RowView

    n, batch = 23, 5
    values = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    np.save(tmp_path / "x.npy", values)
    view = RowView(tmp_path / "x.npy", np.arange(n))
    labels = np.arange(n) % 4

    def epochs(seed: int, count: int = 3) -> list[list[int]]:
        data = array_dataset(view, labels, batch, shuffle=True, seed=seed)
        assert int(data.cardinality()) == math.ceil(n / batch)
        orders = []
        for _ in range(count):
            order = []
            for x, y in data:
                rows = (x.numpy()[:, 0] / 3).astype(int)
                np.testing.assert_array_equal(x.numpy(), values[rows])
                np.testing.assert_array_equal(y.numpy(), labels[rows])
                order.extend(rows.tolist())
            orders.append(order)
        return orders

    first = epochs(seed=7)
    assert all(sorted(order) == list(range(n)) for order in first)
    assert first[0] != first[1] != first[2]
    assert epochs(seed=7) == first
    assert epochs(seed=8) != first
    plain = [int(r) for x, _ in array_dataset(view, labels, batch, shuffle=False, seed=7) for r in x.numpy()[:, 0] / 3]
    assert plain == list(range(n))


def test_images_are_fed_to_a_classifier_in_batches_capped_by_count_and_pixels(tmp_path, monkeypatch):
    """predict_in_batches (evaluate, champion re-scoring) and predict_files (`vggflow predict`):
    same-size batches of at most batch_size images and BATCH_MAX_PIXELS pixels, results in input
    order. Uncapped, 32 photos of 12 megapixels made evaluation grow by 15 GB."""
    import pandas as pd
    from PIL import Image

    import vggflow.datasets as datasets
    import vggflow.images
    import vggflow.predict as predict_module

    rng = np.random.default_rng(2)
    sizes = [(40, 30), (40, 30), (40, 30), (20, 20), (40, 30), (20, 20), (20, 20), (40, 30), (20, 20)]
    paths = []
    for i, size in enumerate(sizes):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(paths[-1])
    means = np.array([load_rgb(p).mean() for p in paths])
    budget = 2 * 40 * 30  # two of the large images, five of the small ones
    monkeypatch.setattr(vggflow.images, "BATCH_MAX_PIXELS", budget)  # the one rule both batchers use
    seen: list[tuple[int, ...]] = []

    def record(batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.uint8  # raw pixels, as a client sends them
        seen.append(batch.shape)
        return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True)

    got = datasets.predict_in_batches(record, paths, batch_size=4)
    np.testing.assert_allclose(got[:, 0], means)
    assert all(n <= 4 and n * h * w <= budget for n, h, w, _ in seen)
    assert sum(n for n, *_ in seen) == len(paths) and max(n for n, h, *_ in seen if h == 30) == 2

    class Model:  # the registered pyfunc's interface: a frame with per-image label probabilities
        def predict(self, batch: np.ndarray) -> pd.DataFrame:
            seen.append(batch.shape)
            return pd.DataFrame({"probabilities": [{"mean": float(image.mean()) / 255} for image in batch]})

    seen.clear()
    predictions = list(predict_module.predict_files(Model(), paths, top_k=1, batch_size=4))
    assert [p.path for p in predictions] == [str(p) for p in paths]
    np.testing.assert_allclose([p.top[0][1] for p in predictions], means / 255)
    assert all(n * h * w <= budget for n, h, w, _ in seen) and max(n for n, h, *_ in seen if h == 30) == 2


def test_the_registered_models_code_slices_large_inputs():
    """A client's batch of big photos reaches the Keras model in slices of at most 4 MP (the
    model resizes in float32); small-image batches stay whole. Same rows, same order."""
    from vggflow.pyfunc_model import VggflowClassifier

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[int, ...]] = []

        def predict_on_batch(self, batch: np.ndarray) -> np.ndarray:
            assert batch.dtype == np.float32
            self.calls.append(batch.shape)
            return np.stack([batch.reshape(len(batch), -1).mean(axis=1), np.zeros(len(batch))], axis=1)

    wrapper = VggflowClassifier()
    wrapper.model, wrapper.class_names = Recorder(), ["bright", "dark"]
    photos = np.stack([np.full((1000, 1500, 3), 10 * i, dtype=np.uint8) for i in range(7)])  # 1.5 MP each
    probabilities = wrapper.predict_proba(photos)
    np.testing.assert_array_equal(probabilities[:, 0], [10.0 * i for i in range(7)])
    assert [shape[0] for shape in wrapper.model.calls] == [2, 2, 2, 1]
    wrapper.model.calls.clear()
    frame = wrapper.predict(None, np.zeros((32, 224, 224, 3), dtype=np.uint8))
    assert len(frame) == 32 and [shape[0] for shape in wrapper.model.calls] == [32]
