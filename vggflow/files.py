"""Small file helpers: atomic writes and checksums.

Every cache, report and checkpoint is written to a temporary file in the same folder and then
renamed over the target, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: Columns of a validated rows file: each usable image, its class, its split and its decoded
#: size (after EXIF orientation). Files written by older versions have only the first three.
ROWS_COLUMNS = ("path", "label", "split", "height", "width")


def read_rows(path: str | Path):
    """The validated rows (:data:`ROWS_COLUMNS`) as strings.

    Labels are folder names: ``007`` or ``1`` must stay text, not become numbers.
    """
    import pandas as pd

    return pd.read_csv(path, dtype=str, keep_default_na=False)
