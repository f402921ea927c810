#!/usr/bin/env python3
"""Build the embedded vggflow demo dataset (a small Fashion-MNIST subset).

Source
    Fashion-MNIST, as shipped by Debian's ``dataset-fashion-mnist`` apt
    package (``/usr/share/datasets/fashion-mnist/*-idx?-ubyte.gz``).
    Install it with::

        sudo apt-get install dataset-fashion-mnist

Licence
    Fashion-MNIST is MIT (Expat) licensed, (c) 2017 Zalando SE
    (https://github.com/zalandoresearch/fashion-mnist). See DATA.md.

What it writes
    ``data/<class_name>/<class_name>_<index:05d>.png`` -- 10 classes x 120
    images = 1,200 PNGs, grayscale ("L"), 28x28 as in the source (no
    upscaling). ``index`` is the image's position in the source TRAIN set
    (0..59999), so every file can be traced back to the original.

    Selection is deterministic and class-balanced: the 60,000 train indices
    are shuffled with ``numpy.random.default_rng(0).permutation`` and the
    first 120 indices of each class in that order are kept. PNGs are written
    with Pillow (``optimize=False``, fixed ``compress_level``, no metadata),
    so re-running the script reproduces byte-identical files (same md5s,
    hence an unchanged ``data.dvc``).

    The 10 class folders are deleted and recreated on each run; nothing else
    is written. ``data/`` must contain only the class folders.

How to re-run
    From the repository root::

        python scripts/build_demo_data.py          # rebuild data/
        dvc status                                 # expect "up to date"
        # only if the data intentionally changed:
        dvc add data && dvc push && git add data.dvc dvc-remote

    Normal users do not need this script: ``dvc pull`` restores ``data/``
    offline from the ``dvc-remote/`` folder committed to git.

No network access is used; only numpy and Pillow are required.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "data"

# Fashion-MNIST label id -> filesystem-friendly class name.
CLASS_NAMES = (
    "t_shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
PER_CLASS = 120
SEED = 0
PNG_COMPRESS_LEVEL = 6  # pinned explicitly so output does not depend on Pillow defaults


def _open_idx(source: Path, stem: str) -> bytes:
    """Read ``stem`` (e.g. ``train-images-idx3-ubyte``), gzipped or not."""
    for candidate, opener in ((source / f"{stem}.gz", gzip.open), (source / stem, open)):
        if candidate.is_file():
            with opener(candidate, "rb") as fh:
                return fh.read()
    raise FileNotFoundError(stem)


def read_idx(source: Path, stem: str) -> np.ndarray:
    """Parse an IDX file (big-endian header, unsigned-byte payload)."""
    raw = _open_idx(source, stem)
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise ValueError(f"{stem}: not an unsigned-byte IDX file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{stem}: expected {shape}, got {data.size} bytes")
    return data.reshape(shape)


def select_indices(labels: np.ndarray) -> dict[int, np.ndarray]:
    """First PER_CLASS indices of each class after a seeded shuffle."""
    order = np.random.default_rng(SEED).permutation(len(labels))
    picked = {}
    for cls in range(len(CLASS_NAMES)):
        idx = order[labels[order] == cls][:PER_CLASS]
        if len(idx) < PER_CLASS:
            raise ValueError(f"class {cls}: only {len(idx)} images available")
        picked[cls] = np.sort(idx)
    return picked


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help=f"folder with the Fashion-MNIST IDX files (default: {DEFAULT_SOURCE})",
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)

    try:
        images = read_idx(args.source, "train-images-idx3-ubyte")
        labels = read_idx(args.source, "train-labels-idx1-ubyte")
    except FileNotFoundError as exc:
        print(
            f"error: Fashion-MNIST train file '{exc}' not found in {args.source}.\n"
            "Install Debian's package first:  sudo apt-get install dataset-fashion-mnist\n"
            "(or pass --source DIR pointing at the IDX files).",
            file=sys.stderr,
        )
        return 1
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        print(f"error: unexpected shapes {images.shape} / {labels.shape}", file=sys.stderr)
        return 1

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    strays = sorted(p.name for p in out.iterdir() if p.name not in CLASS_NAMES)
    if strays:
        print(f"warning: {out} contains unexpected entries: {strays}", file=sys.stderr)

    total = 0
    for cls, indices in select_indices(labels).items():
        name = CLASS_NAMES[cls]
        class_dir = out / name
        if class_dir.exists():
            shutil.rmtree(class_dir)
        class_dir.mkdir()
        for i in indices:
            img = Image.fromarray(images[i])  # uint8 2-D array -> mode "L"
            assert img.mode == "L" and img.size == (28, 28)
            img.save(
                class_dir / f"{name}_{int(i):05d}.png", format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL
            )
            total += 1
        print(f"{name:12s} {len(indices)}")
    print(f"wrote {total} PNGs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
