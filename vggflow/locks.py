"""A lock every client of a shared PostgreSQL takes in turn: a session-level advisory lock.

Used by the promotion gate when the registry is shared by several machines
(``registry.lock_url``): a file lock only serialises processes that see the same file. The lock
is held by a database session, so a client that dies (``kill -9``, a lost machine) releases it
with its connection; nothing has to be cleaned up. The URL carries no password: libpq reads it
from ``PGPASSFILE`` (or ``~/.pgpass``).
"""

from __future__ import annotations

import hashlib
from typing import Self

from vggflow.errors import TrackingError

#: Seconds to wait for the lock before giving up (another gate holds it that long only if stuck).
DEFAULT_TIMEOUT_S = 3600.0


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``name`` (PostgreSQL's advisory lock space is one bigint)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class AdvisoryLock:
    """``with AdvisoryLock(url, name):`` holds PostgreSQL advisory lock ``name`` at ``url``.

    Args:
        url: ``postgresql://USER@HOST:PORT/DATABASE`` (password from PGPASSFILE).
        name: what is locked (hashed to the lock's key); every client must use the same.
        timeout: seconds to wait for it.

    Raises:
        TrackingError: the database cannot be reached or refuses the credentials, or the lock
            was not obtained in time; the message names the server, never a password.
    """

    def __init__(self, url: str, name: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.url, self.name, self.timeout = url, name, timeout
        self.connection = None

    @property
    def where(self) -> str:
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(self.url)
        host, port, database = info.get("host", "?"), info.get("port", 5432), info.get("dbname", "?")
        return f"PostgreSQL at {host}:{port} (registry.lock_url, database {database})"

    def _connect(self):
        import psycopg

        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.Error as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrackingError(
                f"cannot take the promotion lock: {self.where} refused or did not answer: {first}. "
                "Check `vggflow stack status`, and that PGPASSFILE names the stack's client/pgpass."
            ) from None

    def check(self) -> None:
        """Fail now (a preflight) when the lock's database cannot be reached with these credentials."""
        self._connect().close()

    def __enter__(self) -> Self:
        import psycopg

        self.connection = self._connect()
        try:
            self.connection.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(self.timeout * 1000)}ms",))
            self.connection.execute("SELECT pg_advisory_lock(%s)", (lock_key(self.name),))
        except psycopg.errors.LockNotAvailable:
            self.connection.close()
            raise TrackingError(f"gave up waiting {self.timeout:g} s for the promotion lock in {self.where}") from None
        except psycopg.Error as err:
            self.connection.close()
            raise TrackingError(f"cannot take the promotion lock in {self.where}: {err}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        connection, self.connection = self.connection, None
        if connection is None:
            return
        try:
            connection.execute("SELECT pg_advisory_unlock(%s)", (lock_key(self.name),))
        except Exception:  # the session ends below either way, and with it the lock
            pass
        finally:
            connection.close()
