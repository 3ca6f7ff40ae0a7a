"""Cross-process cache invalidation: PostgreSQL LISTEN/NOTIFY on one channel.

Any number of `memory3 serve` processes share one database, and each caches what it reads on
every call (verified API keys, bank definitions, codebook digests, quota overrides). A change made
through one process must reach the others' caches: the transaction that makes the change also
sends ``pg_notify('memory3_invalidate', '<kind>:<args>')`` (:func:`notify`), so a notice is
delivered when, and only if, the change commits; every process's :class:`Listener` — one dedicated
psycopg connection to the primary, LISTENing — drops what the notice names within milliseconds.
A listener that loses its connection reconnects with backoff and, once back, drops every cache
whole (notices sent while it was away are lost); meanwhile each cache's own lifetime
(``key_cache_seconds``, ``bank_cache_seconds``, ...) bounds how stale it can get. The kinds and
what each cache does on a notice: docs/design.md, "Replicas and service processes".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
from sqlalchemy import text

from .embedded_pg import libpq_url
from .metrics import INVALIDATIONS, LISTENER_UP

log = logging.getLogger(__name__)

CHANNEL = "memory3_invalidate"
APPLICATION_NAME = "memory3 invalidation listener"  # how its connection shows in pg_stat_activity
MAX_BACKOFF_SECONDS = 5.0


async def notify(conn, kind: str, *args) -> None:
    """Queue a notice in ``conn``'s transaction: sent at its commit, dropped with a rollback.
    Arguments are ids and names (no ':' in them: bank and tenant names cannot hold one)."""
    payload = ":".join((kind, *map(str, args)))
    await conn.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": CHANNEL, "payload": payload})


class Listener:
    """Receives the notices and calls the handlers registered for their kind (``on``); calls the
    reset handlers (``on_reset``) after every (re)connection, when notices may have been missed."""

    def __init__(self, url: str, timeout_seconds: float = 5.0, ping_seconds: float = 5.0) -> None:
        self.url = libpq_url(url)
        self.timeout_seconds = timeout_seconds
        self.ping_seconds = ping_seconds  # how often a quiet connection is checked (a dead one is replaced)
        self._handlers: dict[str, list[Callable[[list[str]], None]]] = {}
        self._resets: list[Callable[[], None]] = []
        self.listening = asyncio.Event()
        self.received = 0

    def on(self, kind: str, handler: Callable[[list[str]], None]) -> None:
        self._handlers.setdefault(kind, []).append(handler)

    def on_reset(self, handler: Callable[[], None]) -> None:
        self._resets.append(handler)

    def dispatch(self, payload: str) -> None:
        kind, *args = payload.split(":")
        handlers = self._handlers.get(kind)
        if handlers is None:  # a newer process's kind: ignored, its caches' lifetimes still apply
            return
        INVALIDATIONS.labels(kind).inc()
        self.received += 1
        for handler in handlers:
            try:
                handler(args)
            except Exception:  # one bad notice must not stop the listener
                log.exception("invalidation notice %r not applied", payload[:200])

    def reset_all(self) -> None:
        for handler in self._resets:
            handler()

    async def _listen_once(self) -> None:
        async with asyncio.timeout(self.timeout_seconds):
            conn = await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=max(1, int(self.timeout_seconds)),
                application_name=APPLICATION_NAME)
        async with conn:
            async with asyncio.timeout(self.timeout_seconds):
                await conn.execute(f"LISTEN {CHANNEL}")
            self.reset_all()  # whatever changed while no one listened
            LISTENER_UP.set(1)
            self.listening.set()
            while True:
                async for notice in conn.notifies(timeout=self.ping_seconds):
                    self.dispatch(notice.payload)
                async with asyncio.timeout(self.timeout_seconds):  # quiet: is the connection still there?
                    await conn.execute("SELECT 1")

    async def run(self) -> None:
        """Forever: listen; on any failure reconnect after a backoff (0.1 s doubling to 5 s)."""
        backoff = 0.1
        while True:
            try:
                await self._listen_once()
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if self.listening.is_set():
                    log.warning("invalidation listener lost its connection (%s); reconnecting", err)
                    backoff = 0.1
                else:
                    log.warning("invalidation listener cannot connect (%s); retrying in %.1f s", err, backoff)
            finally:
                LISTENER_UP.set(0)
                self.listening.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
