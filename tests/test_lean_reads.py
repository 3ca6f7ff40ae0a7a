"""The lean read path (issue 18 item 5), through real gRPC and PostgreSQL + pgvector.

* Retrieve with memories reads them in its search statement, and Fetch reads in one statement:
  the answers are exactly what the two-step path (search, then load each group of memories) gave,
  with filters, ranks, scores and texts, and when read_batch_bytes lets only some memories come
  with the first statement (the rest are read in groups, as before).
* Tenant scoping holds on the one-statement path.
* The pool hands out no connection the database has closed, without a ping per checkout: calls
  right after the server's connections were terminated succeed on their first attempt.
"""

from __future__ import annotations

import grpc
import numpy as np
import psycopg
import pytest
from conftest import ServerThread, make_settings
from sqlalchemy.engine import make_url

from helpers import FINGERPRINT, SPEC, memory_payload, unit_vectors
from memory3.core.metadata import conditions_from_filter
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import Client
from memory3.service.bank_store import BankStore
from memory3.service.db import create_engine_for
from memory3.service.embedded_pg import libpq_url
from memory3.service.reference_store import ReferenceStore
from memory3.v1 import memories_pb2, memories_pb2_grpc

DIM = 8
N = 90
FILTERS = (None, {"parity": 1}, {"group": {"in": ["a", "c"]}}, {"n": {"gte": 30}}, {"group": "b", "n": {"lt": 60}})


def _refs() -> list[Reference]:
    vectors = unit_vectors(N, DIM, seed=21)
    return [Reference(f"r{i}", f"reference {i}", {"parity": i % 2, "group": "abc"[i % 3], "n": i}, v.tolist(),
                      memory_payload(seed=i) if i % 4 else None)
            for i, v in enumerate(vectors)]


@pytest.fixture(scope="module")
def bank(blocking):
    blocking.create_bank(BankInfo("lean", FINGERPRINT, SPEC, "client-embedder", DIM, "cosine"))
    refs = _refs()
    blocking.write_many("lean", refs, batch_size=45)
    return "lean", refs


@pytest.fixture(scope="module")
def small_batches(database_url, embedder):
    """A second server on the same database whose read_batch_bytes holds about two memories."""
    budget = int(2.5 * len(memory_payload(seed=1)))
    server = ServerThread(make_settings(database_url, max_memory_bytes=4 * 1024 * 1024, read_batch_bytes=budget),
                          embedder)
    yield server
    server.stop()


def _full(hit):
    return (hit.external_id, round(hit.score, 5), hit.rank, hit.text, hit.metadata, hit.memory_size,
            hit.memory_crc32, hit.memory)


def _queries():
    return [q.tolist() for q in unit_vectors(6, DIM, seed=22)]


def test_retrieve_with_memories_equals_search_then_fetch(blocking, bank):
    name, refs = bank
    for filter_ in FILTERS:
        for q in _queries():
            found = blocking.retrieve(name, vector=q, top_k=7, filter=filter_, include_memory=True)
            listed = blocking.retrieve(name, vector=q, top_k=7, filter=filter_)
            fetched = {r.external_id: r for r in blocking.fetch(name, [h.external_id for h in listed])}
            assert [h.external_id for h in found] == [h.external_id for h in listed] and found, filter_
            for hit, plain in zip(found, listed):
                assert (hit.score, hit.rank, hit.text, hit.metadata) == (plain.score, plain.rank, plain.text,
                                                                        plain.metadata)
                assert hit.memory == fetched[hit.external_id].memory == refs[int(hit.external_id[1:])].memory
                assert (hit.memory is not None) == bool(hit.memory_size)


async def test_one_statement_equals_the_two_step_store_path(database_url, bank, api_key):
    """ReferenceStore.search with a memory budget returns what search + load returned, row by row;
    rows past the budget carry their size and no memory."""
    name, refs = bank
    with psycopg.connect(libpq_url(database_url)) as conn:
        tenant_id = conn.execute("SELECT tenant_id FROM api_keys WHERE key_id = %s", (api_key[3:19],)).fetchone()[0]
    settings = make_settings(database_url)
    engine = create_engine_for(settings.database_url, settings)
    try:
        stored = await BankStore(engine).get(tenant_id, name)
        store = ReferenceStore(engine, settings.hnsw_ef_search, settings.filter_exact_rows)
        size = len(refs[1].memory)
        for filter_ in FILTERS:
            conditions = conditions_from_filter(filter_)
            for q in _queries():
                q = np.asarray(q, dtype=np.float32)
                two_step = await store.search(stored, q, 9, conditions)
                loaded = await store.load(stored, [r.external_id for r in two_step], True)
                for budget in (1 << 30, int(2.5 * size), 1):
                    one = await store.search(stored, q, 9, conditions, memory_budget=budget)
                    assert [r.external_id for r in one] == [r.external_id for r in two_step]
                    inline, total = 0, 0
                    for row, plain in zip(one, two_step):
                        assert (row.text, row.metadata, row.memory_size, row.memory_crc32) == (
                            plain.text, plain.metadata, plain.memory_size, plain.memory_crc32)
                        assert row.score == pytest.approx(plain.score, abs=1e-6)
                        total += row.memory_size
                        if total <= budget:
                            assert row.memory == loaded[row.external_id].memory
                            inline += 1
                        else:
                            assert row.memory is None
                    if budget == 1 << 30:
                        assert inline == len(one)
    finally:
        await engine.dispose()


