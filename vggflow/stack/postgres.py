"""The stack's PostgreSQL: ``initdb`` into the stack folder, password (SCRAM) authentication, 127.0.0.1 only.

Databases: ``mlflow`` and ``prefect`` (owned by the ``vggflow`` role the two servers use) and
``vggflow_locks``, where clients take the promotion lock as ``vggflow_lock``, a role that can do
nothing else. PostgreSQL refuses to run as root, so as root ``initdb`` and the server run as the
``postgres`` system user (Debian's package creates it), which must be able to enter every
folder above the stack folder. Passwords are hashed client-side (SCRAM verifiers): the cleartext
never reaches the server or its log.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
from pathlib import Path

from vggflow.stack.folder import HOST, Health, StackError, StackFolder

APP_USER, LOCK_USER = "vggflow", "vggflow_lock"
APP_DATABASES = ("mlflow", "prefect")
LOCK_DATABASE = "vggflow_locks"
SUPERUSER = "postgres"

SERVER_SETTINGS = f"""
# vggflow stack: loopback only, no Unix socket, passwords hashed with SCRAM
listen_addresses = '{HOST}'
unix_socket_directories = ''
password_encryption = 'scram-sha-256'
max_connections = 200
"""
ACCESS_RULES = f"""# vggflow stack: password (SCRAM) only, loopback only
host all all {HOST}/32 scram-sha-256
"""


def bin_dir() -> Path:
    """The folder of ``initdb`` and ``postgres`` (Debian keeps them out of PATH).

    Raises:
        StackError: PostgreSQL is not installed.
    """
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if versions:
        return versions[-1].parent
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise StackError(
        "postgres: PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/postgres, no `postgres` on PATH). "
        "Install it: `sudo apt-get install postgresql` (Debian/Ubuntu)."
    )


def server_user() -> str | None:
    """The system user PostgreSQL runs as: ``postgres`` (or ``nobody``) as root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    for name in (SUPERUSER, "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise StackError("postgres: running as root, and there is no `postgres` or `nobody` user to run PostgreSQL as")


def data_dir(folder: StackFolder) -> Path:
    return folder.root / "pg" / "data"


def prepare(folder: StackFolder, say) -> bool:
    """Create the database cluster when the folder has none (or only a half-made one).

    Returns:
        True when it was created now (it then needs :func:`bootstrap` once the server runs).
    """
    data = data_dir(folder)
    if (data / "PG_VERSION").is_file() and folder.state.get("postgres_ready"):
        return False
    user = server_user()
    pg_root = data.parent
    if pg_root.exists():
        shutil.rmtree(pg_root)  # a cluster whose set-up did not finish: made again, never half-used
    if user is not None:
        _check_traversable(folder.root, user)
    pg_root.mkdir(parents=True, mode=0o700)
    password_file = pg_root / "initdb.pw"
    password_file.write_text(folder.secret("postgres_superuser", _password))
    password_file.chmod(0o600)
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (pg_root, password_file):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    say("postgres: creating the database cluster (initdb) …")
    try:
        _run_as_server(
            folder,
            "initdb", "-D", str(data), "-U", SUPERUSER, "--auth=scram-sha-256", f"--pwfile={password_file}",
            "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions",
        )  # fmt: skip
    finally:
        password_file.unlink(missing_ok=True)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(SERVER_SETTINGS)
    (data / "pg_hba.conf").write_text(ACCESS_RULES)
    return True


def process(folder: StackFolder):
    """The PostgreSQL server (not started), in the foreground, healthy once the superuser can connect."""
    command = [str(bin_dir() / "postgres"), "-D", str(data_dir(folder)), "-p", str(folder.ports["postgres"])]
    return folder.process(
        "postgres",
        command,
        health=lambda: _connect(folder, SUPERUSER, folder.secrets["postgres_superuser"], "postgres") is None,
        env=folder.base_env(),
        user=server_user(),
        stop_signal=signal.SIGINT,  # PostgreSQL's "fast" shutdown: clients disconnected, clean stop
    )


def bootstrap(folder: StackFolder) -> None:
    """Create the roles and databases of a new cluster (the servers' role, the lock role, three databases)."""
    from psycopg import sql

    users = {APP_USER: folder.secret("postgres_app", _password), LOCK_USER: folder.secret("postgres_lock", _password)}
    with _connection(folder, SUPERUSER, folder.secrets["postgres_superuser"], "postgres") as conn:
        for user, password in users.items():
            verifier = conn.pgconn.encrypt_password(password.encode(), user.encode(), b"scram-sha-256").decode()
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(user), sql.Literal(verifier))
            )
        for database, owner in [(db, APP_USER) for db in APP_DATABASES] + [(LOCK_DATABASE, SUPERUSER)]:
            name = sql.Identifier(database)
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(name, sql.Identifier(owner)))
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(name))
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(LOCK_DATABASE), sql.Identifier(LOCK_USER)
            )
        )
    folder.state["postgres_ready"] = True
    folder.save()


def server_url(folder: StackFolder, database: str, driver: str) -> str:
    """The SQLAlchemy URL of ``database`` for a server we start (holds the password: environment only)."""
    return f"postgresql+{driver}://{APP_USER}:{folder.secrets['postgres_app']}@{folder.address('postgres')}/{database}"


def lock_url(folder: StackFolder) -> str:
    """The promotion lock's URL for clients (``registry.lock_url``); the password comes from their PGPASSFILE."""
    return f"postgresql://{LOCK_USER}@{folder.address('postgres')}/{LOCK_DATABASE}"


def health(folder: StackFolder) -> Health:
    """Whether the servers' role can connect to the ``mlflow`` database."""
    if "postgres_app" not in folder.secrets:
        return Health(False, "not set up")
    problem = _connect(folder, APP_USER, folder.secrets["postgres_app"], "mlflow")
    return Health(problem is None, problem or "accepting connections")


def _connection(folder: StackFolder, user: str, password: str, database: str):
    import psycopg

    return psycopg.connect(
        host=HOST,
        port=folder.ports["postgres"],
        user=user,
        password=password,
        dbname=database,
        autocommit=True,
        connect_timeout=3,
    )


def _connect(folder: StackFolder, user: str, password: str, database: str) -> str | None:
    """None when ``user`` can connect, else PostgreSQL's first line about why (never a password)."""
    import psycopg

    try:
        with _connection(folder, user, password, database):
            return None
    except psycopg.Error as err:
        return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def _run_as_server(folder: StackFolder, program: str, *args: str) -> None:
    from vggflow.processes import run_as

    done = subprocess.run(
        [str(bin_dir() / program), *args],
        env=folder.base_env(),
        cwd=data_dir(folder).parent,
        capture_output=True,
        text=True,
        **run_as(server_user()),
    )
    if done.returncode != 0:
        raise StackError(f"postgres: `{program}` failed: {(done.stderr or done.stdout).strip()[-800:]}")


def _check_traversable(root: Path, user: str) -> None:
    """PostgreSQL runs as ``user``, who must be able to enter every folder down to ``root``."""
    entry = pwd.getpwnam(user)
    for parent in [*reversed(root.parents), root]:
        if not parent.exists():
            break
        info = parent.stat()
        if info.st_uid == entry.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid == entry.pw_gid:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            raise StackError(
                f"postgres: PostgreSQL runs as the `{user}` user (never as root), which cannot enter {parent} "
                f"(mode {stat.filemode(info.st_mode)}). Put the stack elsewhere (--set stack.dir=/srv/vggflow-stack) "
                f"or let others through that folder (`chmod o+x {parent}`)."
            )


def _password() -> str:
    return secrets.token_urlsafe(24)
