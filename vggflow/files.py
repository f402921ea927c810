"""Atomic file writes and the validated rows file.

Every cache, report, checkpoint and artifact is written to a temporary sibling and then renamed
over the target, so a crash never leaves a half-written file under the final name. The
temporary file is created like any other file, so the result gets the permissions the umask
allows (0644 under the usual 022): artifacts stay readable by a tracking server running as
another user.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed over ``path`` when the block succeeds.

    For libraries that write by file name (``model.save``, ``np.save``): the temporary name keeps
    ``path``'s suffixes, which some of them check. On an error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex[:12]}.{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, private: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (synced before the rename).

    ``private``: readable and writable by its owner only (0600) from the moment it exists, for
    credentials.
    """
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
        with open(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def atomic_write_text(path: str | Path, text: str, private: bool = False) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (``private``: mode 0600)."""
    return atomic_write_bytes(path, text.encode("utf-8"), private)


#: Columns of a validated rows file: each usable image, its class, its split and its decoded
#: size (after EXIF orientation).
ROWS_COLUMNS = ("path", "label", "split", "height", "width")


def read_rows(path: str | Path):
    """The validated rows (:data:`ROWS_COLUMNS`) as strings.

    Labels are folder names: ``007`` or ``1`` must stay text, not become numbers.
    """
    import pandas as pd

    return pd.read_csv(path, dtype=str, keep_default_na=False)
