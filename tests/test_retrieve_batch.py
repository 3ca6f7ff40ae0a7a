"""RetrieveBatch through real gRPC and PostgreSQL + pgvector: one call answers every row of a
decoding batch exactly as one Retrieve per row would (ids, scores, ranks, memories, filters,
overlap rule, texts embedded by the built-in embedder), each distinct memory sent once, one SQL
statement walking the bank's HNSW index per row, and the same limits and refusals as Retrieve."""

import grpc
import numpy as np
import pytest

from helpers import FINGERPRINT, SPEC, expect_status, memory_payload, unit_vectors
from memory3.sdk.client import BankInfo, Reference
from memory3.v1 import memories_pb2

DIM = 8


@pytest.fixture
def vector_bank(client):
    client.create_bank(BankInfo("vb", FINGERPRINT, SPEC, "client-embedder", DIM, "cosine"))
    vectors = unit_vectors(120, DIM, seed=5)
    refs = [Reference(f"r{i}", f"reference {i}", {"parity": i % 2}, v.tolist(), memory_payload(seed=i) if i % 3 else None)
            for i, v in enumerate(vectors)]
    client.write_many("vb", refs, batch_size=60)
    return "vb", vectors, refs


def _key(hit):
    return hit.external_id, round(hit.score, 5), hit.rank, hit.memory_size, hit.memory_crc32, hit.metadata


def test_batch_equals_one_retrieve_per_row(client, vector_bank):
    bank, vectors, refs = vector_bank
    queries = unit_vectors(8, DIM, seed=9)
    queries[3] = queries[1]  # two rows asking the same: both answered
    for options in ({}, {"filter": {"parity": 1}}, {"top_k": 7, "include_text": False}):
        batch = client.retrieve_batch(bank, [q.tolist() for q in queries], **options)
        singles = [client.retrieve(bank, vector=q.tolist(), **options) for q in queries]
        assert [[_key(h) for h in row] for row in batch] == [[_key(h) for h in row] for row in singles]
        assert [[h.text for h in row] for row in batch] == [[h.text for h in row] for row in singles]
    exact = np.argsort(-(vectors @ queries[0]))[:5]
    assert [h.external_id for h in client.retrieve_batch(bank, [queries[0]])[0]] == [f"r{i}" for i in exact]


def test_memories_travel_once_and_match_retrieve(client, vector_bank):
    bank, _, refs = vector_bank
    queries = [q.tolist() for q in unit_vectors(6, DIM, seed=11)] * 2  # every memory asked for twice
    request = memories_pb2.RetrieveBatchRequest(bank=bank, top_k=5, include_memory=True)
    for q in queries:
        request.queries.add().vector.values.extend(q)
    rows = client.retrieve_batch(bank, queries, include_memory=True)
    for row, q in zip(rows, queries):
        single = client.retrieve(bank, vector=q, include_memory=True)
        assert [(h.external_id, h.memory) for h in row] == [(h.external_id, h.memory) for h in single]
        for hit in row:
            assert (hit.memory is not None) == bool(hit.memory_size)
            if hit.memory:
                assert hit.memory == refs[int(hit.external_id[1:])].memory
    # on the wire: each distinct memory's first frame once, however many rows found it
    stub = client.run(_raw_frames(client, request))
    distinct = {h.external_id for row in rows for h in row if h.memory_size}
    assert sorted(stub) == sorted(distinct)


async def _raw_frames(client, request):
    names = []
    async for message in client.aio.memories.RetrieveBatch(request, **client.aio._call()):
        names += [f.reference.external_id for f in message.frames if f.HasField("reference")]
    return names


