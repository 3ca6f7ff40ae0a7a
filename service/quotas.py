"""Per-tenant quotas: what one tenant may hold, so it cannot take the service from the others.

Three quotas, each with its default in the settings table and an optional per-tenant override
the admin sets through the Tenants service (``SetQuota``):

* ``concurrent_calls`` — calls in flight at once (enforced by the call guard on admission);
* ``banks`` — banks held (checked by CreateBank);
* ``stored_bytes`` — bank tables on disk (indexes and TOAST included), PQ codebooks, proxy
  weights and logged trajectories (checked by Write, Log, PutCodebook and Publish, before and at
  commit). Use is measured from the catalog and a trajectory ledger and reused for
  ``usage_cache_seconds``, so concurrent writers may overshoot by what they commit in that time.

Beyond a quota the call is RESOURCE_EXHAUSTED with a message naming the quota.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .config import Settings
from .db import autocommit
from .errors import InvalidArgument, NotFound, ResourceExhausted
from .invalidation import notify

QUOTA_SETTINGS = {
    "concurrent_calls": "tenant_max_concurrent_calls",
    "banks": "tenant_max_banks",
    "stored_bytes": "tenant_max_stored_bytes",
}
QUOTA_NAMES = tuple(QUOTA_SETTINGS)
OVERRIDE_CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class Usage:
    banks: int
    stored_bytes: int

    def of(self, quota: str) -> int | None:
        return {"banks": self.banks, "stored_bytes": self.stored_bytes}.get(quota)


@dataclass(frozen=True)
class Quota:
    name: str
    limit: int
    default: int
    overridden: bool
    used: int | None  # None for concurrent_calls (the guard counts those, per replica)


_USAGE_SQL = text(
    """
    SELECT
      (SELECT count(*) FROM banks WHERE tenant_id = :t) AS banks,
      (SELECT coalesce(sum(pg_total_relation_size(to_regclass('memory_references_b' || id))), 0)
         FROM banks WHERE tenant_id = :t)
      + (SELECT coalesce(sum(octet_length(c.blob)), 0) FROM bank_codebooks c JOIN banks b ON b.id = c.bank_id
         WHERE b.tenant_id = :t)
      + (SELECT coalesce(sum(weights_size), 0) FROM proxies WHERE tenant_id = :t)
      + (SELECT coalesce(sum(trajectory_bytes), 0) FROM tenant_usage WHERE tenant_id = :t) AS stored_bytes
    """
)


class QuotaStore:
    def __init__(self, engine: AsyncEngine, settings: Settings) -> None:
        self.engine = engine
        self.reads = autocommit(engine)
        self.settings = settings
        self._overrides: dict[int, tuple[dict[str, int], float]] = {}
        self._usage: dict[int, tuple[Usage, float]] = {}

    def default(self, name: str) -> int:
        return int(getattr(self.settings, QUOTA_SETTINGS[name]))

    async def overrides(self, tenant_id: int) -> dict[str, int]:
        cached = self._overrides.get(tenant_id)
        if cached and time.monotonic() - cached[1] < OVERRIDE_CACHE_SECONDS:
            return cached[0]
        async with self.reads.connect() as conn:
            rows = await conn.execute(text("SELECT name, value FROM tenant_quotas WHERE tenant_id = :t"), {"t": tenant_id})
            found = {r.name: int(r.value) for r in rows}
        if len(self._overrides) > 10_000:
            self._overrides.clear()
        self._overrides[tenant_id] = (found, time.monotonic())
        return found

    async def limit(self, tenant_id: int, name: str) -> int:
        return (await self.overrides(tenant_id)).get(name, self.default(name))

    async def usage(self, tenant_id: int, fresh: bool = False) -> Usage:
        cached = self._usage.get(tenant_id)
        if not fresh and cached and time.monotonic() - cached[1] < self.settings.usage_cache_seconds:
            return cached[0]
        async with self.reads.connect() as conn:
            row = (await conn.execute(_USAGE_SQL, {"t": tenant_id})).one()
        usage = Usage(int(row.banks), int(row.stored_bytes))
        if len(self._usage) > 10_000:
            self._usage.clear()
        self._usage[tenant_id] = (usage, time.monotonic())
        return usage

    async def check_banks(self, tenant_id: int) -> None:
        """Before creating a bank: refuse when the tenant holds its quota of banks already."""
        limit = await self.limit(tenant_id, "banks")
        used = (await self.usage(tenant_id, fresh=True)).banks
        if used >= limit:
            raise ResourceExhausted(f"quota 'banks' reached: the tenant holds {used} of {limit} banks")

    async def check_storage(self, tenant_id: int, adding: int = 0) -> None:
        """Before (adding=0) and at the commit of a write: refuse beyond the 'stored_bytes' quota."""
        limit = await self.limit(tenant_id, "stored_bytes")
        used = (await self.usage(tenant_id)).stored_bytes
        if used + adding > limit or (adding == 0 and used >= limit):
            raise ResourceExhausted(
                f"quota 'stored_bytes' reached: the tenant stores {used} bytes"
                + (f" and this call adds {adding}" if adding else "")
                + f"; its limit is {limit} (delete data, or ask the operator to raise it)"
            )

    async def _tenant_id(self, conn, tenant_name: str) -> int:
        tenant_id = (await conn.execute(text("SELECT id FROM tenants WHERE name = :n"), {"n": tenant_name})).scalar()
        if tenant_id is None:
            raise NotFound(f"tenant {tenant_name!r} not found")
        return int(tenant_id)

    async def set(self, tenant_name: str, name: str, value: int | None) -> None:
        """Override one quota of a tenant (None: back to the default)."""
        if name not in QUOTA_SETTINGS:
            raise InvalidArgument(f"quota name {name[:64]!r} is not one of {', '.join(QUOTA_NAMES)}")
        if value is not None and value < 0:
            raise InvalidArgument(f"quota {name!r}: value must not be negative, got {value}")
        async with self.engine.begin() as conn:
            tenant_id = await self._tenant_id(conn, tenant_name)
            if value is None:
                await conn.execute(text("DELETE FROM tenant_quotas WHERE tenant_id = :t AND name = :n"),
                                   {"t": tenant_id, "n": name})
            else:
                await conn.execute(
                    text("INSERT INTO tenant_quotas (tenant_id, name, value) VALUES (:t, :n, :v)"
                         " ON CONFLICT (tenant_id, name) DO UPDATE SET value = EXCLUDED.value"),
                    {"t": tenant_id, "n": name, "v": value},
                )
            await notify(conn, "quota", tenant_id)  # every other process re-reads the tenant's overrides
        self.forget(tenant_id)

    def forget(self, tenant_id: int) -> None:
        """Drop a tenant's cached overrides (changed, here or through another process)."""
        self._overrides.pop(tenant_id, None)

    def forget_all(self) -> None:
        self._overrides = {}

    async def describe(self, tenant_name: str) -> list[Quota]:
        async with self.reads.connect() as conn:
            tenant_id = await self._tenant_id(conn, tenant_name)
        self._overrides.pop(tenant_id, None)
        overrides = await self.overrides(tenant_id)
        usage = await self.usage(tenant_id, fresh=True)
        return [
            Quota(name, overrides.get(name, self.default(name)), self.default(name), name in overrides, usage.of(name))
            for name in QUOTA_NAMES
        ]
