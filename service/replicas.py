"""Read replicas: which calls read from a PostgreSQL streaming standby, and read-your-writes.

The service takes one primary (``database_url``) and any number of standbys (``replica_urls``)
that replicate it by PostgreSQL's own streaming replication. The calls in :data:`READ_METHODS`
run on a replica; every other call (writes, and everything that must see its own writes: keys,
quotas, bank and codebook management) runs on the primary. A replica is chosen per call (round
robin) by :class:`RoutingInterceptor` and held in a context variable; the stores of the routed
services are given a :class:`RoutedEngine`, whose connections go to that replica, so the stores
themselves know nothing of routing. A monitor measures each replica every
``replica_check_seconds``: one that is unreachable, promoted, or further behind than
``replica_max_lag_seconds`` is skipped, and its reads go to another replica or the primary.

Read-your-writes on request: a Write, Log or Publish answer carries a consistency token (the primary's WAL
insert position after the commit, sealed for the tenant); a read presenting it is served by a
replica that has replayed past it, else (after at most ``consistency_wait_seconds``) by the
primary. Without replicas nothing is routed and answers carry no token: the primary serves all.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import psycopg
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from .auth import caller_var
from .config import Settings
from .db import autocommit, create_engine_for
from .errors import InvalidArgument, status_for
from .metrics import READ_ROUTES, REPLICA_LAG_BYTES, REPLICA_LAG_SECONDS, REPLICA_UP
from .tokens import Tokens

log = logging.getLogger(__name__)

# The routing table: calls that read (and need not see a write made a moment ago by someone else
# through another process) go to a replica; a consistency token makes one see the caller's writes.
READ_METHODS = frozenset(
    f"/memory3.v1.{method}"
    for method in (
        "Memories/Retrieve", "Memories/RetrieveBatch", "Memories/Fetch", "Memories/Stats", "Memories/Scroll",
        "Trajectories/Read", "Trajectories/Export", "Trajectories/Count",
        "Proxies/Get", "Proxies/List",
    )
)
# Calls whose answer carries a consistency token (the field `consistency_token` of their response).
TOKEN_METHODS = frozenset(("/memory3.v1.Memories/Write", "/memory3.v1.Trajectories/Log", "/memory3.v1.Proxies/Publish"))
TOKEN_KIND = "consistency"
MAX_TOKEN_CHARS = 1024
WAIT_POLL_SECONDS = 0.005

_route: contextvars.ContextVar["Replica | None"] = contextvars.ContextVar("memory3_read_route", default=None)

LSN_SQL = text("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn")  # bytes since the start of WAL
REPLICA_SQL = text("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn() - '0/0'::pg_lsn")


@dataclass(eq=False)
class Replica:
    label: str  # its position in replica_urls: metric label and log name (a URL may carry a password)
    engine: AsyncEngine
    replay_lsn: int = -1  # the last replay position measured
    usable: bool = False
    reason: str = "not checked yet"
    variants: dict = field(default_factory=dict)  # execution_options -> engine (see RoutedEngine)

    def __post_init__(self) -> None:
        self.reads = autocommit(self.engine)

    def skip(self, reason: str) -> None:
        if self.usable or reason != self.reason:
            log.warning("replica %s skipped: %s", self.label, reason)
        self.usable, self.reason = False, reason
        REPLICA_UP.labels(self.label).set(0)

    def take(self) -> None:
        if not self.usable:
            log.info("replica %s takes reads", self.label)
        self.usable, self.reason = True, ""
        REPLICA_UP.labels(self.label).set(1)


class RoutedEngine:
    """What the routed stores get instead of the primary's engine: ``connect()`` and ``begin()``
    go to the replica chosen for the current call, or to the primary when none was. Writes happen
    only in calls that are never routed, so they always reach the primary."""

    def __init__(self, primary: AsyncEngine, options: dict | None = None) -> None:
        self.primary = primary
        self.options = options or {}

    def _engine(self) -> AsyncEngine:
        replica = _route.get()
        if replica is None:
            return self.primary
        if not self.options:
            return replica.engine
        key = tuple(sorted(self.options.items()))
        if key not in replica.variants:
            replica.variants[key] = replica.engine.execution_options(**self.options)
        return replica.variants[key]

    def connect(self):
        return self._engine().connect()

    def begin(self):
        return self._engine().begin()

    def raw_connection(self):
        return self._engine().raw_connection()

    def connection_lost(self, error: Exception) -> None:
        """A hot read (db.driver_reads, which bypasses SQLAlchemy's error hook) lost its connection:
        the call's replica is skipped at once, as the hook does for the other reads."""
        replica = _route.get()
        if replica is not None:
            replica.skip(f"connection failed ({str(error).strip().splitlines()[0][:200] if str(error) else type(error).__name__})")

    def execution_options(self, **options) -> "RoutedEngine":
        return RoutedEngine(self.primary.execution_options(**options), {**self.options, **options})


def _connection_lost(replica: Replica):
    """SQLAlchemy's handle_error hook: a replica whose connection failed is skipped at once (the
    monitor takes it back when it answers again); errors of a statement (a recovery conflict, say)
    leave it in use."""

    def handle_error(context) -> None:
        original = context.original_exception
        sqlstate = getattr(original, "sqlstate", None)
        if context.is_disconnect or (isinstance(original, psycopg.OperationalError) and sqlstate is None):
            replica.skip(f"connection failed ({str(original).strip().splitlines()[0][:200]})")

    return handle_error


class Replicas:
    """The replicas of one service process: their monitor, the choice of one per read, and tokens."""

    def __init__(self, primary: AsyncEngine, urls: list[str], settings: Settings, tokens: Tokens) -> None:
        self.primary = autocommit(primary)
        self.settings = settings
        self.tokens = tokens
        self.replicas: list[Replica] = []
        for index, url in enumerate(urls):
            engine = create_engine_for(url, settings, connect_timeout=settings.replica_timeout_seconds)
            replica = Replica(str(index), engine)
            event.listen(engine.sync_engine, "handle_error", _connection_lost(replica))
            REPLICA_UP.labels(replica.label).set(0)
            self.replicas.append(replica)
        self._turn = itertools.count()
        self._samples: deque[tuple[float, int]] = deque()  # (monotonic time, primary's WAL position)

    @property
    def enabled(self) -> bool:
        return bool(self.replicas)

    # --- monitor -----------------------------------------------------------------------------

    async def monitor(self) -> None:
        """Forever: measure every replica (each check bounded by ``replica_timeout_seconds``)."""
        while True:
            try:
                await self.check()
            except Exception as err:  # the monitor must never stop
                log.warning("replica check failed: %s", err)
            await asyncio.sleep(self.settings.replica_check_seconds)

    async def check(self) -> None:
        now = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.replica_timeout_seconds):
                async with self.primary.connect() as conn:
                    position = int((await conn.execute(LSN_SQL)).scalar())
            self._samples.append((now, position))
        except Exception as err:  # the primary away: replicas are judged by the last positions known
            log.warning("primary's WAL position not read: %s", err)
        keep = self.settings.replica_max_lag_seconds + 4 * self.settings.replica_check_seconds
        while len(self._samples) > 1 and self._samples[0][0] < now - keep:
            self._samples.popleft()
        await asyncio.gather(*(self._check(replica, now) for replica in self.replicas))

    def lag(self, replay: int, now: float) -> tuple[float, int]:
        """(seconds, bytes) the replica is behind: how long ago the primary had first written past
        ``replay`` (0 when the replica has replayed all the primary had at the last sample)."""
        if not self._samples or replay >= self._samples[-1][1]:
            return 0.0, 0
        first_ahead = next(t for t, position in self._samples if position > replay)
        return now - first_ahead, self._samples[-1][1] - replay

    async def _check(self, replica: Replica, now: float) -> None:
        try:
            async with asyncio.timeout(self.settings.replica_timeout_seconds):
                async with replica.reads.connect() as conn:
                    in_recovery, replay = (await conn.execute(REPLICA_SQL)).one()
        except Exception as err:
            replica.skip(f"unreachable ({str(err).strip().splitlines()[0][:200] if str(err) else type(err).__name__})")
            return
        if not in_recovery or replay is None:
            replica.skip("not a standby replaying WAL (promoted, or not a replica of the primary?)")
            return
        replica.replay_lsn = int(replay)
        seconds, behind = self.lag(replica.replay_lsn, now)
        REPLICA_LAG_SECONDS.labels(replica.label).set(seconds)
        REPLICA_LAG_BYTES.labels(replica.label).set(behind)
        if seconds > self.settings.replica_max_lag_seconds:
            replica.skip(f"{seconds:.1f} s behind (replica_max_lag_seconds {self.settings.replica_max_lag_seconds:g})")
        else:
            replica.take()

    # --- routing -----------------------------------------------------------------------------

    def pick(self, at_least: int | None = None) -> Replica | None:
        """The next usable replica in turn (one known to have replayed ``at_least``, if given)."""
        candidates = [r for r in self.replicas if r.usable and (at_least is None or r.replay_lsn >= at_least)]
        if not candidates:
            return None
        return candidates[next(self._turn) % len(candidates)]

    async def _replayed(self, at_least: int) -> Replica | None:
        """A usable replica that has replayed ``at_least`` now (asked, not as last measured),
        waiting up to ``consistency_wait_seconds`` for one; None: the primary must serve."""
        replica = self.pick()
        if replica is None:
            return None
        deadline = time.monotonic() + self.settings.consistency_wait_seconds
        try:
            async with asyncio.timeout(self.settings.replica_timeout_seconds + self.settings.consistency_wait_seconds):
                async with replica.reads.connect() as conn:
                    while True:
                        replay = (await conn.execute(REPLICA_SQL)).one()[1]
                        if replay is not None and int(replay) >= at_least:
                            replica.replay_lsn = max(replica.replay_lsn, int(replay))
                            return replica
                        if time.monotonic() + WAIT_POLL_SECONDS > deadline:
                            return None
                        await asyncio.sleep(WAIT_POLL_SECONDS)
        except Exception:  # unreachable: the handle_error hook or the monitor skips it
            return None

    def open_token(self, tenant_id: int, token: str) -> int:
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidArgument(f"consistency_token exceeds {MAX_TOKEN_CHARS} characters; pass a Write, Log or "
                                  "Publish answer's token unchanged")
        try:
            return int(self.tokens.open(tenant_id, TOKEN_KIND, token, "consistency_token"))
        except (InvalidArgument, ValueError):
            raise InvalidArgument("consistency_token is not one this service issued to this tenant (pass a Write, "
                                  "Log or Publish answer's token unchanged)") from None

    async def route(self, request, tenant_id: int | None) -> None:
        """Choose where the current (read) call reads; InvalidArgument for a foreign token."""
        token = getattr(request, "consistency_token", "")
        if tenant_id is None:  # the admin key on a tenant's data: refused by the servicer, on the primary
            return
        at_least = self.open_token(tenant_id, token) if token else None
        if not self.replicas:
            return
        replica = self.pick(at_least)
        if replica is None and at_least is not None:
            replica = await self._replayed(at_least)
        if replica is None:
            reason = "token_not_replayed" if at_least is not None and self.pick() else "no_usable_replica"
            READ_ROUTES.labels("primary", reason).inc()
            return
        READ_ROUTES.labels("replica", "token" if at_least is not None else "any").inc()
        _route.set(replica)

    async def token(self, tenant_id: int) -> str:
        """After a commit: a token for reads that must see it ("" without replicas: all reads see it)."""
        if not self.replicas:
            return ""
        async with asyncio.timeout(self.settings.replica_timeout_seconds), self.primary.connect() as conn:
            position = int((await conn.execute(LSN_SQL)).scalar())
        return self.tokens.seal(tenant_id, TOKEN_KIND, str(position))

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.engine.dispose()