def test_text_queries_and_overlap_rule(client):
    client.create_bank(BankInfo("tb", FINGERPRINT, SPEC))
    texts = ["Telik Works was founded by Zorvan Telik.", "Zorvan Telik was born in Oslen.",
             "Oslen is a city in Marvia.", "The Vorvu compass was invented in Oslen."]
    client.write("tb", [Reference(f"t{i}", t) for i, t in enumerate(texts)])
    questions = ["who founded Telik Works?", "where was Zorvan Telik born?", texts[2]]
    batch = client.retrieve_batch("tb", questions, top_k=2)
    assert batch[0][0].external_id == "t0" and batch[1][0].external_id == "t1"
    singles = [client.retrieve("tb", text=q, top_k=2) for q in questions]
    assert [[_key(h) for h in row] for row in batch] == [[_key(h) for h in row] for row in singles]
    kept = client.retrieve_batch("tb", questions, top_k=2, max_overlap=0.5)
    assert "t2" not in [h.external_id for h in kept[2]]  # its own text overlaps entirely
    assert [[h.external_id for h in row] for row in kept] == [
        [h.external_id for h in client.retrieve("tb", text=q, top_k=2, max_overlap=0.5)] for q in questions]
    mixed = client.retrieve_batch("tb", [questions[0], [1.0] * 384], top_k=1)  # texts and vectors together
    assert mixed[0][0].external_id == "t0" and len(mixed[1]) == 1


def test_limits_and_refusals(client, vector_bank, new_tenant, server):
    from memory3.sdk.client.client import Client

    bank, _, _ = vector_bank
    q = [1.0] + [0.0] * (DIM - 1)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "1 to 256 queries"):
        client.retrieve_batch(bank, [])
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "1 to 256 queries"):
        client.retrieve_batch(bank, [q] * 257, top_k=1)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit of 1024"):
        client.retrieve_batch(bank, [q] * 3, top_k=342)
    assert [len(r) for r in client.retrieve_batch(bank, [q] * 8, top_k=128)] == [120] * 8  # 1024: allowed
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "top_k must be positive"):
        client.retrieve_batch(bank, [q], top_k=-1)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "queries[1].vector has 3 dimensions"):
        client.retrieve_batch(bank, [q, [1.0, 0.0, 0.0]])
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "queries[0].vector contains NaN"):
        client.retrieve_batch(bank, [[float("nan")] * DIM])
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "queries[0]: bank 'vb' uses the client-side embedder"):
        client.retrieve_batch(bank, ["some text"])
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "queries[1] needs a query"):
        client.retrieve_batch(bank, [q, "  "])
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "every query must be a text"):
        client.retrieve_batch(bank, [q], max_overlap=0.5)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "max_overlap must be a fraction"):
        client.retrieve_batch(bank, [q], max_overlap=1.5)
    bad_where = memories_pb2.RetrieveBatchRequest(bank=bank, where=memories_pb2.MetadataFilter(
        conditions=[memories_pb2.MetadataCondition(key="parity", value_json="1")]))
    bad_where.queries.add().vector.values.extend(q)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "where.conditions[0].op"):
        client.run(_raw_frames(client, bad_where))
    other = new_tenant()
    with Client(server.target, other.api_key) as stranger:
        with expect_status(grpc.StatusCode.NOT_FOUND, "'vb'"):
            stranger.retrieve_batch(bank, [q])


def test_one_statement_walks_the_hnsw_index(client, vector_bank, database_url):
    """The batch statement's plan (as PostgreSQL would run it on a large bank): per query row, an
    index scan of the bank's HNSW index ordered by the distance to that row's vector."""
    import psycopg
    from pgvector.psycopg import register_vector

    from memory3.service.bank_store import Bank
    from memory3.service.reference_store import search_many_sql

    bank, vectors, _ = vector_bank
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://", 1)) as conn:
        register_vector(conn)
        bank_id, tenant_id = conn.execute("SELECT id, tenant_id FROM banks WHERE name = 'vb' ORDER BY id DESC").fetchone()
        info = Bank(bank_id, tenant_id, "vb", FINGERPRINT, SPEC, "client-embedder", DIM, "cosine", None)
        params = {"qs": list(vectors[:3]), "limit": 5}
        conn.execute("SET enable_seqscan = off")  # 120 rows: plan as for a bank too large to scan
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN " + search_many_sql(info, [], params), params))
    assert f"Index Scan using {info.partition}_hnsw" in plan and "Nested Loop" in plan, plan
