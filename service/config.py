"""The service's configuration: one table, each key with its default, env override and doc.

Every key reads from ``MEMORY3_<KEY>`` (e.g. ``MEMORY3_PORT``); the database URL also reads the
conventional ``DATABASE_URL``. Every key can also come from a file named by ``MEMORY3_<KEY>_FILE``
(``DATABASE_URL_FILE`` too), the convention of Docker and Kubernetes secrets: a secret then never
sits in the environment. No other module reads ``os.environ``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


ADMIN_KEY_FILE = "admin.key"
"""Where, under data_dir, the server keeps the admin key it made (no admin_key set)."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMORY3_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "MEMORY3_DATABASE_URL"),
        description="PostgreSQL (with pgvector) URL; unset: an embedded PostgreSQL under data_dir",
    )
    database_password: str | None = Field(
        default=None,
        description="Password for database_url when the URL carries none (best from MEMORY3_DATABASE_PASSWORD_FILE)",
    )
    replica_urls: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="Read replicas (PostgreSQL streaming standbys of database_url), comma-separated URLs; "
                    "Retrieve, Fetch, Stats, Scroll, trajectory Read/Export/Count and proxy Get/List go to them "
                    "(docs/design.md, 'Replicas and service processes'); empty: every call uses the primary. database_password "
                    "applies to a URL without one")
    replica_max_lag_seconds: float = Field(
        default=5.0, gt=0,
        description="A replica that has not replayed what the primary had this long ago is skipped (its reads "
                    "go to another replica or the primary) until it catches up")
    replica_check_seconds: float = Field(
        default=0.5, gt=0, description="How often each replica's replay position and lag are measured")
    replica_timeout_seconds: float = Field(
        default=2.0, gt=0,
        description="Connect and check deadline for a replica; one that does not answer in time is skipped")
    consistency_wait_seconds: float = Field(
        default=0.0, ge=0, le=5,
        description="A read presenting a consistency token waits at most this long for a replica to replay "
                    "past it before going to the primary (0: to the primary at once)")
    data_dir: Path = Field(
        default=Path("~/.local/share/memory3").expanduser(),
        description="Where the embedded PostgreSQL keeps its data between runs",
    )
    host: str = Field(default="127.0.0.1", description="Address the gRPC server binds")
    tls_cert_file: Path | None = Field(
        default=None, description="Server certificate chain (PEM) for gRPC over TLS; with tls_key_file. Unset: plain gRPC")
    tls_key_file: Path | None = Field(default=None, description="Private key (PEM) of tls_cert_file")
    ca_file: Path | None = Field(
        default=None, description="Client commands: CA (PEM) that signed the server's certificate; set: connect with TLS")
    tls: bool = Field(default=False, description="Client commands: connect with TLS, trusting the system's CAs")
    port: int = Field(default=50051, description="gRPC port (0: pick a free one)")
    admin_key: str | None = Field(
        default=None, description="Key for the admin-only Tenants service; unset: one is made and kept in data_dir/admin.key"
    )
    max_message_bytes: int = Field(
        default=8 * MiB, description="Largest single gRPC message accepted or sent (RESOURCE_EXHAUSTED beyond)"
    )
    chunk_bytes: int = Field(default=1 * MiB, description="Size of memory payload chunks in streamed responses")
    max_memory_bytes: int = Field(default=64 * MiB, description="Largest encoded memory of one reference")
    max_text_bytes: int = Field(default=64 * 1024, description="Largest reference text (UTF-8 bytes)")
    max_metadata_bytes: int = Field(default=16 * 1024, description="Largest metadata map of one reference")
    max_top_k: int = Field(default=1024, description="Largest top_k a Retrieve may ask for")
    max_fetch_ids: int = Field(default=10_000, description="Most ids in one Fetch or Delete")
    write_batch_rows: int = Field(default=256, description="Rows staged per binary COPY batch in a Write")
    log_batch_episodes: int = Field(default=512, description="Episodes staged per binary COPY batch in a trajectory Log stream")
    max_episode_tokens: int = Field(default=65_536, description="Most prompt + response tokens of one logged episode")
    max_episode_decisions: int = Field(default=65_536, description="Most proxy decisions of one logged episode")
    max_hidden_state_bytes: int = Field(default=4 * MiB, description="Largest compressed hidden states of one episode")
    max_episode_text_bytes: int = Field(
        default=1 * MiB, description="Largest prompt or response text of one logged episode (UTF-8 bytes)")
    read_page_episodes: int = Field(default=256, description="Episodes per Read page when the caller does not say")
    max_read_page_episodes: int = Field(default=4096, description="Largest Read page a caller may ask for")
    max_proxy_bytes: int = Field(default=512 * MiB, description="Largest proxy weights file Publish accepts")
    db_pool_size: int = Field(default=10, description="Database connections kept open")
    db_max_overflow: int = Field(default=20, description="Extra connections allowed under load")
    hnsw_m: int = Field(default=16, description="HNSW graph degree of each bank's index")
    hnsw_ef_construction: int = Field(default=64, description="HNSW build-time candidate list size")
    hnsw_ef_search: int = Field(default=200, description="HNSW query-time candidate list size (recall@5 0.94 at 100, see bench)")
    filter_exact_rows: int = Field(
        default=5000, description="Retrieve ranks exactly, without HNSW, when a filter's eq/in conditions leave at most "
        "this many references (0: never; bench/bench_filters.py)")
    torch_threads: int = Field(default=0, description="torch threads for the built-in embedder (0: torch's default)")
    query_cache_size: int = Field(default=4096, description="Query texts whose embeddings are kept (LRU; 0: off)")
    embedder_device: str = Field(default="cpu", description="torch device of the built-in text embedder")
    embed_batch_max: int = Field(
        default=8, ge=1,
        description="Most texts per embedder call when concurrent requests are coalesced; on a CPU a batch costs "
                    "about its size in single calls, so a small cap answers the earliest requests sooner (raise it "
                    "for a GPU embedder, where batches are nearly free)")
    grace_seconds: float = Field(default=10.0, description="How long shutdown waits for in-flight calls")
    drain_notice_seconds: float = Field(
        default=2.0, ge=0,
        description="On shutdown, how long health answers NOT_SERVING while the listener still accepts calls")
    stream_idle_seconds: float = Field(
        default=30.0, gt=0,
        description="Longest wait for a stream's next request message, or for the client to take the next "
                    "response message; beyond it DEADLINE_EXCEEDED and the call's slot is freed")
    max_call_seconds: float = Field(
        default=3600.0, gt=0, description="Longest any one call may run (streams resume by cursor); then DEADLINE_EXCEEDED")
    keepalive_seconds: float = Field(default=60.0, gt=0, description="Server pings an idle connection this often")
    keepalive_timeout_seconds: float = Field(default=20.0, gt=0, description="A ping unanswered this long closes the connection")
    max_connection_idle_seconds: float = Field(default=300.0, gt=0, description="A connection with no call this long is closed")
    max_connection_age_seconds: float = Field(
        default=3600.0, gt=0, description="Connections are closed (gracefully; clients reconnect) after this long")
    max_concurrent_streams: int = Field(default=100, ge=1, description="Concurrent calls one connection may hold")
    cpu_workers: int = Field(
        default=2, ge=1,
        description="Threads for per-request CPU work (codec checks, hashing, overlap, page building) off the event loop")
    tenant_max_concurrent_calls: int = Field(
        default=32, ge=1, description="Quota 'concurrent_calls': calls one tenant may have in flight (override per tenant)")
    tenant_max_banks: int = Field(default=1000, ge=0, description="Quota 'banks': banks one tenant may hold (override per tenant)")
    tenant_max_stored_bytes: int = Field(
        default=100 * 1024 * MiB, ge=0,
        description="Quota 'stored_bytes': bytes one tenant may store — bank tables on disk, codebooks, proxy "
                    "weights, trajectories (override per tenant)")
    usage_cache_seconds: float = Field(default=5.0, ge=0, description="How long a tenant's measured storage use is reused")
    admin_failures_per_minute: int = Field(
        default=10, ge=1, description="Failed admin-key attempts one address may make per minute; beyond, refused unchecked")
    read_batch_bytes: int = Field(
        default=32 * MiB, ge=1, description="Bytes of references Fetch and Retrieve read from the database at a time")
    write_batch_bytes: int = Field(
        default=32 * MiB, ge=1, description="Bytes of a Write or Log stream held before they are staged in the database")
    key_cache_seconds: float = Field(
        default=2.0, ge=0,
        description="How long a verified API key is trusted unrechecked, should an invalidation notice be missed "
                    "(a revocation through another process is otherwise heard at once); also how often a running "
                    "stream re-checks its key")
    target: str | None = Field(default=None, description="Server the CLI's client commands talk to (default host:port)")
    api_key: str | None = Field(default=None, description="Key the CLI's client commands send (tenant or admin key)")
    bank_cache_seconds: float = Field(
        default=2.0, description="How long a bank definition is cached per service process, should the notice of its "
                                 "deletion through another process be missed")
    max_in_flight: int = Field(default=256, description="Concurrent calls served; beyond it RESOURCE_EXHAUSTED + pushback")
    metrics_port: int | None = Field(default=9464, description="Prometheus /metrics port (unset or -1: off; 0: any free port)")
    metrics_refresh_seconds: float = Field(default=30.0, description="How often bank-size gauges are refreshed")
    metrics_bank_labels: bool = Field(
        default=False,
        description="Also export per-bank sizes labelled with tenant and bank names (the metrics port has no auth)")
    log_format: str = Field(default="text", description="'text' or 'json' (one JSON object per line)")
    log_level: str = Field(default="INFO", description="Python logging level")

    @field_validator("replica_urls", mode="before")
    @classmethod
    def _split_urls(cls, value):
        """``MEMORY3_REPLICA_URLS`` (or its _FILE) is one comma-separated string; a list passes as is."""
        if isinstance(value, str):
            return [url.strip() for url in value.split(",") if url.strip()]
        return value


def _from_files(environ) -> dict[str, str]:
    """Values of ``MEMORY3_<KEY>_FILE`` (and ``DATABASE_URL_FILE``): each file's content, stripped."""
    found = {}
    for name in Settings.model_fields:
        for variable in (f"MEMORY3_{name.upper()}_FILE", *(("DATABASE_URL_FILE",) if name == "database_url" else ())):
            path = environ.get(variable)
            if path:
                try:
                    found[name] = Path(path).read_text().strip()
                except OSError as err:
                    raise ValueError(f"{variable}={path}: cannot read it ({err.strerror})") from None
    return found


def load_settings(**overrides) -> Settings:
    """Settings from the environment (and secret files), with explicit overrides (CLI flags, tests) on top."""
    values = _from_files(os.environ)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
