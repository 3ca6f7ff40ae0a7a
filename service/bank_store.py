"""Banks: one memory bank per (tenant, name), each with its own partition of memory_references
and its own HNSW index over embeddings of the bank's dimension (see migration 0001 for why)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from memory3.core.banks import BankInfo
from memory3.core.codebook_format import CodebookError, canonical_digest, read_codebook
from memory3.core.memory_spec import MemorySpec

from .db import autocommit
from .errors import AlreadyExists, InvalidArgument, NotFound
from .invalidation import notify
from .metrics import CACHE_LOOKUPS

_BANK_HITS = CACHE_LOOKUPS.labels("bank", "hit")  # resolved once: every call looks up

BANK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # whole name: fullmatch
METRICS = {
    # metric: (pgvector operator, operator class, distance -> score SQL)
    "cosine": ("<=>", "vector_cosine_ops", "1 - ({d})"),
    "l2": ("<->", "vector_l2_ops", "-({d})"),
    "ip": ("<#>", "vector_ip_ops", "-({d})"),
}


@dataclass(frozen=True)
class Bank:
    id: int
    tenant_id: int
    name: str
    model_fingerprint: str
    spec: MemorySpec
    embedder_name: str
    embedder_dim: int
    metric: str
    created_at: datetime

    @property
    def partition(self) -> str:
        """Name of the bank's own table (a partition of memory_references)."""
        return f"memory_references_b{self.id}"

    def info(self) -> BankInfo:
        """The definition clients see (no ids)."""
        return BankInfo(self.name, self.model_fingerprint, self.spec, self.embedder_name, self.embedder_dim,
                        self.metric, self.created_at)

    def same_definition(self, other: "Bank") -> bool:
        return (self.model_fingerprint, self.spec, self.embedder_name, self.embedder_dim, self.metric) == (
            other.model_fingerprint, other.spec, other.embedder_name, other.embedder_dim, other.metric,
        )


def check_bank_name(name: str) -> None:
    if not BANK_NAME.fullmatch(name or ""):
        raise InvalidArgument("bank name must be 1-128 characters of letters, digits, '_', '.', '-'")


def _bank_from_row(row) -> Bank:
    spec = row.memory_spec if isinstance(row.memory_spec, dict) else json.loads(row.memory_spec)
    return Bank(
        row.id, row.tenant_id, row.name, row.model_fingerprint, MemorySpec.from_dict(spec),
        row.embedder_name, row.embedder_dim, row.metric, row.created_at,
    )


_COLUMNS = "id, tenant_id, name, model_fingerprint, memory_spec, embedder_name, embedder_dim, metric, created_at"


