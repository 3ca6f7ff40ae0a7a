"""Bank CRUD through real gRPC against real PostgreSQL."""

import grpc

from helpers import FINGERPRINT, SPEC, expect_status
from memory3.core.memory_spec import MemorySpec
from memory3.sdk.client import BankInfo
from memory3.v1 import banks_pb2


def test_create_get_list_delete(client):
    created = client.create_bank(BankInfo("kb", FINGERPRINT, SPEC))
    assert created.spec == SPEC and created.embedder_dim == 384 and created.metric == "cosine"
    assert created.created_at is not None
    assert client.get_bank("kb") == created
    client.create_bank(BankInfo("vectors", FINGERPRINT, SPEC, "my-embedder", 16, "l2"))
    assert [b.name for b in client.list_banks()] == ["kb", "vectors"]
    assert client.delete_bank("kb") == 0
    with expect_status(grpc.StatusCode.NOT_FOUND, "'kb'"):
        client.get_bank("kb")
    assert [b.name for b in client.list_banks()] == ["vectors"]


def test_create_is_idempotent_and_conflicts_are_refused(client):
    first = client.create_bank(BankInfo("kb", FINGERPRINT, SPEC))
    assert client.create_bank(BankInfo("kb", FINGERPRINT, SPEC)) == first
    other_spec = MemorySpec((0, 1, 2), 2, 16, 4, 32, "int8")
    with expect_status(grpc.StatusCode.ALREADY_EXISTS, "different definition"):
        client.create_bank(BankInfo("kb", FINGERPRINT, other_spec))
    assert client.get_bank("kb").spec == SPEC


async def test_list_pages_through_many_banks(aclient):
    for i in range(5):
        await aclient.create_bank(BankInfo(f"b{i}", FINGERPRINT, SPEC, "client", 4, "ip"))
    names, token = [], ""
    while True:
        reply = await aclient.banks.ListBanks(
            banks_pb2.ListBanksRequest(page_size=2, page_token=token), **aclient._call()
        )
        assert len(reply.banks) <= 2
        names += [b.name for b in reply.banks]
        token = reply.next_page_token
        if not token:
            break
    assert names == [f"b{i}" for i in range(5)]
    assert [b.name for b in await aclient.list_banks()] == names


def test_invalid_definitions_are_refused_and_create_nothing(client):
    bad = [
        (BankInfo("has space", FINGERPRINT, SPEC), "bank name"),
        (BankInfo("kb", "", SPEC), "model_fingerprint"),
        (BankInfo("kb", FINGERPRINT, MemorySpec((0,), 2, 16, 4, 32, "zip")), "codec"),
        (BankInfo("kb", FINGERPRINT, SPEC, "all-MiniLM-L6-v2", 512), "384"),
        (BankInfo("kb", FINGERPRINT, SPEC, "client", 0), "dimension"),
        (BankInfo("kb", FINGERPRINT, SPEC, "client", 8, "manhattan"), "metric"),
    ]
    for bank, message in bad:
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, message):
            client.create_bank(bank)
    assert client.list_banks() == []


def test_bank_dropped_elsewhere_is_not_found_not_internal(client, server):
    """A replica whose cache still knows a bank that another replica dropped answers NOT_FOUND."""
    from sqlalchemy import text

    from memory3.sdk.client import Reference

    client.create_bank(BankInfo("gone", FINGERPRINT, SPEC, "client", 3, "l2"))
    client.write("gone", [Reference("a", "t", {}, [1, 2, 3])])
    engine = server.running.engine

    async def drop_behind_the_cache():
        async with engine.begin() as conn:
            bank_id = (await conn.execute(text("SELECT id FROM banks WHERE name = 'gone'"))).scalar()
            await conn.execute(text(f"DROP TABLE memory_references_b{bank_id}"))
            await conn.execute(text("DELETE FROM banks WHERE id = :i"), {"i": bank_id})

    server.call(drop_behind_the_cache())
    for call in (lambda: client.stats("gone"), lambda: client.retrieve("gone", vector=[1, 2, 3]),
                 lambda: client.fetch("gone", ["a"]), lambda: client.write("gone", [Reference("b", "t", {}, [1, 2, 3])])):
        with expect_status(grpc.StatusCode.NOT_FOUND, "'gone'"):
            call()


def test_codec_and_metric_as_enums_beside_their_strings(server, tenant):
    """Issue 19: enums where strings were enumerations, wire-compatible: a request may use either
    field; both set and different is INVALID_ARGUMENT; answers carry both."""
    import grpc

    from helpers import expect_status
    from memory3.v1 import banks_pb2, banks_pb2_grpc

    def bank(name, **spec):
        return banks_pb2.CreateBankRequest(bank=banks_pb2.Bank(
            name=name, model_fingerprint="f" * 16,
            memory_spec=banks_pb2.MemorySpec(memory_layers=[0], kv_heads=1, head_dim=4, tokens_per_head=2,
                                             **{k: v for k, v in spec.items() if k in ("codec", "scheme")}),
            embedder=banks_pb2.EmbedderSpec(name="client", dimension=2,
                                            **{k: v for k, v in spec.items() if k in ("metric", "distance")})))

    auth = (("authorization", f"Bearer {tenant.api_key}"),)
    with grpc.insecure_channel(server.target) as channel:
        stub = banks_pb2_grpc.BanksStub(channel)
        created = stub.CreateBank(bank("enums", scheme=banks_pb2.CODEC_INT4, distance=banks_pb2.METRIC_L2),
                                  metadata=auth, timeout=10)
        assert (created.memory_spec.codec, created.memory_spec.scheme) == ("int4", banks_pb2.CODEC_INT4)
        assert (created.embedder.metric, created.embedder.distance) == ("l2", banks_pb2.METRIC_L2)
        old = stub.CreateBank(bank("strings", codec="fp16", metric="ip"), metadata=auth, timeout=10)
        assert old.memory_spec.scheme == banks_pb2.CODEC_FP16 and old.embedder.distance == banks_pb2.METRIC_IP
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "memory_spec.scheme / memory_spec.codec"):
            stub.CreateBank(bank("clash", codec="fp16", scheme=banks_pb2.CODEC_INT8), metadata=auth, timeout=10)
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "unknown enum value"):
            stub.CreateBank(bank("unknown", scheme=99), metadata=auth, timeout=10)
