"""Write -> Retrieve -> Fetch through real gRPC and PostgreSQL + pgvector: nearest neighbours,
idempotence, atomicity, chunked payloads, the built-in embedder, filters and bad input."""

import grpc
import numpy as np
import pytest

from helpers import FINGERPRINT, SPEC, expect_status, memory_payload, random_memory, unit_vectors
from memory3.core.blob import read_header
from memory3.core.memory_spec import MemorySpec
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.memory.codec import decode_memory

DIM = 16


@pytest.fixture
def vector_bank(client):
    client.create_bank(BankInfo("vec", FINGERPRINT, SPEC, "client-embedder", DIM, "cosine"))
    return "vec"


def _write_vectors(client, bank, vectors, with_memory=True):
    refs = [
        Reference(f"r{i}", f"reference {i}", {"parity": str(i % 2)}, v.tolist(), memory_payload(seed=i) if with_memory else None)
        for i, v in enumerate(vectors)
    ]
    return client.write_many(bank, refs, batch_size=50), refs


def test_retrieve_matches_exact_search(client, vector_bank):
    vectors = unit_vectors(300, DIM, seed=1)
    summary, refs = _write_vectors(client, vector_bank, vectors)
    assert (summary.inserted, summary.updated, summary.unchanged) == (300, 0, 0)
    queries = unit_vectors(20, DIM, seed=2)
    for q in queries:
        exact = np.argsort(-(vectors @ q))[:5]
        hits = client.retrieve(vector_bank, vector=q.tolist(), top_k=5, include_memory=True)
        assert [h.external_id for h in hits] == [f"r{i}" for i in exact]
        assert [h.rank for h in hits] == list(range(5))
        np.testing.assert_allclose([h.score for h in hits], (vectors @ q)[exact], atol=1e-4)
        for h in hits:
            assert h.memory == refs[int(h.external_id[1:])].memory
            assert read_header(h.memory).fingerprint == FINGERPRINT


def test_fetch_returns_exact_payloads_and_decodes(client, vector_bank):
    _, refs = _write_vectors(client, vector_bank, unit_vectors(10, DIM))
    got = client.fetch(vector_bank, ["r3", "r7", "r3"])
    assert [g.external_id for g in got] == ["r3", "r7"]
    assert got[0].memory == refs[3].memory and got[0].text == "reference 3" and got[0].metadata == {"parity": "1"}
    memory = decode_memory(got[0].memory)
    original = random_memory(seed=3)
    assert memory.kv.shape == original.kv.shape
    assert torch_cos(memory.kv, original.kv) > 0.99
    without = client.fetch(vector_bank, ["r3"], include_memory=False)
    assert without[0].memory is None and without[0].memory_size == len(refs[3].memory)
    with expect_status(grpc.StatusCode.NOT_FOUND, "'nope'"):
        client.fetch(vector_bank, ["r3", "nope"])
    assert [g.external_id for g in client.fetch(vector_bank, ["r3", "nope"], allow_missing=True)] == ["r3"]


def torch_cos(a, b):
    import torch

    return torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).item()


def test_rewrite_is_idempotent_and_updates_change(client, vector_bank):
    vectors = unit_vectors(20, DIM)
    _write_vectors(client, vector_bank, vectors)
    again, _ = _write_vectors(client, vector_bank, vectors)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 20)
    changed = client.write(vector_bank, [Reference("r0", "new text", {}, vectors[0].tolist(), memory_payload(seed=99))])
    assert (changed.inserted, changed.updated, changed.unchanged) == (0, 1, 0)
    assert client.fetch(vector_bank, ["r0"])[0].text == "new text"
    stats = client.stats(vector_bank)
    assert stats.references == 20 and stats.with_memory == 20
    assert stats.memory_bytes == sum(len(r.memory) for r in client.fetch(vector_bank, [f"r{i}" for i in range(20)]))


def test_same_id_twice_in_one_stream_keeps_the_last(client, vector_bank):
    v = unit_vectors(1, DIM)[0].tolist()
    summary = client.write(vector_bank, [Reference("x", "first", {}, v), Reference("x", "second", {}, v)])
    assert summary.inserted == 1
    assert client.fetch(vector_bank, ["x"])[0].text == "second"