class BankStore:
    def __init__(
        self, engine: AsyncEngine, hnsw_m: int = 16, hnsw_ef_construction: int = 64, cache_seconds: float = 2.0
    ) -> None:
        self.engine = engine
        self.cache_seconds = cache_seconds
        self._cache: dict[tuple[int, str], tuple[Bank, float]] = {}
        self.reads = autocommit(engine)
        self.hnsw_m = hnsw_m
        self.hnsw_ef_construction = hnsw_ef_construction

    async def create(self, bank: Bank, before_creating=None) -> tuple[Bank, bool]:
        """Create the bank (and its partition and index); (bank, created). Same definition: idempotent.
        ``before_creating`` (a coroutine function) runs only when a new bank is about to be made (quota)."""
        check_bank_name(bank.name)
        async with self.engine.begin() as conn:
            # Serialise creators of the same name so two concurrent creates cannot both make one.
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"bank:{bank.tenant_id}:{bank.name}"}
            )
            existing = await self._get(conn, bank.tenant_id, bank.name)
            if existing is not None:
                if existing.same_definition(bank):
                    return existing, False
                raise AlreadyExists(f"bank {bank.name!r} already exists with a different definition")
            if before_creating is not None:
                await before_creating()
            row = (
                await conn.execute(
                    text(
                        "INSERT INTO banks (tenant_id, name, model_fingerprint, memory_spec, embedder_name,"
                        " embedder_dim, metric) VALUES (:t, :n, :f, CAST(:s AS jsonb), :en, :ed, :m)"
                        f" RETURNING {_COLUMNS}"
                    ),
                    {
                        "t": bank.tenant_id, "n": bank.name, "f": bank.model_fingerprint,
                        "s": json.dumps(bank.spec.to_dict()), "en": bank.embedder_name,
                        "ed": bank.embedder_dim, "m": bank.metric,
                    },
                )
            ).first()
            created = _bank_from_row(row)
            await self._create_partition(conn, created)
        return created, True

    async def _create_partition(self, conn: AsyncConnection, bank: Bank) -> None:
        """Make the bank's table on its own, then attach it: ATTACH PARTITION takes only SHARE
        UPDATE EXCLUSIVE on the shared parent (CREATE TABLE ... PARTITION OF would take ACCESS
        EXCLUSIVE), so other banks' reads and writes go on meanwhile. The CHECK constraint spares
        the attach a validating scan."""
        # Identifiers come from integers and a closed table of metrics, never from user text.
        _, opclass, _ = METRICS[bank.metric]
        table = bank.partition
        await conn.execute(
            text(
                f"CREATE TABLE {table} (LIKE memory_references INCLUDING DEFAULTS INCLUDING STORAGE,"
                f" CONSTRAINT {table}_bank CHECK (bank_id IS NOT NULL AND bank_id = {int(bank.id)}))"
            )
        )
        await conn.execute(text(f"ALTER TABLE {table} ADD PRIMARY KEY (bank_id, external_id)"))
        await conn.execute(
            text(f"ALTER TABLE memory_references ATTACH PARTITION {table} FOR VALUES IN ({int(bank.id)})")
        )
        await conn.execute(
            text(
                f"CREATE INDEX {table}_hnsw ON {table} USING hnsw "
                f"((embedding::vector({int(bank.embedder_dim)})) {opclass}) "
                f"WITH (m = {int(self.hnsw_m)}, ef_construction = {int(self.hnsw_ef_construction)})"
            )
        )
        await conn.execute(text(f"CREATE INDEX {table}_metadata ON {table} USING gin (metadata jsonb_path_ops)"))

    async def _get(self, conn: AsyncConnection, tenant_id: int, name: str) -> Bank | None:
        row = (
            await conn.execute(
                text(f"SELECT {_COLUMNS} FROM banks WHERE tenant_id = :t AND name = :n"), {"t": tenant_id, "n": name}
            )
        ).first()
        return _bank_from_row(row) if row else None

    async def get(self, tenant_id: int, name: str) -> Bank:
        """The caller's bank; another tenant's bank of the same name does not exist for the caller.

        Bank definitions never change, so they are cached briefly; a bank deleted through another
        replica shows up as a missing partition, which the reference store reports as NOT_FOUND."""
        check_bank_name(name)
        cached = self._cache.get((tenant_id, name))
        if cached and time.monotonic() - cached[1] < self.cache_seconds:
            _BANK_HITS.inc()
            return cached[0]
        CACHE_LOOKUPS.labels("bank", "miss").inc()
        async with self.reads.connect() as conn:
            bank = await self._get(conn, tenant_id, name)
        if bank is None:
            raise NotFound(f"bank {name!r} not found")
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[(tenant_id, name)] = (bank, time.monotonic())
        return bank

    def forget(self, tenant_id: int, name: str) -> None:
        """Drop a bank from the cache (deleted, here or through another process)."""
        self._cache.pop((tenant_id, name), None)

    def forget_all(self) -> None:
        self._cache = {}

    async def list(self, tenant_id: int, page_size: int, after: str) -> tuple[list[Bank], str]:
        page_size = min(max(page_size or 100, 1), 1000)
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    f"SELECT {_COLUMNS} FROM banks WHERE tenant_id = :t AND name > :after "
                    "ORDER BY name LIMIT :lim"
                ),
                {"t": tenant_id, "after": after or "", "lim": page_size + 1},
            )
            banks = [_bank_from_row(r) for r in rows]
        more = len(banks) > page_size
        banks = banks[:page_size]
        return banks, (banks[-1].name if more else "")

    async def delete(self, tenant_id: int, name: str) -> int:
        """Drop the bank with its partition; returns how many references went with it.

        The bank's row goes first (from then on the bank does not exist for anyone), then its table
        is detached CONCURRENTLY (SHARE UPDATE EXCLUSIVE on the parent: other banks' reads and
        writes go on) and dropped. A partition left behind by a crash in between is dropped by
        :meth:`drop_orphans` at the next start."""
        async with self.engine.begin() as conn:
            bank = await self._get(conn, tenant_id, name)
            if bank is None:
                raise NotFound(f"bank {name!r} not found")
            count = (await conn.execute(text(f"SELECT count(*) FROM {bank.partition}"))).scalar()
            await conn.execute(text("DELETE FROM banks WHERE id = :id"), {"id": bank.id})
            await notify(conn, "bank", tenant_id, bank.id, name)  # other processes drop it from their caches
        self.forget(tenant_id, name)
        await self._drop_partition(bank.partition)
        return int(count)

    async def _drop_partition(self, table: str) -> None:
        async with self.reads.connect() as conn:  # DETACH ... CONCURRENTLY cannot run in a transaction
            attached = (
                await conn.execute(text("SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(:t)"), {"t": table})
            ).first()
            if attached:
                await conn.execute(text(f"ALTER TABLE memory_references DETACH PARTITION {table} CONCURRENTLY"))
            await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))

    async def drop_orphans(self) -> int:
        """Drop bank tables whose bank no longer exists (a delete interrupted between its steps)."""
        async with self.reads.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT c.relname FROM pg_class c WHERE c.relname ~ '^memory_references_b[0-9]+$'"
                    " AND c.relkind = 'r' AND NOT EXISTS (SELECT 1 FROM banks b"
                    " WHERE c.relname = 'memory_references_b' || b.id)"
                )
            )
            orphans = [r.relname for r in rows]
        for table in orphans:
            await self._drop_partition(table)
        return len(orphans)


