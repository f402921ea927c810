"""The feature cache is written and read without memory-mapping it (memory stays flat).

A memory-mapped array's touched pages count in the process's resident memory while the mapping
lives, so writing the caches through ``open_memmap`` and training stages on memory-mapped
prefix caches made a training run's peak RSS grow with the dataset (benchmarks/bench_memory.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("keras")

from vggflow.config import BackboneConfig
from vggflow.feature_cache import RowView, load_layer
from vggflow.model import resolve_weights
from vggflow.tasks.features import compute_features


def _mapped(fragment: str) -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if fragment in line]


@pytest.fixture
def rows(tiny_dataset) -> pd.DataFrame:
    paths = sorted(p.relative_to(tiny_dataset).as_posix() for p in tiny_dataset.rglob("*.png"))
    splits = ["train", "val", "test"] * (len(paths) // 3)
    return pd.DataFrame({"path": paths, "label": [p.split("/")[0] for p in paths], "split": splits})


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_cache_is_written_and_read_without_memory_maps(tmp_path, tiny_dataset, rows):
    weights = resolve_weights(BackboneConfig(weights="none", image_size=32), tmp_path, seed=3)
    seen_maps: list[str] = []
    features = compute_features(
        rows,
        tiny_dataset,
        weights,
        32,
        5,
        tmp_path / "cache",
        "fp",
        ["block4_pool", "input_layer"],
        sorted(rows["label"].unique()),
        progress=lambda done, total: seen_maps.extend(_mapped(".tmp.npy")),
    )
    assert seen_maps == []  # nothing mapped while writing
    full = np.load(features.directory / "block4_pool.npy")
    cached = rows[rows["split"] != "test"].reset_index(drop=True)  # test rows are not cached
    assert full.shape == (len(cached), 2, 2, 512)

    view, labels = load_layer(features, "block4_pool", "train")
    index = np.flatnonzero((cached["split"] == "train").to_numpy())
    assert isinstance(view, RowView) and view.shape == (len(index), 2, 2, 512) and len(labels) == len(index)
    np.testing.assert_array_equal(view[: len(view)], full[index])
    np.testing.assert_array_equal(view[np.array([3, 0, 1, 2])], full[index[[3, 0, 1, 2]]])  # any order, runs
    np.testing.assert_array_equal(view[2], full[index[2]])
    assert _mapped("block4_pool.npy") == []  # nothing mapped while reading

    # A split whose rows are contiguous (one read) and a wide layer.
    contiguous = RowView(features.directory / "input_layer.npy", np.arange(2, 9))
    np.testing.assert_array_equal(contiguous[1:5], np.load(features.directory / "input_layer.npy")[3:7])


def test_truncated_cache_file_is_an_error_not_garbage(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(40, dtype=np.float32).reshape(10, 4))
    path.write_bytes(path.read_bytes()[:-8])  # last row cut short
    view = RowView(path, np.arange(10))
    np.testing.assert_array_equal(view[:3], np.arange(12, dtype=np.float32).reshape(3, 4))
    with pytest.raises(OSError, match="short read"):
        view[8:10]