def test_delete(client, vector_bank):
    _write_vectors(client, vector_bank, unit_vectors(10, DIM))
    assert client.delete(vector_bank, ["r1", "r2", "missing"]) == 2
    assert client.stats(vector_bank).references == 8
    hits = client.retrieve(vector_bank, vector=unit_vectors(1, DIM)[0].tolist(), top_k=10)
    assert {"r1", "r2"}.isdisjoint(h.external_id for h in hits) and len(hits) == 8


def test_metadata_filter(client, vector_bank):
    _write_vectors(client, vector_bank, unit_vectors(50, DIM))
    hits = client.retrieve(vector_bank, vector=unit_vectors(1, DIM, 5)[0].tolist(), top_k=10, filter={"parity": "1"})
    assert len(hits) == 10 and all(h.metadata["parity"] == "1" for h in hits)
    assert client.retrieve(vector_bank, vector=unit_vectors(1, DIM)[0].tolist(), filter={"parity": "7"}) == []


def test_large_memory_is_chunked_both_ways(client):
    big = MemorySpec((0, 1, 2, 3, 4, 5), 8, 128, 64, 128, "fp16")  # 1.5 MiB of fp16 before zstd
    client.create_bank(BankInfo("big", FINGERPRINT, big, "client", 4, "l2"))
    payload = memory_payload(big, scheme="fp16")
    assert len(payload) > 1024 * 1024
    client.write("big", [Reference("huge", "t", {}, [1, 0, 0, 0], payload)])
    assert client.fetch("big", ["huge"])[0].memory == payload
    assert client.retrieve("big", vector=[1, 0, 0, 0], include_memory=True)[0].memory == payload


def test_text_queries_use_the_builtin_embedder(client):
    client.create_bank(BankInfo("facts", FINGERPRINT, SPEC))
    facts = {
        "capital": "Mirath is the capital city of the kingdom of Zorvania.",
        "engine": "The Telik steam engine was invented by Ana Voss in 1921.",
        "fruit": "Bananas are a yellow tropical fruit rich in potassium.",
        "river": "The Oru river flows north through the Kessel valley.",
    }
    summary = client.write("facts", [Reference(k, v) for k, v in facts.items()])
    assert summary.inserted == 4
    assert client.retrieve("facts", text="Which city is Zorvania's capital?", top_k=1)[0].external_id == "capital"
    assert client.retrieve("facts", text="who invented the steam engine", top_k=1)[0].external_id == "engine"
    # a reference that contains most of the question is dropped when overlap is capped
    question = "Mirath is the capital city of the kingdom of which country?"  # 7 of 9 word trigrams copied
    assert client.retrieve("facts", text=question, top_k=1)[0].external_id == "capital"
    hits = client.retrieve("facts", text=question, top_k=4, max_overlap=2 / 3)
    assert "capital" not in [h.external_id for h in hits] and len(hits) == 3


