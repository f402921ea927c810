"""Running the frozen base over image files: its outputs, batch by batch, into the feature cache.

The compute side of :mod:`vggflow.feature_cache` (which owns the files' layout and checks). Part of
the cache key (:data:`vggflow.feature_cache.FEATURE_CODE`): a change here rebuilds the caches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from vggflow.feature_cache import LayerWriter, record_layers


class CompiledExtractor(NamedTuple):
    """The base's model for some layers and its compiled forward pass (see :func:`compiled_extractor`)."""

    model: Any  # keras.Model: annotated loosely so this module imports without TensorFlow
    forward: Any  # tf.function: float32 images → {layer name: output}
    layers: tuple[str, ...]
    image_size: int


def compiled_extractor(base, layers: list[str], image_size: int) -> CompiledExtractor:
    """The base's model for ``layers`` and its compiled forward pass.

    A compiled loop because on these CPUs ``model.predict`` intermittently used one core; traced
    once for any batch size, so the last, smaller batch does not trace it again.
    """
    import tensorflow as tf

    from vggflow.model import feature_extractor

    names = tuple(sorted(set(layers)))
    extractor = feature_extractor(base, list(names), image_size)
    forward = tf.function(
        lambda x: extractor(x, training=False),
        input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32)],
    )
    return CompiledExtractor(extractor, forward, names, image_size)


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

    Args:
        rows: usable manifest rows (``path`` relative to ``data_dir``, ``label``), in cache order.
        data_dir: dataset root.
        base: the VGG19 conv base (frozen).
        layers: the layers to compute (``avg_pool`` for pooled features, or prefix layer names).
        image_size: square input side.
        batch_size: images per forward pass.
        directory: the cache folder (see :func:`vggflow.feature_cache.layer_cache_dir`).
        progress: optional ``callable(done, total)`` for progress reporting.

    Returns:
        Layer name → ``.npy`` path.
    """
    if not layers:
        directory.mkdir(parents=True, exist_ok=True)
        return {}
    return write_features(rows, data_dir, compiled_extractor(base, layers, image_size), batch_size, directory, progress)


def write_features(
    rows: pd.DataFrame,
    data_dir: Path,
    compiled: CompiledExtractor,
    batch_size: int,
    directory: Path,
    progress=None,
) -> dict[str, Path]:
    """Run ``compiled`` over ``rows``' images into ``directory``: :func:`extract_features` with a ready extractor.

    For a caller that extracts the same layers again and again (a Dask worker's shards). Images
    stream from disk (``tf.data``); outputs are appended batch by batch to ``.npy`` files, so
    memory does not grow with the dataset.
    """
    from vggflow.datasets import common_image_shape, file_errors_as_data_errors, image_dataset

    directory.mkdir(parents=True, exist_ok=True)
    total = len(rows)
    writers = {
        name: LayerWriter(directory, name, (total, *compiled.model.output[name].shape[1:])) for name in compiled.layers
    }
    paths = [Path(data_dir) / p for p in rows["path"]]
    done = 0
    try:
        with file_errors_as_data_errors():
            batches = image_dataset(paths, None, compiled.image_size, batch_size, same_shape=common_image_shape(rows))
            for batch in batches:
                outputs = compiled.forward(batch)
                for name in compiled.layers:
                    writers[name].write(np.ascontiguousarray(outputs[name].numpy(), dtype=np.float32).data)
                done += int(batch.shape[0])
                if progress:
                    progress(done, total)
    finally:
        for writer in writers.values():
            writer.close()
    if done != total:
        raise RuntimeError(f"feature extraction produced {done} rows for {total} images")
    record_layers(directory, rows, writers.values())
    return {name: directory / f"{name}.npy" for name in compiled.layers}
