"""Database connection: the async engine (psycopg 3 + pgvector types) and Alembic migrations.

Migrations are the only way the schema changes; they run at start-up, before serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import time
from pathlib import Path

import psycopg

from alembic import command
from alembic.config import Config as AlembicConfig
from pgvector.psycopg import register_vector, register_vector_async
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn

from memory3 import migrations

from .config import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
PING_AFTER_IDLE_SECONDS = 5.0  # a pooled connection idle longer than this is pinged (a round trip) on checkout


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` to ``revision`` (default: the newest). Service processes
    starting together take turns (an advisory lock, waited for at most 10 minutes): the first
    migrates, the others find the schema current."""
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("SET LOCAL lock_timeout = '600s'"))
            connection.execute(text("SELECT pg_advisory_xact_lock(hashtext('memory3 migrations'))"))
            cfg = alembic_config()
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()
    log.info("database schema at %s", revision)


def create_engine_for(url: str, settings: Settings, connect_timeout: float | None = None) -> AsyncEngine:
    """Pooled async engine whose connections know pgvector's types (``connect_timeout``: seconds
    a new connection may take, e.g. to a replica that may be away)."""
    connect_args = {"connect_timeout": max(1, round(connect_timeout))} if connect_timeout else {}
    # LIFO: the connection used last is handed out first, so a light load keeps reusing one or two
    # warm backends (their caches, prepared statements) instead of cycling through the whole pool
    # (measured ~1 ms a Retrieve on this 2-core machine under load: bench/profile_reads.py).
    engine = create_async_engine(
        url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow, pool_use_lifo=True,
        connect_args=connect_args,
    )
    check_on_checkout(engine)

    async def prepare(connection) -> None:
        await register_vector_async(connection)
        # Search settings once per connection, not once per query: a round trip saved per Retrieve.
        # relaxed_order lets filtered HNSW scans keep going until enough rows pass the filter.
        await connection.execute(f"SET hnsw.ef_search = {int(settings.hnsw_ef_search)}")
        await connection.execute("SET hnsw.iterative_scan = relaxed_order")
        await connection.commit()

    @event.listens_for(engine.sync_engine, "connect")
    def _prepare(dbapi_connection, _record) -> None:
        dbapi_connection.run_async(prepare)

    return engine


def _closed_by_server(driver_connection) -> bool:
    """Whether the server has spoken on an idle connection: it never does unless it is going away
    (a terminated backend or a shutdown sends an error and closes; a killed one just closes), so
    readable input on a connection that sits in the pool means the connection is gone. No round trip."""
    try:
        if driver_connection.closed:
            return True
        poller = select.poll()
        poller.register(driver_connection.pgconn.socket, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    except Exception:  # no socket any more
        return True


def check_on_checkout(engine: AsyncEngine) -> None:
    """What SQLAlchemy's pool_pre_ping does, without its round trip on every checkout (two per
    Retrieve before the read path was made lean): a pooled connection is handed out only if the
    server has not closed it (its socket is polled, see :func:`_closed_by_server`); one idle for
    more than ``PING_AFTER_IDLE_SECONDS`` is also pinged, for a server that went away silently. A
    dead one is replaced by a new connection before the call uses it (the pool's own retry on
    DisconnectionError), so a restarted database costs no call an error."""

    @event.listens_for(engine.sync_engine, "checkin")
    def _checkin(_dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _checkout(dbapi_connection, record, _proxy) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None:  # a new connection
            return
        if _closed_by_server(dbapi_connection.driver_connection):
            raise DisconnectionError("the server closed the connection while it was in the pool")
        if time.monotonic() - idle_since > PING_AFTER_IDLE_SECONDS:
            try:
                engine.dialect.do_ping(dbapi_connection)
            except Exception as err:
                raise DisconnectionError(f"ping failed: {err}") from err


STAGING_TABLES = ("reference_staging", "episode_staging", "upload_chunks")


async def purge_stale_staging(engine: AsyncEngine, older_than_seconds: float, every_seconds: float = 600) -> None:
    """Forever: remove staged rows of streams that cannot still be running (older than the longest
    call), left by a crash or a lost client; a failed stream removes its own at once."""
    while True:
        try:
            async with engine.begin() as conn:
                for table in STAGING_TABLES:
                    await conn.execute(
                        text(f"DELETE FROM {table} WHERE staged_at < now() - make_interval(secs => :s)"),
                        {"s": older_than_seconds},
                    )
        except Exception as err:  # housekeeping must never take the server down
            log.warning("stale staging rows not purged: %s", err)
        await asyncio.sleep(every_seconds)


async def discard_quietly(discard, stream: str) -> None:
    """Await a failed stream's removal of what it staged; if that fails too, the purge above
    removes the rows later, by age, so only a warning is logged."""
    try:
        await discard
    except Exception as err:
        log.warning("staged data of a failed %s stream not removed now: %s", stream, err)


@contextlib.asynccontextmanager
async def driver_reads(engine: AsyncEngine):
    """A pooled psycopg connection in autocommit mode for single-statement reads — the hot path's
    checkout (Retrieve, Fetch): the pool's connection itself, without SQLAlchemy's Connection
    around it (about 35 us instead of 75 us a checkout here, and a tenth of the event loop's time
    under load went there: bench/profile_reads.py). The pool's own checkout checks still run
    (:func:`check_on_checkout`); the connection goes back as it came (autocommit off), and one
    left in any other state — broken, a statement cut short by cancellation — is discarded."""
    lost = getattr(engine, "connection_lost", None)  # a RoutedEngine: skips the call's replica at once
    try:
        fairy = await engine.raw_connection()
    except psycopg.OperationalError as err:
        if lost is not None:
            lost(err)
        raise
    driver = fairy.driver_connection
    try:
        await driver.set_autocommit(True)
        yield driver
    except psycopg.OperationalError as err:
        if lost is not None and err.sqlstate is None:  # the connection failed, not the statement
            lost(err)
        raise
    finally:
        try:
            reusable = not driver.closed and driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            if reusable:
                try:
                    await driver.set_autocommit(False)
                except Exception:
                    reusable = False
            if not reusable:
                await greenlet_spawn(fairy.invalidate)
            await greenlet_spawn(fairy.close)
        except Exception as err:  # never hide the call's own outcome behind the return of a connection
            log.warning("a read connection was not returned cleanly: %s", err)


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """The same pool without BEGIN/ROLLBACK around each read: single statements need no transaction."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


__all__ = ["migrate", "create_engine_for", "register_vector", "alembic_config"]