def test_bad_writes_change_nothing(client, vector_bank):
    _write_vectors(client, vector_bank, unit_vectors(5, DIM))
    before = client.stats(vector_bank)
    good = Reference("new", "fine", {}, unit_vectors(1, DIM)[0].tolist(), memory_payload())
    other_spec = MemorySpec((0,), 2, 16, 4, 32, "int8")
    corrupt = bytearray(memory_payload())
    corrupt[40] ^= 0xFF
    cases = [
        (Reference("bad", "x", {}, [0.1] * (DIM + 1)), grpc.StatusCode.INVALID_ARGUMENT, "dimensions"),
        (Reference("bad", "x", {}, [float("nan")] * DIM), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
        (Reference("bad", "x", {}, [0.0] * DIM), grpc.StatusCode.INVALID_ARGUMENT, "zeros"),
        (Reference("bad", "x"), grpc.StatusCode.INVALID_ARGUMENT, "send a vector"),
        (Reference("", "x", {}, [0.1] * DIM), grpc.StatusCode.INVALID_ARGUMENT, "external_id"),
        (Reference("bad", "x", {}, [0.1] * DIM, bytes(corrupt)), grpc.StatusCode.INVALID_ARGUMENT, "checksum"),
        (Reference("bad", "x", {}, [0.1] * DIM, memory_payload()[:-9]), grpc.StatusCode.INVALID_ARGUMENT, "invalid memory"),
        (Reference("bad", "x", {}, [0.1] * DIM, memory_payload(other_spec)), grpc.StatusCode.INVALID_ARGUMENT, "does not match bank spec"),
        (Reference("bad", "x", {}, [0.1] * DIM, memory_payload(fingerprint="cd34" * 16)), grpc.StatusCode.INVALID_ARGUMENT, "model"),
        (Reference("bad", "x" * 70_000, {}, [0.1] * DIM), grpc.StatusCode.RESOURCE_EXHAUSTED, "text exceeds"),
        (Reference("bad", "x", {}, [0.1] * DIM, b"\0" * (4 * 1024 * 1024 + 1)), grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds the limit"),
    ]
    for bad, code, message in cases:
        with expect_status(code, message):
            client.write(vector_bank, [good, bad])  # the good one in the same stream is not kept either
    assert client.stats(vector_bank) == before
    assert client.fetch(vector_bank, ["new"], allow_missing=True) == []
    with expect_status(grpc.StatusCode.NOT_FOUND, "'no-such-bank'"):
        client.write("no-such-bank", [good])


async def test_oversized_message_is_resource_exhausted(aclient):
    from memory3.v1 import memories_pb2

    await aclient.create_bank(BankInfo("vec", FINGERPRINT, SPEC, "client-embedder", DIM, "cosine"))
    record = memories_pb2.ReferenceRecord(
        external_id="x", text="t", embedding=[0.1] * DIM, memory_size=9 * 1024 * 1024,
        memory_chunk=b"\0" * (9 * 1024 * 1024),
    )
    with expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED):
        await aclient.memories.Write(
            iter([memories_pb2.WriteRequest(bank="vec", reference=record)]), **aclient._call()
        )
    assert (await aclient.stats("vec")).references == 0


def test_bad_queries(client, vector_bank):
    _write_vectors(client, vector_bank, unit_vectors(5, DIM))
    q = unit_vectors(1, DIM)[0].tolist()
    cases = [
        (dict(vector=q, top_k=-1), "top_k"),
        (dict(vector=q, top_k=10**6), "exceeds the limit"),
        (dict(vector=q[:-1]), "dimensions"),
        (dict(vector=[float("inf")] * DIM), "NaN or infinity"),
        (dict(text="hello"), "query by vector"),
        (dict(text=""), "needs a query"),
        (dict(vector=q, max_overlap=0.5), "query by text"),
        (dict(text="x", max_overlap=1.5), "max_overlap"),
    ]
    for kwargs, message in cases:
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, message):
            client.retrieve(vector_bank, **kwargs)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "empty"):
        client.fetch(vector_bank, [])
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "at most"):
        client.delete(vector_bank, [str(i) for i in range(10_001)])
    assert client.stats(vector_bank).references == 5


def test_stored_checksums_tell_memories_apart(client, vector_bank):
    _, refs = _write_vectors(client, vector_bank, unit_vectors(5, DIM))
    stored = client.fetch(vector_bank, [r.external_id for r in refs])
    assert len({s.memory_crc32 for s in stored}) == 5


def test_size_batches_packs_messages_up_to_the_limit():
    from memory3.core.batching import size_batches
    from memory3.v1 import memories_pb2

    frames = [memories_pb2.ReferenceFrame(memory_chunk=bytes(n)) for n in (40, 40, 40, 200, 10)]
    sizes = [f.ByteSize() for f in frames]
    batches = list(size_batches(frames, max_bytes=2 * sizes[0]))
    assert [len(b) for b in batches] == [2, 1, 1, 1]  # two fit, then the oversized one alone
    assert [f for b in batches for f in b] == frames  # order kept, nothing lost
    assert [len(b) for b in size_batches(frames, max_bytes=10**6)] == [5]
    assert list(size_batches([], 100)) == []
