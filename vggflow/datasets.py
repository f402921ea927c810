"""Feeding images and cached arrays to Keras.

Images stream from disk through ``tf.data`` (parallel decode of small groups of files with the
shared Pillow decoder, the model's own resize, batching, prefetch) and are never all held in
memory. Cached arrays (features, frozen-prefix outputs) are read from memory-mapped ``.npy``
files batch by batch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

import keras
import numpy as np
import tensorflow as tf

from vggflow.images import load_rgb
from vggflow.model import make_resizing

#: Files decoded per Python call (see :func:`image_dataset`): enough to make the call's fixed
#: cost negligible, few enough that a group of large photos stays a few hundred MB.
DECODE_GROUP = 8


def image_dataset(
    paths: Sequence[str | Path],
    labels: Sequence[int] | np.ndarray | None,
    image_size: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """A batched dataset of ``(image_size, image_size, 3)`` float32 RGB images (0..255) [and labels].

    Decoding uses :func:`vggflow.images.load_rgb` (every mode → RGB, by content), a group of
    :data:`DECODE_GROUP` files per call, groups in parallel; resizing uses the same Keras
    ``Resizing`` layer that the classifier carries, so an image looks the same to training and
    to the registered model.
    """
    resize = make_resizing(image_size)
    path_strings = [str(p) for p in paths]

    def decode_group(group_paths: tf.Tensor) -> tf.Tensor:
        # One Python call per group of files, not per file: a per-file `numpy_function` cost
        # ~0.3 ms of interpreter hand-over per image, more than Pillow's decode of a small PNG
        # (at 64², ~5 % of the CPU time per image went to the input pipeline; BENCHMARKS.md).
        # Small groups, not whole batches: a call holds its files' full-size pixels until resized.
        flat, shapes = tf.numpy_function(_decode_files, [group_paths], (tf.uint8, tf.int32), stateful=False)
        flat.set_shape([None])
        shapes.set_shape([None, 3])
        return _resize_group(flat, shapes, resize, image_size)

    items = tf.data.Dataset.from_tensor_slices(path_strings)
    if labels is not None:
        items = tf.data.Dataset.zip(items, tf.data.Dataset.from_tensor_slices(np.asarray(labels, dtype=np.int32)))
    if shuffle:
        items = items.shuffle(len(path_strings), seed=seed, reshuffle_each_iteration=True)
    items = items.batch(DECODE_GROUP)
    if labels is None:
        data = items.map(decode_group, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        data = items.map(lambda p, y: (decode_group(p), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Regrouping hides the number of batches from tf.data; state it, so Keras knows where an
    # epoch ends instead of warning "Your input ran out of data" at the end of each one.
    batches = -(-len(path_strings) // batch_size)
    data = data.unbatch().batch(batch_size).apply(tf.data.experimental.assert_cardinality(batches))
    return data.prefetch(tf.data.AUTOTUNE)


def _decode_files(group_paths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode a group of files: all pixels concatenated (no padding) + each image's shape."""
    pixels, shapes = bytearray(), []
    for path in group_paths:
        image = load_rgb(path.decode())
        pixels += memoryview(np.ascontiguousarray(image)).cast("B")  # one image's copy at a time
        shapes.append(image.shape)
    return np.frombuffer(pixels, dtype=np.uint8), np.array(shapes, dtype=np.int32).reshape(-1, 3)


def _resize_group(flat: tf.Tensor, shapes: tf.Tensor, resize, image_size: int) -> tf.Tensor:
    """Resize a decoded group: one op when all images share a size, else image by image.

    ``Resizing`` treats every image of a batch independently, so both paths give the same pixels.
    """
    n = tf.shape(shapes)[0]

    def same_size() -> tf.Tensor:
        return resize(tf.cast(tf.reshape(flat, tf.concat([[n], shapes[0]], 0)), tf.float32))

    def one_by_one() -> tf.Tensor:
        sizes = tf.reduce_prod(shapes, axis=1)
        offsets = tf.cumsum(sizes, exclusive=True)

        def resize_one(i: tf.Tensor) -> tf.Tensor:
            image = tf.reshape(flat[offsets[i] : offsets[i] + sizes[i]], shapes[i])
            return resize(tf.cast(image, tf.float32)[tf.newaxis])[0]

        return tf.map_fn(resize_one, tf.range(n), fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))

    uniform = tf.reduce_all(tf.equal(shapes, shapes[0]))
    return tf.cond(uniform, same_size, one_by_one)


def stream(dataset: tf.data.Dataset) -> Iterator:
    """Iterate ``dataset`` once; its exhausted iterator is then destroyed off the caller's thread.

    Destroying a ``tf.data`` iterator after a pass that ran alongside model compute intermittently
    blocked the destroying thread for 1.5-3 s while using no CPU (measured at 64² and 224²: a
    third of extracting 1,024 images at 64²; benchmarks/results/extraction.md). The wait releases
    the GIL, so a daemon thread absorbs it while the run goes on.
    """
    iterator = iter(dataset)
    try:
        yield from iterator
    finally:
        holder = [iterator]
        del iterator
        threading.Thread(target=holder.clear, name="tf-data-release", daemon=True).start()


class ArrayBatches(keras.utils.PyDataset):
    """Batches of rows of a (memory-mapped) array and their labels, reshuffled every epoch."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int) -> None:
        super().__init__()
        self.x, self.y = x, np.asarray(y, dtype=np.int32)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.order = np.arange(len(self.y))
        if shuffle:
            self.rng.shuffle(self.order)

    def __len__(self) -> int:
        return max(1, -(-len(self.y) // self.batch_size))

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        # Sorted indices read a memory map sequentially; order within a batch does not matter.
        rows = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        return np.asarray(self.x[rows], dtype=np.float32), self.y[rows]

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.rng.shuffle(self.order)


def predict_in_batches(
    predict: Callable[[np.ndarray], np.ndarray],
    paths: Sequence[str | Path],
    batch_size: int,
    max_pixels: int = 50_000_000,
) -> np.ndarray:
    """Class probabilities for image files, fed as raw uint8 RGB batches to ``predict``.

    Images are grouped by size (a batch must share a shape) and handed over undecorated, as a
    client of the registered model would: resizing and preprocessing are the model's job.
    """
    images = {}
    by_shape: dict[tuple[int, ...], list[int]] = {}
    out: list[np.ndarray | None] = [None] * len(paths)
    for index, path in enumerate(paths):
        images[index] = load_rgb(path, max_pixels)
        by_shape.setdefault(images[index].shape, []).append(index)
        if len(by_shape[images[index].shape]) == batch_size:
            _flush(predict, by_shape.pop(images[index].shape), images, out)
        elif len(images) >= 4 * batch_size:
            # Many different sizes: flush everything rather than hold the whole set in memory.
            for indices in by_shape.values():
                _flush(predict, indices, images, out)
            by_shape.clear()
    for indices in by_shape.values():
        _flush(predict, indices, images, out)
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)


def _flush(predict, indices: list[int], images: dict, out: list) -> None:
    batch = np.stack([images.pop(i) for i in indices])
    for i, row in zip(indices, np.asarray(predict(batch))):
        out[i] = row
