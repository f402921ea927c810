"""Decoding image files to RGB, the one way used by validation, training, evaluation and `predict`.

Files are decoded by content (Pillow sniffs the format), never by extension. Every mode is
converted to 8-bit RGB by :func:`to_rgb`, so that a CMYK JPEG, a 16-bit PNG or a palette GIF
looks the same to training and to the registered model's clients.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

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
    # Pillow's own bomb check only warns below 2x its limit; we refuse above ours ourselves, from
    # the header, so the pixels are never allocated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as err:
            raise ImageDecodeError("too_large", f"refused unread: {err}") from None
        except (Image.UnidentifiedImageError, ValueError):
            raise ImageDecodeError("not_an_image", "not a recognised image format") from None
        except OSError as err:
            raise ImageDecodeError("corrupt", f"cannot read header: {err}") from None
        with image:
            if image.format not in SUPPORTED_FORMATS:
                raise ImageDecodeError("unsupported_format", f"{image.format} images are not supported")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "too_large", f"{width}x{height} = {width * height:,} pixels exceeds max_pixels={max_pixels:,}"
                )
            try:
                image.load()
                decoded = ImageOps.exif_transpose(image)
            except Image.DecompressionBombError as err:
                raise ImageDecodeError("too_large", f"refused: {err}") from None
            except (OSError, ValueError, SyntaxError, EOFError) as err:
                raise ImageDecodeError("corrupt", f"truncated or corrupt image data: {err}") from None
            decoded.format = image.format
            return decoded


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
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_rgb(path: str | Path, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array (see :func:`open_image`)."""
    return to_rgb(open_image(path, max_pixels))
