"""The on-disk cache of the frozen base's outputs: its layout, its checks, and reading it back.

Layout: ``<cache_dir>/features/<key>/<layer>.npy`` for the train and val rows (in the order of
``rows.csv``), plus ``meta.json`` (shapes, sha256 of every array, a digest of the row order);
``<key>/test/`` holds the test images' output of the chosen model's frozen part. ``meta.json`` is
written last, atomically: an entry without it, or whose checksums do not match, is rebuilt,
never used. The key covers the dataset fingerprint, the backbone weights, the image size, the
compute precision and the code that computes the outputs (:data:`FEATURE_CODE`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from vggflow.caching import code_version
from vggflow.files import atomic_write_text, read_rows
from vggflow.hashing import file_sha256, stable_hash
from vggflow.stages import prefix_bytes, stage_of_prefix

META_FILE = "meta.json"

#: The splits whose base outputs training reads (see the module docstring for the test split).
CACHED_SPLITS = ("train", "val")

#: Sub-folder of a feature cache folder holding the test images' frozen-prefix outputs.
TEST_DIR = "test"

#: The code that computes the cached outputs (the extraction loop and the graph it runs), with
#: every vggflow module they use: part of the cache folder's key.
FEATURE_CODE = ("vggflow.extraction", "vggflow.feature_cache", "vggflow.model", "vggflow.precision")


class FeatureSet(BaseModel):
    """Reference to cached base outputs, aligned with ``rows_file`` (the train and val rows)."""

    directory: Path
    key: str
    layers: list[str]
    rows_file: Path
    class_names: list[str]
    n_images: int
    prefix_plan: dict[str, str | None] = {}
    seconds: float = 0.0

    @property
    def pooled_key(self) -> str:
        """Identifies the pooled features alone (data, backbone, size), whatever prefix layers sit beside them."""
        return self.directory.name

    def with_absolute_paths(self) -> FeatureSet:
        """The same reference with absolute paths (for a process with another working directory)."""
        return self.model_copy(update={"directory": self.directory.resolve(), "rows_file": self.rows_file.resolve()})


def feature_cache_key(
    fingerprint: str, weights_identity: str, image_size: int, layers: list[str], precision: str = "float32"
) -> str:
    """Identifies a cache entry's content: dataset, backbone weights, input size, precision, layers and code."""
    return stable_hash(
        fingerprint, weights_identity, image_size, precision, sorted(layers), code_version(*FEATURE_CODE)
    )


def layer_cache_dir(
    cache_dir: Path, fingerprint: str, weights_identity: str, image_size: int, precision: str = "float32"
) -> Path:
    """One folder per dataset/backbone/size/precision/code; each layer is a file in it, computed when first needed."""
    key = stable_hash(fingerprint, weights_identity, image_size, precision, code_version(*FEATURE_CODE))
    return Path(cache_dir) / "features" / key


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


class LayerWriter:
    """Writes one layer's float32 ``.npy`` array of a known shape, batch by batch, hashing as it goes.

    Plain sequential writes (header, then each batch), not a writable memory map: a mapped
    array's pages count in the process's resident memory, which then grows with the dataset.
    The file is hashed as it is written rather than read back afterwards. It goes to a temporary
    name; :func:`record_layers` renames it into place. No fsync: the checksum in ``meta.json``
    is verified before every reuse, so an array a crash left incomplete is rebuilt, never used.
    """

    def __init__(self, directory: Path, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape = name, tuple(int(n) for n in shape)
        self.final = directory / f"{name}.npy"
        self.temporary = directory / f".{name}.{os.getpid()}.tmp.npy"
        self.handle = open(self.temporary, "wb")
        self.digest = hashlib.sha256()
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False,
            "shape": self.shape,
        }
        np.lib.format.write_array_header_1_0(self, header)

    def write(self, data) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def close(self) -> None:
        self.handle.close()


def record_layers(directory: Path, rows: pd.DataFrame, writers) -> None:
    """Move finished :class:`LayerWriter` files into place and record them in ``meta.json`` (written last)."""
    meta = read_meta(directory)
    if meta.get("paths_sha256") != _paths_digest(rows):
        meta = {}  # arrays aligned to another row order: none of them stays valid
    meta.setdefault("layers", {})
    for writer in writers:
        os.replace(writer.temporary, writer.final)
        meta["layers"][writer.name] = {
            "file": writer.final.name,
            "shape": list(writer.shape),
            "bytes": writer.final.stat().st_size,
            "sha256": writer.digest.hexdigest(),
        }
    meta["paths_sha256"] = _paths_digest(rows)
    meta["n_images"] = len(rows)
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=1))


class ShardPart(BaseModel):
    """One shard's array of one layer, somewhere its assembler can read it (a path or an fsspec URL).

    Attributes:
        url: where the ``.npy`` file is.
        sha256: of the whole file, as its writer computed it.
        rows: how many rows it holds.
    """

    url: str
    sha256: str
    rows: int


def assemble_layers(directory: Path, rows: pd.DataFrame, parts: dict[str, list[ShardPart]], open_part) -> None:
    """Concatenate shards' arrays into the cache's layer files, as if one pass had written them.

    Each shard's file is checksummed while it streams through (never loaded whole); a shard
    that does not match its checksum or row count stops the assembly before anything is recorded.

    Args:
        directory: the cache folder (:func:`layer_cache_dir`, or its ``test/`` folder).
        rows: the rows the arrays are aligned with, in order (the shards cover them in order).
        parts: layer name → its shards' parts, in row order.
        open_part: ``open_part(url)`` → a binary file object (``fsspec.open(url, "rb").open`` …).

    Raises:
        ValueError: a shard is corrupt, or the shards do not cover the rows.
    """
    directory.mkdir(parents=True, exist_ok=True)
    writers = []
    try:
        for name, layer_parts in parts.items():
            if sum(part.rows for part in layer_parts) != len(rows):
                raise ValueError(f"the shards of {name} hold {sum(p.rows for p in layer_parts)} rows, not {len(rows)}")
            writer = None
            for part in layer_parts:
                with open_part(part.url) as handle:
                    reader = _HashingReader(handle)
                    version = np.lib.format.read_magic(reader)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, _ = read_header(reader)
                    if writer is None:
                        writer = LayerWriter(directory, name, (len(rows), *shape[1:]))
                        writers.append(writer)
                    while chunk := reader.read(1 << 23):
                        writer.write(chunk)
                if reader.digest.hexdigest() != part.sha256 or shape[0] != part.rows:
                    raise ValueError(f"shard {part.url} of {name} does not match its checksum or row count")
    except BaseException:
        for writer in writers:
            writer.close()
            writer.temporary.unlink(missing_ok=True)
        raise
    for writer in writers:
        writer.close()
    record_layers(directory, rows, writers)


class _HashingReader:
    """A binary file's reader that keeps the sha256 of everything read."""

    def __init__(self, handle) -> None:
        self.handle, self.digest = handle, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data


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
    prefix cache would grow the process's RSS by the cache's size (BENCHMARKS.md, memory).
    Page-cache reuse between epochs is the same.
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


def bytes_per_image(layers: list[str], image_size: int) -> int:
    """Disk one image takes in a cache holding ``layers`` (pooled features always included)."""
    return 2048 + sum(prefix_bytes(stage_of_prefix(name), image_size, 1) for name in layers if stage_of_prefix(name))
