"""Step 2a: run the frozen VGG19 base once over every training and validation image, cache its outputs.

The seed's Example 1 re-runs the frozen base on every image in every epoch; its output never
changes, so we compute it once per (dataset, backbone, image size) and train the head on it.
The same pass also stores each fine-tuning stage's frozen-prefix output (e.g. ``block4_pool``
for a ``block5`` stage) so stages do not recompute their frozen lower blocks every epoch.

Test images are not part of that pass: which of their outputs is useful depends on the stage
chosen later. After the choice, :func:`compute_scoring_prefix` caches the test images' output of
the chosen model's frozen part (``avg_pool`` for a head-only model, ``block4_pool`` for a
``block5`` stage, …) in ``<key>/test/``, so evaluating the next head or stage trained on the
same data runs only the layers that changed (``tasks/evaluate.py``).

Cache layout: ``<cache_dir>/features/<key>/<layer>.npy`` plus ``meta.json`` (shapes, sha256 of
every array, the row order). ``meta.json`` is written last, atomically: an entry without it,
or whose checksums do not match, is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from pydantic import BaseModel

from vggflow.caching import cached_task
from vggflow.files import ROWS_COLUMNS, atomic_write_text, read_rows
from vggflow.hashing import file_sha256, stable_hash

META_FILE = "meta.json"

#: The splits whose base outputs training reads (see the module docstring for the test split).
CACHED_SPLITS = ("train", "val")

#: Sub-folder of a feature cache folder holding the test images' frozen-prefix outputs.
TEST_DIR = "test"


class FeatureSet(BaseModel):
    """Reference to cached base outputs, aligned with ``rows_file`` (the train and val rows)."""

    directory: Path
    key: str
    layers: list[str]
    rows_file: Path
    class_names: list[str]
    n_images: int
    seconds: float = 0.0


def feature_cache_key(fingerprint: str, weights_identity: str, image_size: int, layers: list[str]) -> str:
    """Cache key: the dataset fingerprint + backbone weights + input size (+ which layers)."""
    return stable_hash(fingerprint, weights_identity, image_size, sorted(layers))


def layer_cache_dir(cache_dir: Path, fingerprint: str, weights_identity: str, image_size: int) -> Path:
    """One folder per dataset/backbone/size; each layer is a file in it, computed when first needed."""
    return Path(cache_dir) / "features" / stable_hash(fingerprint, weights_identity, image_size)


def read_meta(directory: Path) -> dict:
    """The meta of a cache folder, or {} when absent/unreadable."""
    try:
        return json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return {}


def cached_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows whose base outputs are cached, in cache order: the train and val splits."""
    return rows[rows["split"].isin(CACHED_SPLITS)].reset_index(drop=True)


def verified_layers(directory: Path, rows: pd.DataFrame) -> set[str]:
    """Layers whose arrays exist, match their recorded checksum and the current row order.

    ``rows`` are the usable manifest rows (only their cached splits count). A truncated or
    corrupted array (checksum mismatch) is treated as missing, so it is rebuilt.
    """
    return verified_arrays(directory, cached_rows(rows))


def verified_arrays(directory: Path, rows: pd.DataFrame) -> set[str]:
    """Layers of ``directory`` whose arrays are intact and aligned with exactly ``rows``, in order."""
    meta = read_meta(directory)
    if meta.get("paths_sha256") != _paths_digest(rows):
        return set()
    good = set()
    for name, info in meta.get("layers", {}).items():
        path = directory / info["file"]
        if path.is_file() and path.stat().st_size == info["bytes"] and file_sha256(path) == info["sha256"]:
            good.add(name)
    return good


def _paths_digest(rows: pd.DataFrame) -> str:
    return hashlib.sha256("\n".join(rows["path"] + "\t" + rows["label"]).encode()).hexdigest()


