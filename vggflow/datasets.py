"""Feeding images and cached arrays to Keras.

Images stream from disk through ``tf.data`` (parallel decode of small groups of files with the
shared Pillow decoder, the model's own resize, batching, prefetch) and are never all held in
memory. Cached arrays (frozen-prefix outputs) are read from their ``.npy`` files batch by
batch, in a seeded order that changes every epoch.

Every pipeline here runs with ``tf.data``'s autotuning off (:func:`without_autotune`) and fixed,
explicit parallelism and prefetch depths.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import tensorflow as tf

import vggflow.images
from vggflow.errors import DataError
from vggflow.images import ImageDecodeError, batch_has_room, load_rgb
from vggflow.model import make_resizing

#: Files decoded per Python call (see :func:`image_dataset`): enough to make the call's fixed
#: cost negligible, few enough that a group of large photos stays a few hundred MB.
DECODE_GROUP = 8

#: Groups of files decoded at once: one per core this process may use (decoding is a few
#: percent of the work). The affinity mask, not ``os.cpu_count()``: a container limited to 2 of
#: a host's 64 cores would otherwise start 64 decoders.
PARALLEL_DECODES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

#: Batches prepared ahead of the model (decoding and resizing overlap its compute).
PREFETCH_BATCHES = 2


def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` with ``tf.data``'s autotuning off, so that dropping its iterator is immediate.

    With autotuning on, every iterator runs an optimisation loop that sleeps for 10 ms, 20 ms,
    40 ms, … (doubling up to a minute) between rounds, and destroying the iterator waited,
    intermittently, for the loop's next wake-up: up to the iterator's own age again, with the
    CPU idle. Keras drops each epoch's iterators, so every epoch of a stage streaming images
    would begin with a stall (BENCHMARKS.md, the tf.data autotuning section). These pipelines need no tuning: their
    parallelism and prefetch depths are fixed (:data:`PARALLEL_DECODES`, :data:`PREFETCH_BATCHES`).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def image_dataset(
    paths: Sequence[str | Path],
    labels: Sequence[int] | np.ndarray | None,
    image_size: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    same_shape: tuple[int, int] | None = None,
) -> tf.data.Dataset:
    """A batched dataset of ``(image_size, image_size, 3)`` float32 RGB images (0..255) [and labels].

    Decoding uses :func:`vggflow.images.load_rgb` (every mode → RGB, by content), a group of
    :data:`DECODE_GROUP` files per call, groups in parallel; resizing uses the same Keras
    ``Resizing`` layer that the classifier carries, so an image looks the same to training and
    to the registered model.

    Args:
        paths: image files.
        labels: one class index per file, or None for images only.
        image_size: square output side.
        batch_size: images per batch (the last batch may be smaller).
        shuffle: reshuffle the files every epoch.
        seed: makes the orders reproducible.
        same_shape: every file's ``(height, width)`` when validation found them all alike
            (:func:`common_image_shape`). A decode group of such small images is then resized in
            one op; otherwise every image is resized on its own. ``Resizing`` treats each image
            of a batch independently, so the pixels are the same either way.
    """
    resize = make_resizing(image_size)
    path_strings = [str(p) for p in paths]
    # Chosen here, once, not per group in the graph: a `tf.cond` between a whole-group resize
    # and a per-image `map_fn` would make every group pay for the loop (BENCHMARKS.md, benchmark 2).
    # Whole groups only while small: eight 12-megapixel photos resized at once need a float32
    # copy of themselves of over a gigabyte, and two groups are in flight.
    grouped = same_shape is not None and batch_has_room(
        DECODE_GROUP - 1, same_shape, DECODE_GROUP
    )  # a whole group fits
    decode_files = partial(_decode_files, same_shape=same_shape)

    def decode(group_paths: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # One Python call per group of files, not per file: a per-file `numpy_function` costs
        # more interpreter hand-over per image than Pillow's decode of a small PNG.
        # Small groups, not whole batches: a call holds its files' full-size pixels until resized.
        flat, shapes = tf.numpy_function(decode_files, [group_paths], (tf.uint8, tf.int32), stateful=False)
        flat.set_shape([None])
        shapes.set_shape([None, 3])
        return flat, shapes

    def resize_group(group_paths: tf.Tensor) -> tf.Tensor:
        flat, shapes = decode(group_paths)
        return resize(tf.cast(tf.reshape(flat, [tf.shape(shapes)[0], *same_shape, 3]), tf.float32))

    def split_group(group_paths: tf.Tensor) -> tuple[tf.RaggedTensor, tf.Tensor]:
        # Each image alone: a float32 copy of one photo at a time, never of a group of them.
        flat, shapes = decode(group_paths)
        return tf.RaggedTensor.from_row_lengths(flat, tf.reduce_prod(shapes, axis=1), validate=False), shapes

    def resize_one(flat: tf.Tensor, shape: tf.Tensor) -> tf.Tensor:
        image = resize(tf.cast(tf.reshape(flat, shape), tf.float32)[tf.newaxis])[0]
        return tf.ensure_shape(image, [image_size, image_size, 3])

    items = tf.data.Dataset.from_tensor_slices(path_strings)
    if labels is not None:
        items = tf.data.Dataset.zip(items, tf.data.Dataset.from_tensor_slices(np.asarray(labels, dtype=np.int32)))
    if shuffle:
        items = items.shuffle(len(path_strings), seed=seed, reshuffle_each_iteration=True)
    items = items.batch(DECODE_GROUP)
    parallel = {"num_parallel_calls": PARALLEL_DECODES, "deterministic": True}
    per_group = resize_group if grouped else split_group
    data = items.map(per_group if labels is None else lambda p, y: (per_group(p), y), **parallel).unbatch()
    if not grouped:
        data = data.map(resize_one if labels is None else lambda image, y: (resize_one(*image), y), **parallel)
    # Regrouping hides the number of batches from tf.data; state it, so Keras knows where an
    # epoch ends instead of warning "Your input ran out of data" at the end of each one.
    batches = -(-len(path_strings) // batch_size)
    data = data.batch(batch_size).apply(tf.data.experimental.assert_cardinality(batches))
    return without_autotune(data.prefetch(PREFETCH_BATCHES))


@contextmanager
def file_errors_as_data_errors() -> Iterator[None]:
    """Re-raise a file's error from inside a pipeline (a :class:`DataError` raised while
    decoding, which ``tf.data`` wraps in an ``OpError`` with a traceback) as that one-line error."""
    try:
        yield
    except tf.errors.OpError as err:
        found = re.search(r"DataError: ([^\n]*)", err.message)
        if found is None:
            raise
        raise DataError(found.group(1)) from None


def common_image_shape(rows) -> tuple[int, int] | None:
    """The ``(height, width)`` every row's image has, from validation's measurements, else None.

    None as well for rows without those columns (a rows file written by an older version).
    """
    if len(rows) == 0 or not {"height", "width"} <= set(rows.columns):
        return None
    shapes = rows[["height", "width"]].astype(int).drop_duplicates()
    return (int(shapes.iloc[0, 0]), int(shapes.iloc[0, 1])) if len(shapes) == 1 else None


def _decode_files(group_paths: np.ndarray, same_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode a group of files: all pixels concatenated (no padding) + each image's shape.

    With ``same_shape``, a file of another size stops the pipeline with a message naming it:
    the pipeline was built for validation's measurements, and the file changed since.
    """
    pixels, shapes = bytearray(), []
    for path in map(bytes.decode, group_paths):
        try:
            image = load_rgb(path)
        except (ImageDecodeError, OSError) as err:
            # Validation decoded it: it changed (or went away) since.
            raise DataError(
                f"{path}: {err}; it changed during this run (validation decoded it): run it again"
            ) from None
        if same_shape is not None and image.shape[:2] != tuple(same_shape):
            raise DataError(
                f"{path}: {image.shape[1]}x{image.shape[0]} pixels, but validation measured "
                f"{same_shape[1]}x{same_shape[0]}: the file changed during this run; run it again"
            )
        pixels += memoryview(np.ascontiguousarray(image)).cast("B")  # one image's copy at a time
        shapes.append(image.shape)
    return np.frombuffer(pixels, dtype=np.uint8), np.array(shapes, dtype=np.int32).reshape(-1, 3)