@dataclass(frozen=True)
class StoredCodebook:
    version: int
    digest: bytes
    blob: bytes | None
    size: int
    created_at: datetime


class CodebookStore:
    """PQ codebooks of a bank: validated and digested with the shared format reader (memory3.core)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.reads = autocommit(engine)
        self._digests: dict[tuple[int, int], bytes] = {}

    async def put(self, bank: Bank, blob: bytes, cpu) -> tuple[StoredCodebook, bool]:
        """Validate (on the CPU pool: parsing and digesting are heavy) and store a codebook version."""

        def parse():
            codebook, arrays = read_codebook(blob)
            codebook.check_shape(len(bank.spec.memory_layers), bank.spec.kv_heads, bank.spec.head_dim)
            return codebook, arrays, canonical_digest(codebook, arrays)

        try:
            codebook, arrays, digest = await cpu.run(parse)
        except CodebookError as err:
            raise InvalidArgument(f"invalid codebook: {err}") from None
        if codebook.fingerprint != bank.model_fingerprint:
            raise InvalidArgument(
                f"codebook was trained for model {codebook.fingerprint[:12]}…, bank {bank.name!r} holds "
                f"memories of {bank.model_fingerprint[:12]}…"
            )
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "INSERT INTO bank_codebooks (bank_id, version, digest, blob) VALUES (:b, :v, :d, :blob)"
                        " ON CONFLICT (bank_id, version) DO NOTHING RETURNING created_at"
                    ),
                    {"b": bank.id, "v": codebook.version, "d": digest, "blob": blob},
                )
            ).first()
            if row is not None:
                return StoredCodebook(codebook.version, digest, None, len(blob), row.created_at), True
            existing = (
                await conn.execute(
                    text("SELECT digest, octet_length(blob) AS size, created_at FROM bank_codebooks"
                         " WHERE bank_id = :b AND version = :v"),
                    {"b": bank.id, "v": codebook.version},
                )
            ).one()
        if bytes(existing.digest) != digest:
            raise AlreadyExists(f"bank {bank.name!r} already has a different codebook version {codebook.version}")
        return StoredCodebook(codebook.version, digest, None, existing.size, existing.created_at), False

    async def get(self, bank: Bank, version: int) -> StoredCodebook:
        """A codebook by version, or the newest for version 0."""
        where = "version = :v" if version else "true"
        async with self.reads.connect() as conn:
            row = (
                await conn.execute(
                    text(f"SELECT version, digest, blob, created_at FROM bank_codebooks WHERE bank_id = :b AND {where}"
                         " ORDER BY version DESC LIMIT 1"),
                    {"b": bank.id, "v": version},
                )
            ).first()
        if row is None:
            what = f"version {version}" if version else "any codebook"
            raise NotFound(f"bank {bank.name!r} has no codebook {what}".replace("no codebook any", "no"))
        return StoredCodebook(row.version, bytes(row.digest), bytes(row.blob), len(row.blob), row.created_at)

    def forget(self, bank_id: int) -> None:
        """Drop a deleted bank's digests (a stored version never changes; a new bank has a new id)."""
        self._digests = {key: value for key, value in self._digests.items() if key[0] != bank_id}

    async def digest(self, bank: Bank, version: int) -> bytes | None:
        """Digest of a stored codebook version (cached: a stored version never changes)."""
        key = (bank.id, version)
        if key not in self._digests:
            async with self.reads.connect() as conn:
                found = (
                    await conn.execute(
                        text("SELECT digest FROM bank_codebooks WHERE bank_id = :b AND version = :v"),
                        {"b": bank.id, "v": version},
                    )
                ).scalar()
            if found is None:
                return None
            self._digests[key] = bytes(found)
        return self._digests[key]
