"""The proxy registry: safetensors weights of proxy policies, versioned per (tenant, name).

Publishing assigns the next version under a per-(tenant, name) advisory lock, so two trainers
publishing at once get distinct versions. Publishing the same weights with the same metadata as
an existing version returns that version (a retried Publish whose reply was lost does not create
a second one). Rows are immutable after insert, so Get streams weights chunk by chunk with
``substring`` on the EXTERNAL (uncompressed, out-of-line) column without holding a connection."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .errors import FailedPrecondition, InvalidArgument, NotFound


@dataclass
class ProxyRecord:
    name: str
    version: int
    model_fingerprint: str
    parent_version: int
    metrics: dict[str, float]
    config_json: str
    weights_size: int
    weights_sha256: bytes
    created_at: datetime | None = None
    id: int = 0

    def same_publication(self, other: "ProxyRecord") -> bool:
        """Same weights and metadata: a re-publish, not a new version."""
        return (
            self.weights_sha256, self.weights_size, self.model_fingerprint, self.parent_version,
            self.metrics, json.loads(self.config_json),
        ) == (
            other.weights_sha256, other.weights_size, other.model_fingerprint, other.parent_version,
            other.metrics, json.loads(other.config_json),
        )


_COLUMNS = (
    "id, name, version, model_fingerprint, parent_version, metrics, config_json, weights_size, weights_sha256,"
    " created_at"
)


def _record(row) -> ProxyRecord:
    return ProxyRecord(
        row.name, row.version, row.model_fingerprint, row.parent_version, dict(row.metrics), row.config_json,
        row.weights_size, bytes(row.weights_sha256), row.created_at, row.id,
    )


def encode_page_token(record: ProxyRecord) -> str:
    return f"{record.version}:{record.name}"


def decode_page_token(token: str) -> tuple[str, int]:
    if not token:
        return "", 0
    version, sep, name = token.partition(":")
    if not sep or not version.isdigit():
        raise InvalidArgument("page_token is not one this service issued")
    return name, int(version)


class ProxyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def stage_chunk(self, upload_id: uuid.UUID, seq: int, data: bytes) -> None:
        """Keep one piece of an upload in the UNLOGGED staging table (its own short transaction)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO upload_chunks (upload_id, seq, data) VALUES (:u, :s, :d)"),
                {"u": upload_id, "s": seq, "d": data},
            )

    async def discard_upload(self, upload_id: uuid.UUID) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text("DELETE FROM upload_chunks WHERE upload_id = :u"), {"u": upload_id})

    async def publish(self, tenant_id: int, record: ProxyRecord, upload_id: uuid.UUID) -> tuple[ProxyRecord, bool]:
        """Store a new version from a staged upload (or find the identical one); (record, created).
        PostgreSQL joins the staged pieces itself: the weights never sit whole in this process."""
        async with self.engine.begin() as conn:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"proxy:{tenant_id}:{record.name}"}
            )
            rows = await conn.execute(
                text(
                    f"SELECT {_COLUMNS} FROM proxies WHERE tenant_id = :t AND name = :n"
                    " AND weights_sha256 = :sha ORDER BY version"
                ),
                {"t": tenant_id, "n": record.name, "sha": record.weights_sha256},
            )
            for existing in map(_record, rows):
                if existing.same_publication(record):
                    return existing, False
            if record.parent_version:
                parent = (
                    await conn.execute(
                        text("SELECT model_fingerprint FROM proxies WHERE tenant_id = :t AND name = :n AND version = :v"),
                        {"t": tenant_id, "n": record.name, "v": record.parent_version},
                    )
                ).first()
                if parent is None:
                    raise NotFound(f"parent version {record.parent_version} of proxy {record.name!r} not found")
                if parent.model_fingerprint != record.model_fingerprint:
                    raise FailedPrecondition(
                        f"parent version {record.parent_version} of proxy {record.name!r} belongs to another model"
                    )
            row = (
                await conn.execute(
                    text(
                        "INSERT INTO proxies (tenant_id, name, version, model_fingerprint, parent_version, metrics,"
                        " config_json, weights, weights_size, weights_sha256)"
                        " SELECT :t, :n, coalesce(max(version), 0) + 1, :f, :p, CAST(:m AS jsonb), :c,"
                        " (SELECT string_agg(data, ''::bytea ORDER BY seq) FROM upload_chunks WHERE upload_id = :u),"
                        " :size, :sha"
                        f" FROM proxies WHERE tenant_id = :t AND name = :n RETURNING {_COLUMNS}"
                    ),
                    {
                        "t": tenant_id, "n": record.name, "f": record.model_fingerprint, "p": record.parent_version,
                        "m": json.dumps(record.metrics), "c": record.config_json, "u": upload_id,
                        "size": record.weights_size, "sha": record.weights_sha256,
                    },
                )
            ).one()
            await conn.execute(text("DELETE FROM upload_chunks WHERE upload_id = :u"), {"u": upload_id})
        return _record(row), True

    async def get(self, tenant_id: int, name: str, version: int) -> ProxyRecord:
        """A version (0: the latest) of the caller's proxy; another tenant's does not exist."""
        condition = "AND version = :v" if version else ""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        f"SELECT {_COLUMNS} FROM proxies WHERE tenant_id = :t AND name = :n {condition}"
                        " ORDER BY version DESC LIMIT 1"
                    ),
                    {"t": tenant_id, "n": name, "v": version},
                )
            ).first()
        if row is None:
            raise NotFound(f"proxy {name!r}" + (f" version {version}" if version else "") + " not found")
        return _record(row)

    async def weights_chunk(self, tenant_id: int, record: ProxyRecord, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of the weights (EXTERNAL storage: only those TOAST chunks are read).
        Scoped by tenant like every other statement on proxies (on Citus, distributed by tenant, a
        statement without it would go to every shard: docs/scaling.md)."""
        async with self.engine.connect() as conn:
            return bytes(
                (
                    await conn.execute(
                        text("SELECT substring(weights FROM :start FOR :n) FROM proxies"
                             " WHERE tenant_id = :t AND id = :id"),
                        {"start": offset + 1, "n": size, "t": tenant_id, "id": record.id},
                    )
                ).scalar_one()
            )

    async def list(self, tenant_id: int, name: str, page_size: int, token: str) -> tuple[list[ProxyRecord], str]:
        page_size = min(max(page_size or 100, 1), 1000)
        after_name, after_version = decode_page_token(token)
        condition = "AND name = :n" if name else ""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    f"SELECT {_COLUMNS} FROM proxies WHERE tenant_id = :t {condition}"
                    " AND (name, version) > (:after_name, :after_version) ORDER BY name, version LIMIT :lim"
                ),
                {"t": tenant_id, "n": name, "after_name": after_name, "after_version": after_version, "lim": page_size + 1},
            )
            records = [_record(r) for r in rows]
        more = len(records) > page_size
        records = records[:page_size]
        return records, (encode_page_token(records[-1]) if more else "")
