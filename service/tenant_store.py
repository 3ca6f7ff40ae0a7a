"""Tenants and their API keys. A key is ``m3_<key id>_<secret>``; only sha256(secret) is stored
(keys are 256-bit random, so a fast hash is enough), compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .db import autocommit
from .errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from .invalidation import notify
from .metrics import CACHE_LOOKUPS

_KEY_HITS = CACHE_LOOKUPS.labels("api_key", "hit")  # resolved once: every call looks up

KEY_PATTERN = re.compile(r"m3_([0-9a-f]{16})_([A-Za-z0-9_-]{20,100})")  # patterns here fullmatch
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    created_at: datetime


def _hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class TenantStore:
    def __init__(self, engine: AsyncEngine, key_cache_seconds: float = 2.0) -> None:
        self.engine = engine
        self.key_cache_seconds = key_cache_seconds
        self._verified: dict[str, tuple[int, float]] = {}
        self._revoked_ids: set[str] = set()

    async def create(self, name: str) -> Tenant:
        if not TENANT_NAME.fullmatch(name or ""):
            raise InvalidArgument("tenant name must be 1-63 characters of letters, digits, '_', '.', '-'")
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    text(
                        "INSERT INTO tenants (name) VALUES (:name) ON CONFLICT (name) DO NOTHING "
                        "RETURNING id, name, created_at"
                    ),
                    {"name": name},
                )
            ).first()
        if row is None:
            raise AlreadyExists(f"tenant {name!r} already exists")
        return Tenant(*row)

    async def list(self) -> list[Tenant]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(text("SELECT id, name, created_at FROM tenants ORDER BY name"))
            return [Tenant(*r) for r in rows]

    async def issue_key(self, tenant_name: str, label: str = "") -> tuple[str, str]:
        """A new key for the tenant: (key id, the full key — shown once)."""
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        async with self.engine.begin() as conn:
            tenant_id = (
                await conn.execute(text("SELECT id FROM tenants WHERE name = :n"), {"n": tenant_name})
            ).scalar()
            if tenant_id is None:
                raise NotFound(f"tenant {tenant_name!r} not found")
            await conn.execute(
                text("INSERT INTO api_keys (key_id, tenant_id, secret_hash, label) VALUES (:k, :t, :h, :l)"),
                {"k": key_id, "t": tenant_id, "h": _hash_secret(secret), "l": label[:200]},
            )
        return key_id, f"m3_{key_id}_{secret}"

    async def revoke_key(self, key_id: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                text("UPDATE api_keys SET revoked_at = now() WHERE key_id = :k AND revoked_at IS NULL"), {"k": key_id}
            )
            if result.rowcount:  # every other service process forgets the key when this commits
                await notify(conn, "key", key_id)
        self.forget_key(key_id)
        if result.rowcount == 0:
            raise NotFound(f"no active key {key_id!r}")
        return True

    def forget_key(self, key_id: str) -> None:
        """A key was revoked (here, or through another process: its notice): drop it from the cache,
        and end running calls with it at their next message."""
        self._verified = {k: v for k, v in self._verified.items() if not k.startswith(f"m3_{key_id}_")}
        if len(self._revoked_ids) > 100_000:
            self._revoked_ids.clear()
        self._revoked_ids.add(key_id)

    def forget_all(self) -> None:
        """Drop every verified key (notices may have been missed): each is checked again on next use."""
        self._verified = {}

    def revoked_here(self, api_key: str) -> bool:
        """Whether this process revoked the key or heard it revoked (running calls with it end at their next message)."""
        return api_key[3:19] in self._revoked_ids

    async def tenant_for_key(self, api_key: str) -> int:
        """The tenant id a key belongs to; UNAUTHENTICATED for unknown, malformed or revoked keys."""
        cached = self._verified.get(api_key)
        if cached and time.monotonic() - cached[1] < self.key_cache_seconds:
            _KEY_HITS.inc()
            return cached[0]
        CACHE_LOOKUPS.labels("api_key", "miss").inc()
        match = KEY_PATTERN.fullmatch(api_key)
        if not match:
            raise Unauthenticated("malformed API key")
        key_id, secret = match.groups()
        async with autocommit(self.engine).connect() as conn:
            row = (
                await conn.execute(
                    text("SELECT tenant_id, secret_hash, revoked_at FROM api_keys WHERE key_id = :k"), {"k": key_id}
                )
            ).first()
        if row is None or row.revoked_at is not None or not hmac.compare_digest(row.secret_hash, _hash_secret(secret)):
            raise Unauthenticated("invalid or revoked API key")
        if len(self._verified) > 10_000:
            self._verified.clear()
        self._verified[api_key] = (row.tenant_id, time.monotonic())
        return row.tenant_id
