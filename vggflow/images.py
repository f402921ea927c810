"""Decoding image files to RGB, the one way used by validation, training, evaluation and `predict`.

Files are decoded by content (Pillow sniffs the format), never by extension. Every mode is
converted to 8-bit RGB by :func:`to_rgb`, so that a CMYK JPEG, a 16-bit PNG or a palette GIF
looks the same to training and to the registered model's clients.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

#: Most pixels (all images together) batched into one resize. Resizing works in float32, so eight
#: 12-megapixel photos need a 1.15 GB copy of themselves: decode groups (``vggflow.datasets``)
#: and the batches handed to a classifier (which resizes inside) stay under this, down to one
#: image per batch (224x224 images: 79 per batch before this limit applies).
BATCH_MAX_PIXELS = 4_000_000


def batch_has_room(count: int, image_shape: Sequence[int], batch_size: int) -> bool:
    """Whether a batch of ``count`` images of ``image_shape`` can take one more of that shape.

    The one rule for batches handed to a classifier (evaluation, champion re-scoring,
    `vggflow predict`): at most ``batch_size`` images and :data:`BATCH_MAX_PIXELS` pixels. An
    image over half the limit always travels alone.
    """
    return count < batch_size and (count + 1) * image_shape[0] * image_shape[1] <= BATCH_MAX_PIXELS


#: Formats accepted as training images (Pillow format names).
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "MPO"})


class ImageDecodeError(Exception):
    """A file is not a usable image; ``kind`` is a short machine-readable id."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def open_image(path: str | Path, max_pixels: int) -> Image.Image:
    """Open and fully decode an image, refusing decompression bombs before allocating them.

    Args:
        path: image file.
        max_pixels: largest accepted width × height; checked from the header, before decoding.

    Returns:
        The decoded image (first frame for animations), EXIF orientation applied.

    Raises:
        ImageDecodeError: with kind ``empty``, ``not_an_image``, ``unsupported_format``,
            ``too_large`` or ``corrupt``.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ImageDecodeError("empty", "zero-byte file")
    try:
        # Pillow reads from our handle, closed when the decoding below is done (a multi-frame
        # image keeps its file open after load()); the decoded first frame is returned as is.
        handle = open(path, "rb")
    except OSError as err:
        raise ImageDecodeError("corrupt", f"cannot read header: {err}") from None
    with warnings.catch_warnings(), handle:
        # Pillow's own bomb check only warns below 2x its limit; we refuse above ours ourselves,
        # from the header, so the pixels are never allocated.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(handle)
        except Image.DecompressionBombError as err:
            raise ImageDecodeError("too_large", f"refused unread: {err}") from None
        except (Image.UnidentifiedImageError, ValueError):
            raise ImageDecodeError("not_an_image", "not a recognised image format") from None
        except OSError as err:
            raise ImageDecodeError("corrupt", f"cannot read header: {err}") from None
        if image.format not in SUPPORTED_FORMATS:
            raise ImageDecodeError("unsupported_format", f"{image.format} images are not supported")
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                "too_large", f"{width}x{height} = {width * height:,} pixels exceeds max_pixels={max_pixels:,}"
            )
        try:
            image.load()
            # In place: without an orientation tag, exif_transpose would return a full copy.
            ImageOps.exif_transpose(image, in_place=True)
        except Image.DecompressionBombError as err:
            raise ImageDecodeError("too_large", f"refused: {err}") from None
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise ImageDecodeError("corrupt", f"truncated or corrupt image data: {err}") from None
        return image


def to_rgb(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to an ``(H, W, 3)`` uint8 RGB array.

    16-bit and 32-bit integer greyscale are scaled to 8 bits (Pillow's own conversion would clip
    them), float images are clipped to 0..255, and transparency is composited on white.
    """
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float64) + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if mode == "RGB":
        return np.asarray(image)  # convert("RGB") would only copy it
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_rgb(path: str | Path, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array (see :func:`open_image`)."""
    return to_rgb(open_image(path, max_pixels))


# ------------------------------------------------------------------------------------------
# Inspecting files for data validation
#
# These run in validation's worker processes, which are spawned and import only the module of
# the function they run: living here (numpy + Pillow; imagehash on first use) keeps a worker's
# start-up at ~0.4 s, whatever the validation task module imports.

#: Side of the downscaled RGB copy that the pHash and the mean brightness are computed from.
THUMB_SIDE = 32


def blank_inspection() -> dict[str, Any]:
    """What :func:`inspect_file` reports about a file before measuring anything."""
    return {
        "sha256": "",
        "bytes": 0,
        "width": 0,
        "height": 0,
        "mode": "",
        "format": "",
        "phash": "",
        "mean": 0.0,
        "kind": "",
        "message": "",
    }


def inspect_file(path: str, max_pixels: int, min_side: int) -> dict[str, Any]:
    """Hash, decode, convert and measure one regular file; never raises.

    Args:
        path: a regular file (the caller has ruled out FIFOs, devices and escaping symlinks).
        max_pixels: see :func:`open_image`.
        min_side: smaller widths or heights are reported as ``too_small``.

    Returns:
        ``sha256`` (hex), ``bytes``, ``width``/``height`` (after EXIF orientation), ``mode`` (before
        conversion), ``format``, ``phash`` (16 hex digits), ``mean`` (RGB brightness 0..255), and
        ``kind``/``message``: "" for a usable image, else why not (an :class:`ImageDecodeError`
        kind, ``unreadable``, ``too_small`` or ``unsupported_format``).
    """
    record = blank_inspection()
    try:
        with open(path, "rb") as handle:
            record["bytes"] = os.fstat(handle.fileno()).st_size
            record["sha256"] = hashlib.file_digest(handle, "sha256").hexdigest()
        image = open_image(path, max_pixels)
    except ImageDecodeError as err:
        record.update(kind=err.kind, message=str(err))
        return record
    except OSError as err:
        record.update(kind="unreadable", message=f"cannot read: {err.strerror or err}")
        return record
    except MemoryError:
        record.update(kind="too_large", message="ran out of memory decoding it")
        return record
    except Exception as err:
        record.update(kind="corrupt", message=f"decoder failed: {type(err).__name__}: {err}")
        return record
    with image:
        width, height = image.size
        record.update(width=width, height=height, mode=image.mode, format=image.format or "")
        if min(width, height) < min_side:
            record.update(kind="too_small", message=f"{width}x{height} is below min_side={min_side}")
            return record
        try:
            # The conversion training uses, so that anything validation accepts also trains (an
            # RGB image is its own conversion: no round trip through an array for it).
            rgb = image if image.mode == "RGB" else Image.fromarray(to_rgb(image))
        except Exception as err:
            record.update(kind="unsupported_format", message=f"cannot convert mode {image.mode} to RGB: {err}")
            return record
    import imagehash  # only validation needs it

    # imagehash would Lanczos-resize the full image to 32x32 (~0.5 ms); a reducing_gap bilinear
    # resize is ~6x cheaper and measured at least as stable under small edits.
    thumb = rgb.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR, reducing_gap=2.0)
    # Hex of the 64 bits, row-major, most significant first: what str(ImageHash) gives, 10x faster.
    record["phash"] = np.packbits(imagehash.phash(thumb).hash.ravel()).tobytes().hex()
    record["mean"] = round(float(np.asarray(thumb).mean()), 2)
    return record


def inspect_files(paths: Sequence[str], max_pixels: int, min_side: int) -> list[dict[str, Any]]:
    """:func:`inspect_file` for each path, in order (the unit of work of a validation worker)."""
    return [inspect_file(path, max_pixels, min_side) for path in paths]