def array_dataset(x, y: np.ndarray, batch_size: int, shuffle: bool, seed: int) -> tf.data.Dataset:
    """Batches of rows of a cached array (read when needed) and their labels, reshuffled every epoch.

    The row order comes from ``tf.data``'s seeded shuffle of row indices (each new iterator is
    the next epoch), so it depends only on ``seed``, TensorFlow's global seed and the epoch.
    Keras's own ``PyDataset`` handling shuffled the batch order with Python's global ``random``
    (which Prefect and MLflow threads draw from too) and reshuffles rows in ``on_epoch_end``
    while the next epoch is already being prefetched: the same stage would train differently from
    run to run. Rows are read by a plain ``map`` over batches of indices, not a Python
    generator, which keeps both cores busy without stalls at the start of epochs (BENCHMARKS.md,
    benchmark 6).

    Args:
        x: rows to batch (an array, or a row view that reads from a cache file when sliced).
        y: one label per row.
        batch_size: rows per batch (the last batch may be smaller).
        shuffle: reshuffle the rows every epoch.
        seed: makes the orders reproducible.
    """
    labels = np.asarray(y, dtype=np.int32)

    def read(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Sorted rows read the cache file sequentially; order within a batch does not matter.
        rows = np.sort(rows)
        return np.asarray(x[rows], dtype=np.float32), labels[rows]

    def read_batch(rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        values, batch_labels = tf.numpy_function(read, [rows], (tf.float32, tf.int32), stateful=False)
        values.set_shape((None, *x.shape[1:]))
        batch_labels.set_shape((None,))
        return values, batch_labels

    rows = tf.data.Dataset.range(len(labels))
    if shuffle:
        rows = rows.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return without_autotune(rows.batch(batch_size).map(read_batch))


def predict_in_batches(
    predict: Callable[[np.ndarray], np.ndarray],
    paths: Sequence[str | Path],
    batch_size: int,
    max_pixels: int = 50_000_000,
) -> np.ndarray:
    """Class probabilities for image files, fed as raw uint8 RGB batches to ``predict``.

    Images are grouped by size (a batch must share a shape) and handed over undecorated, as a
    client of the registered model would: resizing and preprocessing are the model's job. A batch
    holds at most ``batch_size`` images and :data:`vggflow.images.BATCH_MAX_PIXELS` pixels
    (:func:`vggflow.images.batch_has_room`; the model resizes in float32: 32 photos of 12
    megapixels made evaluation grow by 15 GB).
    """
    images: dict[int, np.ndarray] = {}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    out: list[np.ndarray | None] = [None] * len(paths)
    for index, path in enumerate(paths):
        image = images[index] = load_rgb(path, max_pixels)
        group = by_shape.setdefault(image.shape, [])
        group.append(index)
        if not batch_has_room(len(group), image.shape, batch_size):
            _flush(predict, by_shape.pop(image.shape), images, out)
        elif len(images) >= 4 * batch_size or sum(map(_pixels, images.values())) > 4 * vggflow.images.BATCH_MAX_PIXELS:
            # Many different sizes: flush everything rather than hold the whole set in memory.
            for indices in by_shape.values():
                _flush(predict, indices, images, out)
            by_shape.clear()
    for indices in by_shape.values():
        _flush(predict, indices, images, out)
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)


def _pixels(image: np.ndarray) -> int:
    return image.shape[0] * image.shape[1]


def _flush(predict, indices: list[int], images: dict, out: list) -> None:
    batch = np.stack([images.pop(i) for i in indices])
    for i, row in zip(indices, np.asarray(predict(batch))):
        out[i] = row
