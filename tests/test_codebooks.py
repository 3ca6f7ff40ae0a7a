"""PQ codebooks are stored and versioned with their bank; pq memories must name one it has."""

import grpc
import pytest

from helpers import FINGERPRINT, expect_status, random_memory
from memory3.core.memory_spec import MemorySpec
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.memory.codec import decode_memory, encode_memory
from memory3.sdk.memory.pq import PQCodebook, train_codebook

PQ_SPEC = MemorySpec((0, 1), 2, 16, 4, 32, "pq")


@pytest.fixture(scope="module")
def codebooks():
    memories = [random_memory(PQ_SPEC, seed=i) for i in range(16)]
    return memories, [train_codebook(memories, bytes_per_vector=4, version=v, kmeans_iters=3) for v in (1, 2)]


def test_codebook_round_trip_and_pq_writes(client, codebooks):
    memories, (v1, v2) = codebooks
    client.create_bank(BankInfo("pq", FINGERPRINT, PQ_SPEC, "client", 2, "l2"))
    with expect_status(grpc.StatusCode.NOT_FOUND, "no codebook"):
        client.get_codebook("pq")
    payload = encode_memory(memories[0], "pq", v1)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "version 1 is not in the bank"):
        client.write("pq", [Reference("m0", "t", {}, [1, 0], payload)])
    assert client.put_codebook("pq", v1.to_bytes()) == 1
    assert client.put_codebook("pq", v1.to_bytes()) == 1  # idempotent
    client.write("pq", [Reference("m0", "t", {}, [1, 0], payload)])
    assert client.put_codebook("pq", v2.to_bytes()) == 2
    assert client.get_codebook("pq") == v2.to_bytes()
    stored_v1 = PQCodebook.from_bytes(client.get_codebook("pq", 1))
    fetched = client.fetch("pq", ["m0"])[0].memory
    decoded = decode_memory(fetched, codebook=stored_v1)
    assert decoded.kv.shape == memories[0].kv.shape


def test_conflicting_or_foreign_codebooks_are_refused(client, codebooks):
    memories, (v1, _) = codebooks
    client.create_bank(BankInfo("pq", FINGERPRINT, PQ_SPEC, "client", 2, "l2"))
    client.put_codebook("pq", v1.to_bytes())
    other = train_codebook(memories[8:], bytes_per_vector=4, version=1, kmeans_iters=3, seed=5)
    with expect_status(grpc.StatusCode.ALREADY_EXISTS, "different codebook version 1"):
        client.put_codebook("pq", other.to_bytes())
    # a memory encoded with a same-numbered but different codebook is refused
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "differs from the bank's"):
        client.write("pq", [Reference("m1", "t", {}, [1, 0], encode_memory(memories[1], "pq", other))])
    foreign = train_codebook([random_memory(PQ_SPEC, "ef" * 32, seed=i) for i in range(8)], bytes_per_vector=4,
                             version=3, kmeans_iters=2)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "trained for model"):
        client.put_codebook("pq", foreign.to_bytes())
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "invalid codebook"):
        client.put_codebook("pq", v1.to_bytes()[:-3])
    wrong_shape = train_codebook([random_memory(MemorySpec((0,), 2, 16, 4, 32), seed=i) for i in range(8)],
                                 bytes_per_vector=4, version=4, kmeans_iters=2)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "invalid codebook"):
        client.put_codebook("pq", wrong_shape.to_bytes())
    assert PQCodebook.from_bytes(client.get_codebook("pq")).version == 1