def extract_features(
    rows: pd.DataFrame,
    data_dir: Path,
    base,  # keras.Model: annotated loosely so this module imports without TensorFlow
    layers: list[str],
    image_size: int,
    batch_size: int,
    directory: Path,
    progress=None,
) -> dict[str, Path]:
    """Compute the named base layers' outputs for ``rows`` into ``directory``.

    Images stream from disk (``tf.data``); outputs are appended batch by batch to ``.npy``
    files, so memory does not grow with the dataset.

    Args:
        rows: usable manifest rows (``path`` relative to ``data_dir``, ``label``), in cache order.
        data_dir: dataset root.
        base: the VGG19 conv base (frozen).
        layers: the layers to compute (``avg_pool`` for pooled features, or prefix layer names).
        image_size: square input side.
        batch_size: images per forward pass.
        directory: the cache folder (see :func:`layer_cache_dir`).
        progress: optional ``callable(done, total)`` for progress reporting.

    Returns:
        Layer name → ``.npy`` path.
    """
    import tensorflow as tf

    from vggflow.datasets import common_image_shape, file_errors_as_data_errors, image_dataset
    from vggflow.model import feature_extractor

    directory.mkdir(parents=True, exist_ok=True)
    missing = sorted(set(layers))
    if missing:
        extractor = feature_extractor(base, missing, image_size)
        # A compiled forward loop: on these CPUs `model.predict` intermittently used one core.
        # Traced once for any batch size, so the last, smaller batch does not trace it again.
        forward = tf.function(
            lambda x: extractor(x, training=False),
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)],
        )
        total = len(rows)
        # Plain sequential writes (header, then each batch), not a writable memory map: a mapped
        # array's pages count in the process's resident memory, which then grows with the dataset.
        # Each file is hashed as it is written rather than read back afterwards. No fsync: the
        # checksum in meta.json is verified before every reuse, so an array a crash left
        # incomplete is rebuilt, never used.
        handles, temps, shapes = {}, {}, {}
        for name in missing:
            shapes[name] = (total, *extractor.output[name].shape[1:])
            temps[name] = directory / f".{name}.{os.getpid()}.tmp.npy"
            handles[name] = _HashingFile(temps[name])
            header = {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                "fortran_order": False,
                "shape": shapes[name],
            }
            np.lib.format.write_array_header_1_0(handles[name], header)
        paths = [Path(data_dir) / p for p in rows["path"]]
        done = 0
        try:
            with file_errors_as_data_errors():
                for batch in image_dataset(paths, None, image_size, batch_size, same_shape=common_image_shape(rows)):
                    outputs = forward(batch)
                    n = int(batch.shape[0])
                    for name in missing:
                        handles[name].write(np.ascontiguousarray(outputs[name].numpy(), dtype=np.float32).data)
                    done += n
                    if progress:
                        progress(done, total)
        finally:
            for handle in handles.values():
                handle.close()
        if done != total:
            raise RuntimeError(f"feature extraction produced {done} rows for {total} images")
        meta = read_meta(directory)
        if meta.get("paths_sha256") != _paths_digest(rows):
            meta = {}  # arrays aligned to another row order: none of them stays valid
        meta.setdefault("layers", {})
        for name in missing:
            final = directory / f"{name}.npy"
            os.replace(temps[name], final)
            meta["layers"][name] = {
                "file": final.name,
                "shape": list(shapes[name]),
                "bytes": final.stat().st_size,
                "sha256": handles[name].digest.hexdigest(),
            }
        meta["paths_sha256"] = _paths_digest(rows)
        meta["n_images"] = len(rows)
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=1))
    return {name: directory / f"{name}.npy" for name in missing}


class _HashingFile:
    """A file opened for writing that keeps the sha256 of everything written to it."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "wb")
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def close(self) -> None:
        self.handle.close()


def load_layer(features: FeatureSet, layer: str, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A cached layer's rows and their class indices, optionally for one split.

    Without ``split``: the whole array, memory-mapped. With a split: a view that reads only the
    rows asked for, from the file, when sliced (see :class:`RowView`).
    """
    rows = read_rows(features.rows_file)
    path = features.directory / f"{layer}.npy"
    labels = rows["label"].map({name: i for i, name in enumerate(features.class_names)}).to_numpy()
    if split is None:
        return np.load(path, mmap_mode="r"), labels
    mask = (rows["split"] == split).to_numpy()
    return RowView(path, np.flatnonzero(mask)), labels[mask]


