"""Trajectories of the proxy policy: one row per episode, decisions as parallel arrays (see
migration 0002 for why). Log streams stage episodes with binary COPY into a temporary table and
insert them at commit with ``ON CONFLICT DO NOTHING`` on (tenant, episode id): a retried or
replayed episode is counted as a duplicate, never stored twice, and a stream is all or nothing.

The episode's prompt and response texts (migration 0005; NULL when not logged) travel in the same
row, so Read and Export hand them out without a tokenizer. A filter's ``proxy_versions`` is an
``= ANY`` over the (tenant, proxy_version, seq) index."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from psycopg.types.json import Jsonb
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from memory3.core.episodes import DECISION_COLUMNS, DECISION_FIELDS, Episode, decisions_from_columns

from .errors import InvalidArgument, NotFound

_DECISION_TYPES = [f.sql_type for f in DECISION_FIELDS]

# Columns a Log stream stages, in COPY order (stream_seq keeps the client's order for seqs).
_STAGED = (
    "stream_seq", "episode_id", "bank", "model_fingerprint", "proxy_version", "prompt_ids", "response_ids",
    "n_decisions", *DECISION_COLUMNS, "rewards", "hidden_states", "prompt_text", "response_text",
)
_STAGED_TYPES = ["int8", "text", "text", "text", "int8", "int4[]", "int4[]", "int4", *_DECISION_TYPES, "jsonb", "bytea",
                 "text", "text"]
_STAGED_DEFINITION = ", ".join(f"{column} {kind}" for column, kind in zip(_STAGED, _STAGED_TYPES))

CURSOR = re.compile(r"c1\.(\d{1,19})")  # fullmatch


@dataclass
class EpisodeRow:
    """An episode as stored: plain lists, validated by the servicer before it gets here."""

    episode_id: str
    bank: str
    model_fingerprint: str
    proxy_version: int
    prompt_ids: list[int]
    response_ids: list[int]
    decisions: tuple[list, ...]  # the seven DECISION_COLUMNS, equal lengths
    rewards: dict[str, float]
    hidden_states: bytes | None = None
    logged_at: datetime | None = None
    seq: int = 0
    prompt_text: str | None = None
    response_text: str | None = None

    @property
    def n_decisions(self) -> int:
        return len(self.decisions[0])

    def episode(self) -> Episode:
        """The episode as the SDK and the export table know it."""
        return Episode(
            self.prompt_ids, self.response_ids, decisions_from_columns(self.decisions), self.model_fingerprint,
            # jsonb writes a whole-valued double as an integer (1e19 -> 10000000000000000000): floats again
            self.proxy_version, self.bank, {k: float(v) for k, v in self.rewards.items()}, self.episode_id,
            self.hidden_states, self.prompt_text, self.response_text,
        )

    def approximate_bytes(self) -> int:
        """About what the episode takes in memory and on the wire (4 bytes per token and decision field)."""
        return (4 * (len(self.prompt_ids) + len(self.response_ids)) + 4 * len(self.decisions) * self.n_decisions
                + len(self.hidden_states or b"") + 32 * len(self.rewards) + 256
                + sum(len(t.encode()) for t in (self.prompt_text, self.response_text) if t))


@dataclass
class EpisodeFilter:
    bank: str | None = None
    proxy_version: int | None = None
    model_fingerprint: str | None = None
    logged_after: datetime | None = None
    logged_before: datetime | None = None
    episode_ids: list[str] = field(default_factory=list)
    proxy_versions: list[int] = field(default_factory=list)

    def where(self, tenant_id: int) -> tuple[str, dict]:
        """SQL condition and parameters; only fixed column names, user values are parameters."""
        clauses, params = ["tenant_id = :tenant"], {"tenant": tenant_id}
        for column, value in (
            ("bank", self.bank), ("proxy_version", self.proxy_version), ("model_fingerprint", self.model_fingerprint)
        ):
            if value is not None:
                clauses.append(f"{column} = :{column}")
                params[column] = value
        if self.logged_after is not None:
            clauses.append("logged_at >= :logged_after")
            params["logged_after"] = self.logged_after
        if self.logged_before is not None:
            clauses.append("logged_at < :logged_before")
            params["logged_before"] = self.logged_before
        if self.episode_ids:
            clauses.append("episode_id = ANY(:ids)")
            params["ids"] = list(self.episode_ids)
        if self.proxy_versions:
            clauses.append("proxy_version = ANY(:versions)")
            params["versions"] = list(self.proxy_versions)
        return " AND ".join(clauses), params


def encode_cursor(seq: int) -> str:
    return f"c1.{seq}"


def decode_cursor(cursor: str) -> int:
    """The seq a cursor resumes after; "" is the beginning."""
    if not cursor:
        return 0
    match = CURSOR.fullmatch(cursor)
    if not match:
        raise InvalidArgument("cursor is not one this service issued (pass next_cursor back unchanged)")
    return int(match.group(1))


@dataclass
class LogCounts:
    logged: int = 0
    duplicates: int = 0
    decisions: int = 0


@dataclass
class EpisodeWriter:
    """One Log stream: each batch is staged (COPY into the UNLOGGED staging table under the stream's
    id) in its own short transaction, so nothing is held while the client is idle; :meth:`commit`
    inserts the new episodes in one transaction, so the stream is still all or nothing."""

    engine: AsyncEngine
    tenant_id: int
    stream_id: uuid.UUID = field(default_factory=uuid.uuid4)
    staged_bytes: int = 0
    _received: int = 0

    async def stage(self, rows: list[EpisodeRow]) -> None:
        if not rows:
            return
        async with self.engine.begin() as conn:
            raw = await conn.get_raw_connection()
            async with raw.driver_connection.cursor() as cursor:
                async with cursor.copy(
                    f"COPY episode_staging (stream_id, {', '.join(_STAGED)}) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["uuid", *_STAGED_TYPES])
                    for row in rows:
                        self._received += 1
                        await copy.write_row(
                            (
                                self.stream_id, self._received, row.episode_id, row.bank, row.model_fingerprint,
                                row.proxy_version, row.prompt_ids, row.response_ids, row.n_decisions, *row.decisions,
                                Jsonb(row.rewards), row.hidden_states, row.prompt_text, row.response_text,
                            )
                        )
                        self.staged_bytes += row.approximate_bytes()

    async def discard(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text("DELETE FROM episode_staging WHERE stream_id = :s"), {"s": self.stream_id})

    async def commit(self) -> LogCounts:
        """Insert the staged episodes that are new for the tenant (first copy of an id wins).

        The per-tenant advisory lock is taken here and held until the transaction commits: seqs
        are then assigned in commit order within a tenant, which is what lets a Read cursor (last
        seq seen) never miss a row that commits later. The tenant's trajectory bytes (quota
        'stored_bytes') grow in the same transaction."""
        if not self._received:
            return LogCounts()
        async with self.engine.begin() as conn:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtext('trajectories'), hashtext(CAST(:t AS text)))"),
                {"t": self.tenant_id},
            )
            columns = ", ".join(_STAGED[1:])
            result = await conn.execute(
                text(
                    f"""
                    WITH firsts AS (
                        SELECT DISTINCT ON (episode_id) * FROM episode_staging WHERE stream_id = :stream
                        ORDER BY episode_id, stream_seq
                    ), inserted AS (
                        INSERT INTO trajectory_episodes AS e (tenant_id, {columns})
                        SELECT :tenant, {columns} FROM firsts ORDER BY stream_seq
                        ON CONFLICT (tenant_id, episode_id) DO NOTHING
                        RETURNING n_decisions, pg_column_size(e.*) AS bytes
                    )
                    SELECT count(*), coalesce(sum(n_decisions), 0), coalesce(sum(bytes), 0) FROM inserted
                    """
                ),
                {"tenant": self.tenant_id, "stream": self.stream_id},
            )
            logged, decisions, stored = result.one()
            await conn.execute(
                text(
                    "INSERT INTO tenant_usage (tenant_id, trajectory_bytes) VALUES (:t, :b) ON CONFLICT (tenant_id)"
                    " DO UPDATE SET trajectory_bytes = tenant_usage.trajectory_bytes + EXCLUDED.trajectory_bytes"
                ),
                {"t": self.tenant_id, "b": int(stored)},
            )
            await conn.execute(text("DELETE FROM episode_staging WHERE stream_id = :s"), {"s": self.stream_id})
        return LogCounts(int(logged), self._received - int(logged), int(decisions))


_READ_COLUMNS = (
    "seq, episode_id, bank, model_fingerprint, proxy_version, logged_at, prompt_ids, response_ids, rewards,"
    " prompt_text, response_text"
)


class TrajectoryStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def writer(self, tenant_id: int) -> EpisodeWriter:
        return EpisodeWriter(self.engine, tenant_id)

    async def read(
        self, tenant_id: int, flt: EpisodeFilter, after_seq: int, limit: int, budget: int, with_decisions: bool,
        with_hidden: bool,
    ) -> tuple[list[EpisodeRow], bool]:
        """Episodes after ``after_seq``, in log order: up to ``limit`` of them, or fewer when the next
        would pass ``budget`` bytes (the first always comes). (rows, whether the query was exhausted).

        Rows come through a server-side cursor a few at a time, so a page never holds more than
        about its budget however large the episodes are."""
        where, params = flt.where(tenant_id)
        decisions = ", ".join(DECISION_COLUMNS) if with_decisions else ""
        hidden = "hidden_states" if with_hidden else "NULL::bytea AS hidden_states"
        empty = ([],) * len(DECISION_COLUMNS)
        rows, size, exhausted = [], 0, True
        async with self.engine.connect() as conn:
            result = await conn.stream(
                text(
                    f"SELECT {_READ_COLUMNS}, {hidden}{', ' + decisions if decisions else ''}"
                    f" FROM trajectory_episodes WHERE {where} AND seq > :after ORDER BY seq LIMIT :limit"
                ),
                {**params, "after": after_seq, "limit": limit},
                execution_options={"yield_per": 8},
            )
            async for r in result:
                row = EpisodeRow(
                    r.episode_id, r.bank, r.model_fingerprint, r.proxy_version, r.prompt_ids, r.response_ids,
                    tuple(getattr(r, c) for c in DECISION_COLUMNS) if with_decisions else empty,
                    r.rewards, r.hidden_states, r.logged_at, r.seq, r.prompt_text, r.response_text,
                )
                size += row.approximate_bytes()
                if rows and size > budget:
                    exhausted = False
                    break
                rows.append(row)
            await result.close()
        return rows, exhausted and len(rows) < limit

    async def count(self, tenant_id: int, flt: EpisodeFilter) -> tuple[int, int]:
        where, params = flt.where(tenant_id)
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(f"SELECT count(*), coalesce(sum(n_decisions), 0) FROM trajectory_episodes WHERE {where}"),
                    params,
                )
            ).one()
        return int(row[0]), int(row[1])

    async def attach_reward(self, tenant_id: int, episode_id: str, name: str, value: float) -> tuple[bool, dict]:
        """Set one named reward; (changed, the episode's rewards). Unknown episode: NOT_FOUND."""
        async with self.engine.begin() as conn:
            updated = (
                await conn.execute(
                    text(
                        "UPDATE trajectory_episodes SET rewards = rewards || jsonb_build_object(CAST(:name AS text),"
                        " CAST(:value AS float8)) WHERE tenant_id = :t AND episode_id = :e"
                        " AND rewards -> CAST(:name AS text) IS DISTINCT FROM to_jsonb(CAST(:value AS float8))"
                        " RETURNING rewards"
                    ),
                    {"t": tenant_id, "e": episode_id, "name": name, "value": value},
                )
            ).first()
            if updated is not None:
                return True, updated.rewards
            current = (
                await conn.execute(
                    text("SELECT rewards FROM trajectory_episodes WHERE tenant_id = :t AND episode_id = :e"),
                    {"t": tenant_id, "e": episode_id},
                )
            ).first()
        if current is None:
            raise NotFound(f"episode {episode_id!r} not found")
        return False, current.rewards