def test_answers_are_the_same_when_memories_exceed_a_read_batch(server, small_batches, bank, api_key):
    """read_batch_bytes about two memories: the first statement brings the nearest that fit, the
    rest are read in groups; the answers equal the default server's, in the same order."""
    name, _ = bank
    with Client(server.target, api_key) as default, Client(small_batches.target, api_key) as small:
        for filter_ in FILTERS[:3]:
            for q in _queries()[:3]:
                options = dict(vector=q, top_k=9, filter=filter_, include_memory=True)
                assert [_full(h) for h in small.retrieve(name, **options)] == [
                    _full(h) for h in default.retrieve(name, **options)]
        ids = ["r5", "r0", "r5", "r17", "r3", "r4", "r88", "r2", "r9", "r1"]  # a duplicate; r0, r4, r88: no memory
        for include_memory in (True, False):
            expected = default.fetch(name, ids, include_memory=include_memory)
            assert [r.external_id for r in expected] == list(dict.fromkeys(ids))
            assert [_full(r) for r in small.fetch(name, ids, include_memory=include_memory)] == [
                _full(r) for r in expected]
        assert [r.external_id for r in small.fetch(name, ["r1", "nope", "r2"], allow_missing=True)] == ["r1", "r2"]
        for client in (small, default):
            with pytest.raises(grpc.RpcError) as err:
                client.fetch(name, ["r1", "nope", "r2", "gone"])
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "2 reference(s) not found" in err.value.details() and "'nope'" in err.value.details()


def test_one_statement_reads_stay_in_the_callers_tenant(server, new_tenant, bank):
    """Another tenant's bank of the same name, with the same ids: each caller reads its own."""
    name, refs = bank
    other = new_tenant()
    with Client(server.target, other.api_key) as client:
        client.create_bank(BankInfo(name, FINGERPRINT, SPEC, "client-embedder", DIM, "cosine"))
        theirs = [Reference(r.external_id, "theirs " + r.text, {"owner": "other"}, r.embedding,
                            memory_payload(seed=1000 + i)) for i, r in enumerate(refs[:20])]
        client.write_many(name, theirs)
        hits = client.retrieve(name, vector=refs[3].embedding, top_k=5, include_memory=True)
        assert hits and all(h.text.startswith("theirs ") and h.metadata == {"owner": "other"} for h in hits)
        assert hits[0].memory == theirs[3].memory
        fetched = client.fetch(name, ["r1", "r3"])
        assert [r.memory for r in fetched] == [theirs[1].memory, theirs[3].memory]
        assert client.fetch(name, ["r50"], allow_missing=True) == []  # only the first tenant has r50


def test_connections_closed_by_the_database_are_replaced_before_use(database_url, embedder, bank, api_key):
    """Every pooled connection of a server is terminated by PostgreSQL; the next calls (no client
    retry: a plain stub) succeed, because checkout sees the closed socket and connects anew."""
    app = "lean-pool-test"
    url = make_url(database_url).update_query_dict({"application_name": app}).render_as_string(hide_password=False)
    server = ServerThread(make_settings(url), embedder)
    name, refs = bank
    channel = grpc.insecure_channel(server.target)
    stub = memories_pb2_grpc.MemoriesStub(channel)
    metadata = (("authorization", f"Bearer {api_key}"),)
    request = memories_pb2.RetrieveRequest(bank=name, top_k=3, include_memory=True)
    request.vector.values.extend(refs[1].embedding)

    def calls() -> None:
        frames = [f for message in stub.Retrieve(request, metadata=metadata) for f in message.frames]
        assert frames[0].reference.external_id == "r1"
        fetched = [f for message in stub.Fetch(memories_pb2.FetchRequest(bank=name, external_ids=["r1", "r2"]),
                                               metadata=metadata) for f in message.frames]
        assert [f.reference.external_id for f in fetched if f.HasField("reference")] == ["r1", "r2"]

    try:
        for _ in range(3):
            calls()
        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            terminated = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
                " WHERE application_name = %s", (app,)).fetchone()[0]
        assert terminated >= 1
        for _ in range(3):
            calls()
    finally:
        channel.close()
        server.stop()


async def test_read_checkout_returns_connections_as_they_came(server, database_url):
    """driver_reads: autocommit for the read, off again in the pool; a failed statement leaves the
    connection usable; a statement cut short by cancellation leaves no statement running and a
    connection that works (psycopg cancels it on the server; one left in any other state than
    idle would be discarded)."""
    import asyncio

    from memory3.service.db import driver_reads

    settings = make_settings(database_url, db_pool_size=1, db_max_overflow=0)
    engine = create_engine_for(settings.database_url, settings)
    try:
        async with driver_reads(engine) as driver:
            assert driver.autocommit
            pid = driver.info.backend_pid
        async with engine.connect() as conn:  # the same pooled connection, as SQLAlchemy expects it
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw.info.backend_pid == pid and not raw.autocommit
        with pytest.raises(psycopg.errors.DivisionByZero):
            async with driver_reads(engine) as driver:
                await driver.execute("SELECT 1 / 0")
        async with driver_reads(engine) as driver:
            assert driver.info.backend_pid == pid
            assert (await (await driver.execute("SELECT 2")).fetchone()) == (2,)

        async def slow() -> None:
            async with driver_reads(engine) as driver:
                await driver.execute("SELECT pg_sleep(30)")

        task = asyncio.ensure_future(slow())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with driver_reads(engine) as driver:
            assert (await (await driver.execute("SELECT 3")).fetchone()) == (3,)
            running = await (await driver.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
            )).fetchone()
            assert running == (0,)
        async with engine.connect() as conn:
            assert not (await conn.get_raw_connection()).driver_connection.autocommit
        assert engine.sync_engine.pool.checkedout() == 0
    finally:
        await engine.dispose()