class RowView:
    """Rows ``index`` of a cached ``.npy`` array, read from the file only when sliced.

    Reads with ``pread`` rather than through a memory map: pages of a mapped file count in the
    process's resident memory for as long as the mapping lives, so an epoch over a memory-mapped
    prefix cache made the process's RSS grow by the cache's size (measured: +0.8 GB at 4,000
    images, 64², benchmarks/results/memory.md). Page-cache reuse between epochs is unchanged.
    """

    def __init__(self, path: Path, index: np.ndarray) -> None:
        self.path, self.index = Path(path), np.asarray(index, dtype=np.int64)
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            shape, fortran, self.dtype = (
                np.lib.format.read_array_header_1_0(handle)
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0(handle)
            )
            self.offset = handle.tell()
        if fortran:
            raise ValueError(f"{self.path}: Fortran-ordered arrays are not supported")
        self.row_shape = tuple(shape[1:])
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.shape = (len(self.index), *self.row_shape)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows) -> np.ndarray:
        wanted = np.atleast_1d(self.index[rows])
        out = np.empty((len(wanted), *self.row_shape), dtype=self.dtype)
        flat = out.reshape(len(wanted), -1).view(np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            start = 0
            while start < len(wanted):
                # One read per run of consecutive rows.
                stop = start + 1
                while stop < len(wanted) and wanted[stop] == wanted[stop - 1] + 1:
                    stop += 1
                target = memoryview(flat[start:stop]).cast("B")
                if os.preadv(fd, [target], self.offset + int(wanted[start]) * self.row_bytes) != target.nbytes:
                    raise OSError(f"{self.path}: short read (truncated cache file?)")
                start = stop
        finally:
            os.close(fd)
        return out if np.ndim(self.index[rows]) else out[0]


def compute_features(
    rows: pd.DataFrame,
    data_dir: Path,
    weights,
    image_size: int,
    batch_size: int,
    cache_dir: Path,
    fingerprint: str,
    layers: list[str],
    class_names: list[str],
    progress=None,
) -> FeatureSet:
    """Load the base and make sure the wanted layers are cached for the train and val rows.

    Returns:
        A reference to the cached arrays (``rows_file`` lists their rows, in order).
    """
    from vggflow.model import build_base, set_aside_base

    rows = cached_rows(rows)
    directory = layer_cache_dir(cache_dir, fingerprint, weights.identity, image_size)
    started = time.perf_counter()
    wanted = set(layers) | {"avg_pool"}
    missing = sorted(wanted - verified_layers(directory, rows))
    if missing:
        base = build_base(weights, image_size)
        extract_features(rows, data_dir, base, missing, image_size, batch_size, directory, progress)
        set_aside_base(base, weights, image_size)  # the head's classifier needs the same, untouched base
    rows_file = directory / "rows.csv"
    listing = rows[[c for c in ROWS_COLUMNS if c in rows.columns]].to_csv(index=False)
    # Rewritten when it differs: a folder written by an older version may list other rows.
    if not rows_file.is_file() or rows_file.read_text() != listing:
        atomic_write_text(rows_file, listing)
    return FeatureSet(
        directory=directory,
        key=feature_cache_key(fingerprint, weights.identity, image_size, layers),
        layers=sorted(wanted),
        rows_file=rows_file,
        class_names=class_names,
        n_images=len(rows),
        seconds=time.perf_counter() - started,
    )


def _outputs_valid(parameters: dict) -> bool:
    rows = read_rows(parameters["rows_file"])
    directory = layer_cache_dir(
        parameters["cache_dir"], parameters["fingerprint"], parameters["weights"].identity, parameters["image_size"]
    )
    wanted = set(parameters["layers"]) | {"avg_pool"}
    return (directory / "rows.csv").is_file() and wanted <= verified_layers(directory, rows)


def progress_logger(label: str, every: float = 0.1):
    """A ``progress(done, total)`` that logs about every 10%, not every batch."""
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    started = time.perf_counter()
    state = {"next": every}

    def progress(done: int, total: int) -> None:
        if done >= total or done / total >= state["next"]:
            rate = done / max(time.perf_counter() - started, 1e-9)
            logger.info(f"{label}: {done}/{total} images ({rate:.1f} images/s)")
            state["next"] = done / total + every

    return progress


@cached_task("extract-features", _outputs_valid)
def extract_features_task(
    rows_file: Path,
    data_dir: Path,
    weights,
    image_size: int,
    batch_size: int,
    cache_dir: Path,
    fingerprint: str,
    layers: list[str],
    class_names: list[str],
    cache_key: str,
) -> FeatureSet:
    """Prefect shell: cache the frozen base's outputs for the validated rows (keyed by data + backbone + size)."""
    from vggflow.tasks.preflight import check_disk_space, required_bytes

    rows = read_rows(rows_file)
    check_disk_space(Path(cache_dir), required_bytes(len(rows), _bytes_per_image(layers, image_size), 0))
    return compute_features(
        rows,
        data_dir,
        weights,
        image_size,
        batch_size,
        cache_dir,
        fingerprint,
        layers,
        class_names,
        progress_logger("feature extraction"),
    )


def _bytes_per_image(layers: list[str], image_size: int) -> int:
    from vggflow.tasks.finetune import prefix_bytes

    stage_of = {"input_layer": "block1", **{f"block{i}_pool": f"block{i + 1}" for i in range(1, 5)}}
    return 2048 + sum(prefix_bytes(stage_of[name], image_size, 1) for name in layers if name in stage_of)


class ScoringPrefix(BaseModel):
    """Reference to the test images' cached output of the chosen model's frozen part.

    Attributes:
        directory: the folder holding ``<layer>.npy`` for the test rows (checksummed ``meta.json``).
        layer: ``avg_pool`` (a head-only model) or the chosen stage's prefix layer (``block4_pool``, …).
        unfreeze_from: the chosen stage's first trainable block, None for a head-only model.
        n_images: test rows covered, in the validated rows' order.
        seconds: time spent computing it (0 when the cached array was reused).
    """

    directory: Path
    layer: str
    unfreeze_from: str | None
    n_images: int
    seconds: float = 0.0


def scoring_prefix_layer(prefix_cache: str | None) -> str | None:
    """The layer whose test-image output can score a stage trained on ``prefix_cache``, else None.

    A stage's ``prefix_cache`` (``avg_pool`` for the head) names frozen layers that are still the
    original backbone, so their output for a test image is the same whichever head or stage was
    trained on top. ``input_layer`` (an ``all`` stage) has nothing frozen to skip: None, and the
    test images are scored through the whole model.
    """
    return prefix_cache if prefix_cache not in (None, "input_layer") else None


def compute_scoring_prefix(
    rows: pd.DataFrame,
    data_dir: Path,
    weights,
    image_size: int,
    batch_size: int,
    features_dir: Path,
    prefix_cache: str | None,
    unfreeze_from: str | None,
    progress=None,
) -> ScoringPrefix | None:
    """Make sure the test rows' output of the chosen model's frozen part is cached (once per data version).

    Args:
        rows: usable manifest rows (only the test split is used).
        data_dir: dataset root.
        weights: the resolved backbone weights (the frozen part's weights).
        image_size: square input side.
        batch_size: images per forward pass.
        features_dir: this data version's feature cache folder (:attr:`FeatureSet.directory`).
        prefix_cache: the chosen stage's ``prefix_cache`` (see :func:`scoring_prefix_layer`).
        unfreeze_from: the chosen stage's first trainable block (None: head only).

    Returns:
        A reference to the cached array, or None when the chosen model has no frozen part to
        skip or there are no test rows (then the test images are scored through the whole model).
    """
    from vggflow.model import build_base

    layer = scoring_prefix_layer(prefix_cache)
    test = rows[rows["split"] == "test"].reset_index(drop=True)
    if layer is None or len(test) == 0:
        return None
    directory = Path(features_dir) / TEST_DIR
    started, seconds = time.perf_counter(), 0.0
    if layer not in verified_arrays(directory, test):
        from vggflow.tasks.preflight import check_disk_space, required_bytes

        check_disk_space(directory, required_bytes(len(test), _bytes_per_image([layer], image_size), 0))
        extract_features(
            test, data_dir, build_base(weights, image_size), [layer], image_size, batch_size, directory, progress
        )
        seconds = time.perf_counter() - started
    return ScoringPrefix(
        directory=directory, layer=layer, unfreeze_from=unfreeze_from, n_images=len(test), seconds=seconds
    )


@task(name="cache-test-prefix")
def compute_scoring_prefix_task(
    rows_file: Path,
    data_dir: Path,
    weights,
    image_size: int,
    batch_size: int,
    features: FeatureSet,
    prefix_cache: str | None,
    unfreeze_from: str | None,
) -> ScoringPrefix | None:
    """Prefect shell: cache the test images' output of the chosen model's frozen part, when it has one."""
    if scoring_prefix_layer(prefix_cache) is None:
        return None
    return compute_scoring_prefix(
        read_rows(rows_file),
        data_dir,
        weights,
        image_size,
        batch_size,
        features.directory,
        prefix_cache,
        unfreeze_from,
        progress_logger("test images' frozen-part outputs"),
    )