class RoutingInterceptor(grpc.aio.ServerInterceptor):
    """Inside the observability interceptor (the caller is known, the request parsed): routes the
    calls of :data:`READ_METHODS` and puts a consistency token in the answers of :data:`TOKEN_METHODS`."""

    def __init__(self, replicas: Replicas) -> None:
        self.replicas = replicas

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        if details.method in READ_METHODS:
            if handler.unary_unary:
                return grpc.unary_unary_rpc_method_handler(
                    self._routed_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer)
            if handler.unary_stream:
                return grpc.unary_stream_rpc_method_handler(
                    self._routed_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer)
        if details.method in TOKEN_METHODS and handler.stream_unary and self.replicas.enabled:
            return grpc.stream_unary_rpc_method_handler(
                self._with_token(handler.stream_unary), handler.request_deserializer, handler.response_serializer)
        return handler

    def _tenant(self) -> int | None:
        caller = caller_var.get()
        return None if caller is None else caller.tenant_id

    def _routed_unary(self, behaviour):
        async def routed(request, context):
            await self.replicas.route(request, self._tenant())
            return await behaviour(request, context)

        return routed

    def _routed_stream(self, behaviour):
        async def routed(request, context):
            await self.replicas.route(request, self._tenant())
            async with contextlib.aclosing(behaviour(request, context)) as responses:  # closed at once if cut short
                async for response in responses:
                    yield response

        return routed

    def _with_token(self, behaviour):
        async def with_token(request_iterator, context):
            response = await behaviour(request_iterator, context)
            tenant_id = self._tenant()
            if tenant_id is not None:
                try:
                    response.consistency_token = await self.replicas.token(tenant_id)
                except Exception as err:  # committed, but no token: UNAVAILABLE, and the retry (idempotent) gets one
                    late = isinstance(err, TimeoutError)
                    await context.abort(*((grpc.StatusCode.UNAVAILABLE, "database unavailable; retry") if late
                                          else status_for(err)))
            return response

        return with_token
