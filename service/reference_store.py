"""References of a bank: text, metadata, embedding and encoded memory in one row, so a reader
never sees a reference without its memory. Writes stage rows with binary COPY into an UNLOGGED
staging table, batch by batch, and upsert them in one transaction at the end: a Write stream is
all or nothing and holds no connection while its client is idle (migration 0004)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from dataclasses import dataclass, field

import numpy as np
import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from memory3.core.blob import payload_checksum
from memory3.core.metadata import RANGES, Condition, metadata_to_json
from memory3.core.references import StoredReference, WriteSummary

from .bank_store import METRICS, Bank
from .db import autocommit, driver_reads
from .errors import NotFound


@dataclass
class ReferenceRow:
    external_id: str
    text: str
    metadata: dict
    embedding: np.ndarray | None
    memory: bytes | None

    @property
    def memory_size(self) -> int:
        return len(self.memory) if self.memory else 0

    @property
    def memory_crc32(self) -> int:
        return payload_checksum(self.memory) if self.memory else 0

    def content_hash(self) -> bytes:
        digest = hashlib.sha256()
        for part in (
            self.text.encode(),
            json.dumps(self.metadata, sort_keys=True).encode(),
            np.ascontiguousarray(self.embedding, dtype=np.float32).tobytes(),
            self.memory or b"",
        ):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
        return digest.digest()


HNSW_EF_SEARCH_MAX = 1000  # the largest hnsw.ef_search pgvector accepts

_STAGING_COLUMNS = (
    "stream_id, seq, external_id, text, metadata, embedding, memory, memory_size, memory_crc32, content_hash"
)
_STAGING_TYPES = ["uuid", "int8", "text", "text", "jsonb", "vector", "bytea", "int8", "int8", "bytea"]


def filter_sql(conditions: list[Condition], params: dict) -> str:
    """The conditions as one SQL boolean expression on ``metadata`` ("TRUE" for none), every key
    and value a parameter added to ``params``. eq and in are jsonb containment (``@>``, which the
    bank's GIN index on ``metadata jsonb_path_ops`` answers): {key: v} or {key: [v]}, so a list
    matches by an element. Ranges test the type first, so a value of another type is no match
    rather than jsonb's cross-type order; strings compare by code point (COLLATE "C"). A range is
    a CASE, not ``typeof = .. AND ..``: PostgreSQL has no statistics for a key's values and would
    multiply two default selectivities (0.005 x 0.33) into "almost no row passes", then plan
    Scroll pages as a whole-table scan and sort per page instead of walking the primary key; a
    CASE gets one moderate default (bench/bench_filters.py, docs/design.md). Statements with
    conditions run unprepared: a prepared statement's generic plan would not see the values, and
    whether 40 % or 0.05 % of a bank passes decides between the HNSW scan and the GIN index."""
    clauses = []
    for index, condition in enumerate(conditions):
        key, value = f"k{index}", f"v{index}"
        params[key] = condition.key
        if condition.op in ("eq", "in"):
            operands = (condition.value,) if condition.op == "eq" else condition.value
            params[value] = [Jsonb({condition.key: x}) for x in operands] + [
                Jsonb({condition.key: [x]}) for x in operands]
            clauses.append(f"metadata @> ANY(%({value})s::jsonb[])")
        elif condition.op == "exists":
            clauses.append(f"{'' if condition.value else 'NOT '}(metadata ? %({key})s)")
        elif isinstance(condition.value, str):
            params[value] = condition.value
            clauses.append(f"(CASE WHEN jsonb_typeof(metadata -> %({key})s) = 'string' THEN (metadata ->> %({key})s)"
                           f" COLLATE \"C\" {RANGES[condition.op]} %({value})s COLLATE \"C\" ELSE false END)")
        else:
            params[value] = Jsonb(condition.value)
            clauses.append(f"(CASE WHEN jsonb_typeof(metadata -> %({key})s) = 'number' THEN (metadata -> %({key})s)"
                           f" {RANGES[condition.op]} %({value})s::jsonb ELSE false END)")
    return " AND ".join(clauses) or "TRUE"


def search_many_sql(bank: Bank, conditions: list[Condition], params: dict) -> str:
    """The statement of :meth:`ReferenceStore.search_many` (parameters ``qs``, the query vectors,
    and ``limit``; the conditions' parameters are added to ``params``)."""
    operator, _, score_sql = METRICS[bank.metric]
    dim = int(bank.embedder_dim)
    distance = f"(embedding::vector({dim}) {operator} q.v)"
    where = f"WHERE {filter_sql(conditions, params)}" if conditions else ""
    return (
        f"SELECT q.i, r.* FROM unnest(%(qs)s::vector({dim})[]) WITH ORDINALITY AS q(v, i) CROSS JOIN LATERAL"
        f" (SELECT external_id, text, metadata, memory_size, memory_crc32, {score_sql.format(d=distance)}"
        f" FROM {bank.partition} {where} ORDER BY {distance} LIMIT %(limit)s) r"
    )


@contextlib.asynccontextmanager
async def _bank_partition(bank: Bank):
    """Turn 'relation does not exist' (bank dropped meanwhile, e.g. by another replica) into NOT_FOUND."""
    try:
        yield
    except (DBAPIError, psycopg.errors.UndefinedTable) as err:
        if isinstance(getattr(err, "orig", err), psycopg.errors.UndefinedTable):
            raise NotFound(f"bank {bank.name!r} not found") from None
        raise


@dataclass
class BankWriter:
    """One Write stream: each batch is staged (binary COPY into the shared UNLOGGED staging table,
    under the stream's id) in its own short transaction, so no connection is held while the client
    is idle; :meth:`commit` upserts all staged rows in one transaction, so the stream is still all
    or nothing. :meth:`discard` removes what a failed stream staged."""

    bank: Bank
    engine: AsyncEngine
    stream_id: uuid.UUID = field(default_factory=uuid.uuid4)
    staged_bytes: int = 0
    _seq: int = 0
    _memory_bytes: int = 0

    async def stage(self, rows: list[ReferenceRow]) -> None:
        if not rows:
            return
        async with self.engine.begin() as conn:
            raw = await conn.get_raw_connection()
            async with raw.driver_connection.cursor() as cursor:
                async with cursor.copy(f"COPY reference_staging ({_STAGING_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(_STAGING_TYPES)
                    for row in rows:
                        self._seq += 1
                        await copy.write_row(
                            (
                                self.stream_id, self._seq, row.external_id, row.text, Jsonb(row.metadata, dumps=metadata_to_json),
                                np.asarray(row.embedding, dtype=np.float32), row.memory, row.memory_size,
                                row.memory_crc32, row.content_hash(),
                            )
                        )
                        self._memory_bytes += row.memory_size
                        self.staged_bytes += row.memory_size + len(row.text.encode()) + 4 * len(row.embedding)

    async def commit(self) -> WriteSummary:
        """Upsert the staged rows (the last one wins for an id written twice in one stream)."""
        async with _bank_partition(self.bank), self.engine.begin() as conn:
            return await self._upsert(conn)

    async def discard(self) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text("DELETE FROM reference_staging WHERE stream_id = :s"), {"s": self.stream_id})

    async def _upsert(self, conn: AsyncConnection) -> WriteSummary:
        result = await conn.execute(
            text(
                f"""
                WITH latest AS (
                    SELECT DISTINCT ON (external_id) * FROM reference_staging WHERE stream_id = :stream
                    ORDER BY external_id, seq DESC
                ), upserted AS (
                    INSERT INTO {self.bank.partition} AS r
                        (bank_id, external_id, text, metadata, embedding, memory, memory_size, memory_crc32,
                         content_hash, updated_at)
                    SELECT :bank_id, external_id, text, metadata, embedding, memory, memory_size, memory_crc32,
                           content_hash, now()
                    FROM latest
                    ON CONFLICT (bank_id, external_id) DO UPDATE SET
                        text = EXCLUDED.text, metadata = EXCLUDED.metadata, embedding = EXCLUDED.embedding,
                        memory = EXCLUDED.memory, memory_size = EXCLUDED.memory_size,
                        memory_crc32 = EXCLUDED.memory_crc32, content_hash = EXCLUDED.content_hash,
                        updated_at = now()
                    WHERE r.content_hash IS DISTINCT FROM EXCLUDED.content_hash
                    RETURNING (xmax = 0) AS inserted
                )
                SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted),
                       (SELECT count(*) FROM latest) FROM upserted
                """
            ),
            {"bank_id": self.bank.id, "stream": self.stream_id},
        )
        inserted, updated, distinct = result.one()
        await conn.execute(text("DELETE FROM reference_staging WHERE stream_id = :s"), {"s": self.stream_id})
        return WriteSummary(inserted, updated, distinct - inserted - updated, self._memory_bytes)


class ReferenceStore:
    def __init__(self, engine: AsyncEngine, ef_search: int = 100, exact_rows: int = 5000) -> None:
        self.engine = engine
        self.reads = autocommit(engine)
        self.ef_search = ef_search
        self.exact_rows = exact_rows  # eq/in conditions leave at most this many references: rank them exactly

    def writer(self, bank: Bank) -> BankWriter:
        return BankWriter(bank, self.engine)

    async def search(
        self, bank: Bank, vector: np.ndarray, limit: int, conditions: list[Condition] = (),
        memory_budget: int | None = None,
    ) -> list[StoredReference]:
        """Nearest references by the bank's HNSW index (approximate), nearest first.

        Without ``memory_budget`` the rows come without their memories (:meth:`load` reads those,
        a bounded group at a time). With it (bytes), the same statement also returns the memories
        of the nearest rows whose memories together fit in the budget — search and payloads in one
        round trip on one connection, from one snapshot; a row past the budget has ``memory``
        None while its ``memory_size`` says it has one, for :meth:`load` to read. A window sum
        decides, so the bytes of a call stay bounded whatever top_k asks for; the memories of rows
        past the budget are never read (a TOAST pointer is only followed when a value is sent).

        The hot path of every Retrieve: the statement goes straight to the psycopg connection
        (no SQLAlchemy compile per call), where psycopg prepares it after a few executions;
        results are binary (a memory arrives as its bytes, not as hex text twice its size).
        """
        operator, _, score_sql = METRICS[bank.metric]
        dim = int(bank.embedder_dim)
        distance = f"(embedding::vector({dim}) {operator} %(q)s::vector({dim}))"
        score = score_sql.format(d=distance)
        params = {"q": vector, "limit": limit}
        where = f"WHERE {filter_sql(conditions, params)}" if conditions else ""
        if memory_budget is None:
            sql = (
                f"SELECT external_id, text, metadata, memory_size, memory_crc32, NULL::bytea, {score}"
                f" FROM {bank.partition} {where} ORDER BY {distance} LIMIT %(limit)s"
            )
        else:
            params["budget"] = int(memory_budget)
            sql = (
                "SELECT external_id, text, metadata, memory_size, memory_crc32,"
                " CASE WHEN sum(memory_size) OVER (ORDER BY d ROWS UNBOUNDED PRECEDING) <= %(budget)s"
                " THEN memory END, score"
                f" FROM (SELECT external_id, text, metadata, memory_size, memory_crc32, memory, {distance} AS d,"
                f" {score} AS score FROM {bank.partition} {where} ORDER BY {distance} LIMIT %(limit)s) nearest"
                " ORDER BY d"
            )
        async with self._search_connection(bank, limit, conditions) as driver:
            async with driver.cursor(binary=True) as cursor:
                await cursor.execute(sql, params, prepare=False if conditions else None)
                found = [StoredReference(*row[:6], row[6]) for row in await cursor.fetchall()]
        # relaxed_order may return slightly out of order; the statement with memories sorts itself
        if memory_budget is None and (conditions or limit > HNSW_EF_SEARCH_MAX):
            found.sort(key=lambda row: -row.score)
        return found

    async def search_many(
        self, bank: Bank, vectors: list[np.ndarray], limit: int, conditions: list[Condition] = ()
    ) -> list[list[StoredReference]]:
        """:meth:`search` for several vectors in one statement: a LATERAL join over the unnested
        query vectors, each side walking the bank's HNSW index as a lone search does (the distance
        to the outer row's vector is the index scan's ordering key). Per vector, nearest first."""
        params = {"qs": list(vectors), "limit": limit}
        sql = search_many_sql(bank, conditions, params)
        found: list[list[StoredReference]] = [[] for _ in vectors]
        async with self._search_connection(bank, limit, conditions) as driver:
            for row in await (await driver.execute(sql, params, prepare=False if conditions else None)).fetchall():
                found[int(row[0]) - 1].append(StoredReference(*row[1:6], None, float(row[6])))
        for rows in found:  # the join's output order is not promised; relaxed_order may also reorder
            rows.sort(key=lambda row: -row.score)
        return found

    @contextlib.asynccontextmanager
    async def _search_connection(self, bank: Bank, limit: int, conditions: list[Condition]):
        """The psycopg connection a search runs on, set up for ``limit`` rows and the conditions."""
        exact = await self._few_pass(bank, conditions)
        transaction = exact or limit > self.ef_search
        if not transaction:
            async with _bank_partition(bank), driver_reads(self.engine) as driver:
                yield driver
            return
        async with _bank_partition(bank), self.engine.begin() as conn:
            if exact:  # no HNSW scan: the GIN index's few references, ranked exactly
                await conn.execute(text("SET LOCAL enable_indexscan = off"))
            elif limit > self.ef_search:  # the connection's default ef_search would cap the results
                # pgvector caps ef_search; beyond it the iterative scan (relaxed order) supplies the rest
                await conn.execute(text(f"SET LOCAL hnsw.ef_search = {min(int(limit), HNSW_EF_SEARCH_MAX)}"))
            yield (await conn.get_raw_connection()).driver_connection

    async def _few_pass(self, bank: Bank, conditions: list[Condition]) -> bool:
        """Whether the eq and in conditions (which the GIN index answers) leave at most
        ``exact_rows`` references: then those are ranked exactly (other conditions applied)
        instead of through HNSW. PostgreSQL's own choice often takes the HNSW scan with the filter
        for a filter a few tenths of a percent pass, and pgvector's iterative scan then yields
        fewer or other than the nearest (bench/bench_filters.py). The count stops at the threshold
        and reads only what the index finds, so it costs at most that many rows."""
        indexed = [c for c in conditions if c.op in ("eq", "in")]
        if not indexed or self.exact_rows <= 0:
            return False
        params: dict = {}
        sql = (f"SELECT count(*) FROM (SELECT 1 FROM {bank.partition} WHERE {filter_sql(indexed, params)}"
               f" LIMIT {int(self.exact_rows) + 1}) passing")
        async with _bank_partition(bank), driver_reads(self.engine) as driver:
            (count,) = await (await driver.execute(sql, params, prepare=False)).fetchone()
        return count <= self.exact_rows

    async def load(
        self, bank: Bank, external_ids: list[str], with_memory: bool, conditions: list[Condition] = ()
    ) -> dict[str, StoredReference]:
        """The references among the ids as they are now (and passing the conditions), by id (the
        caller keeps groups bounded). Binary results: a memory arrives as its bytes, not as hex
        text twice its size."""
        memory_column = "memory" if with_memory else "NULL::bytea"
        params = {"ids": list(external_ids), "bank": bank.id}
        where = f" AND {filter_sql(conditions, params)}" if conditions else ""
        sql = (  # bank_id = constant: the primary key (bank_id, external_id) finds each id
            f"SELECT external_id, text, metadata, memory_size, memory_crc32, {memory_column}"
            f" FROM {bank.partition} WHERE bank_id = %(bank)s AND external_id = ANY(%(ids)s){where}"
        )
        async with _bank_partition(bank), driver_reads(self.engine) as driver:
            async with driver.cursor(binary=True) as cursor:
                await cursor.execute(sql, params, prepare=False if conditions else None)
                return {row[0]: StoredReference(*row[:5], row[5]) async for row in cursor}

    async def fetch(
        self, bank: Bank, external_ids: list[str], with_memory: bool, budget: int
    ) -> tuple[list[StoredReference], list[tuple[str, int]]]:
        """Fetch's read in one statement: the references among the (distinct) ids, in the ids'
        order. Those whose bytes (text + metadata, + memory when ``with_memory``) fit in ``budget``
        together, counted in that order, come whole; for each one after them only (id, bytes), for
        :meth:`load` to read in bounded groups. A missing id is absent from both lists."""
        memory = "memory" if with_memory else "NULL::bytea"
        weight = "octet_length(r.text) + octet_length(r.metadata::text)" + (" + r.memory_size" if with_memory else "")
        sql = (
            "SELECT external_id, weight, fits, CASE WHEN fits THEN text END, CASE WHEN fits THEN metadata END,"
            f" memory_size, memory_crc32, CASE WHEN fits THEN {memory} END"
            " FROM (SELECT r.external_id, r.text, r.metadata, r.memory_size, r.memory_crc32, r.memory, i.n,"
            f" {weight} AS weight, sum({weight}) OVER (ORDER BY i.n ROWS UNBOUNDED PRECEDING) <= %(budget)s AS fits"
            " FROM unnest(%(ids)s::text[]) WITH ORDINALITY AS i(id, n)"
            f" JOIN {bank.partition} r ON r.bank_id = %(bank)s AND r.external_id = i.id) found ORDER BY n"
        )
        params = {"ids": list(external_ids), "bank": bank.id, "budget": int(budget)}
        whole: list[StoredReference] = []
        later: list[tuple[str, int]] = []
        async with _bank_partition(bank), driver_reads(self.engine) as driver:
            async with driver.cursor(binary=True) as cursor:
                await cursor.execute(sql, params)
                async for external_id, size, fits, text_, metadata, memory_size, crc, payload in cursor:
                    if fits:
                        whole.append(StoredReference(external_id, text_, metadata, memory_size, crc, payload))
                    else:
                        later.append((external_id, int(size)))
        return whole, later

    async def page(
        self, bank: Bank, after: str, limit: int, conditions: list[Condition] = ()
    ) -> list[tuple[str, int, int]]:
        """(external id, text + metadata bytes, memory bytes) of up to ``limit`` references after
        ``after`` in external_id order that pass the conditions: one page of a Scroll, by key (the
        primary key's order, so the index walks it), sizes only — :meth:`load` reads the rest."""
        params = {"bank": bank.id, "after": after, "limit": limit}
        sql = (  # bank_id = constant: the primary key (bank_id, external_id) then gives external_id's order
            "SELECT external_id, octet_length(text) + octet_length(metadata::text), memory_size"
            f" FROM {bank.partition} WHERE bank_id = %(bank)s AND external_id > %(after)s"
            f" AND {filter_sql(conditions, params)} ORDER BY external_id LIMIT %(limit)s"
        )
        async with _bank_partition(bank), driver_reads(self.engine) as driver:
            rows = await (await driver.execute(sql, params, prepare=False if conditions else None)).fetchall()
        return [(row[0], int(row[1]), int(row[2])) for row in rows]

    async def delete(self, bank: Bank, external_ids: list[str]) -> int:
        async with _bank_partition(bank), self.engine.begin() as conn:
            result = await conn.execute(
                text(f"DELETE FROM {bank.partition} WHERE external_id = ANY(:ids)"), {"ids": list(external_ids)}
            )
        return result.rowcount

    async def stats(self, bank: Bank) -> dict[str, int]:
        async with _bank_partition(bank), self.reads.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT count(*), count(memory), coalesce(sum(memory_size), 0),"
                        f" coalesce(sum(octet_length(text)), 0) FROM {bank.partition}"
                    )
                )
            ).one()
        return {"references": int(row[0]), "with_memory": int(row[1]), "memory_bytes": int(row[2]), "text_bytes": int(row[3])}
