"""Isolation sweep: every RPC of every service, called with a missing, malformed, revoked or
other tenant's key, or with a tenant key on admin RPCs — nothing succeeds, nothing changes, and
errors do not reveal whether another tenant's resource exists."""

from __future__ import annotations

import grpc
import pytest
from conftest import ADMIN_KEY
from google.protobuf import descriptor_pool, message_factory

from helpers import FINGERPRINT, SPEC, expect_status, memory_payload
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import Client
from memory3.service.server import SERVICE_NAMES

ADMIN_SERVICES = {"memory3.v1.Tenants"}


def all_methods():
    pool = descriptor_pool.Default()
    for service_name in SERVICE_NAMES:
        service = pool.FindServiceByName(service_name)
        for method in service.methods:
            yield service_name, method


def raw_call(target: str, service_name: str, method, metadata):
    """Call any method with an empty request through a plain channel, returning the status code."""
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    path = f"/{service_name}/{method.name}"
    with grpc.insecure_channel(target) as channel:
        kwargs = dict(request_serializer=request_class.SerializeToString, response_deserializer=response_class.FromString)
        if method.client_streaming and method.server_streaming:
            call = channel.stream_stream(path, **kwargs)
        elif method.client_streaming:
            call = channel.stream_unary(path, **kwargs)
        elif method.server_streaming:
            call = channel.unary_stream(path, **kwargs)
        else:
            call = channel.unary_unary(path, **kwargs)
        request = iter([request_class()]) if method.client_streaming else request_class()
        try:
            result = call(request, metadata=metadata, timeout=10)
            if method.server_streaming:
                list(result)
        except grpc.RpcError as err:
            return err.code(), err.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer nonsense"),), (("authorization", "Bearer m3_0123456789abcdef_" + "x" * 43),),
     (("authorization", "m3_0123456789abcdef_" + "x" * 43),)],
    ids=["no-key", "malformed", "unknown", "no-bearer-scheme"],
)
def test_every_rpc_refuses_bad_keys(server, metadata):
    methods = list(all_methods())
    assert len(methods) >= 13
    for service_name, method in methods:
        code, details = raw_call(server.target, service_name, method, metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED, f"{service_name}/{method.name}: {code} {details}"
        assert details


def test_revoked_key_is_refused_everywhere(server, admin, tenant):
    with Client(server.target, tenant.api_key) as client:
        client.create_bank(BankInfo("kb", FINGERPRINT, SPEC))
        admin.revoke_key(tenant.key_id)
        with expect_status(grpc.StatusCode.UNAUTHENTICATED, "revoked"):
            client.list_banks()
    for service_name, method in all_methods():
        code, _ = raw_call(server.target, service_name, method, (("authorization", f"Bearer {tenant.api_key}"),))
        assert code == grpc.StatusCode.UNAUTHENTICATED, f"{service_name}/{method.name}"
    with expect_status(grpc.StatusCode.NOT_FOUND):
        admin.revoke_key(tenant.key_id)


def test_admin_rpcs_refuse_tenant_keys_and_data_rpcs_refuse_the_admin_key(server, tenant):
    for service_name, method in all_methods():
        key = tenant.api_key if service_name in ADMIN_SERVICES else ADMIN_KEY
        code, details = raw_call(server.target, service_name, method, (("authorization", f"Bearer {key}"),))
        assert code == grpc.StatusCode.PERMISSION_DENIED, f"{service_name}/{method.name}: {code} {details}"


def test_other_tenants_banks_do_not_exist_for_the_caller(server, new_tenant):
    alice, bob = new_tenant(), new_tenant()
    with Client(server.target, alice.api_key) as a, Client(server.target, bob.api_key) as b:
        b.create_bank(BankInfo("secret", FINGERPRINT, SPEC, "client", 4, "cosine"))
        b.write("secret", [Reference("doc", "bob's text", {"k": "v"}, [1, 0, 0, 0], memory_payload())])
        before = (b.stats("secret"), b.fetch("secret", ["doc"]))

        def refused(call, *args, **kwargs):
            """Bob's real bank and a bank nobody has must fail alike for Alice."""
            messages = []
            for name in ("secret", "never-existed"):
                with expect_status(grpc.StatusCode.NOT_FOUND) as info:
                    call(name, *args, **kwargs)
                messages.append(info.value.details().replace(name, "<bank>"))
            assert messages[0] == messages[1]

        refused(a.get_bank)
        refused(a.delete_bank)
        refused(a.stats)
        refused(a.fetch, ["doc"])
        refused(a.delete, ["doc"])
        refused(a.retrieve, vector=[1, 0, 0, 0])
        refused(a.write, [Reference("evil", "x", {}, [1, 0, 0, 0])])
        assert a.list_banks() == []
        # Alice may have her own bank of the same name; it is a different bank.
        a.create_bank(BankInfo("secret", FINGERPRINT, SPEC, "client", 4, "cosine"))
        assert a.stats("secret").references == 0
        assert a.retrieve("secret", vector=[1, 0, 0, 0]) == []
        assert (b.stats("secret"), b.fetch("secret", ["doc"])) == before


def test_keys_are_stored_only_as_hashes_and_a_revoked_key_leaves_the_cache(server, admin, database_url):
    """The database holds sha256(secret), never the secret; revoking a key that the server just
    verified (so it sits in the 2 s key cache) refuses it at once."""
    import hashlib

    import psycopg

    from memory3.service.embedded_pg import libpq_url

    name = "hashed-keys"
    admin.create_tenant(name)
    key_id, key = admin.issue_key(name)
    secret = key.split("_", 2)[2]
    with psycopg.connect(libpq_url(database_url)) as conn:
        stored = conn.execute("SELECT * FROM api_keys WHERE key_id = %s", (key_id,)).fetchone()
    assert stored is not None and hashlib.sha256(secret.encode()).digest() in [bytes(v) for v in stored
                                                                                 if isinstance(v, (bytes, memoryview))]
    assert not any(secret in str(v) for v in stored)
    assert server.running.settings.key_cache_seconds > 0
    with Client(server.target, key) as client:
        assert client.list_banks() == []  # verified: now cached
        admin.revoke_key(key_id)
        with expect_status(grpc.StatusCode.UNAUTHENTICATED, "invalid or revoked"):
            client.list_banks()


def test_no_observable_cache_crosses_tenants(server, new_tenant):
    """Issue 19, finding 9: the query-embedding cache was keyed by text alone, so a tenant could
    tell from Retrieve's latency whether another had just asked the same text. By the cache's own
    metric: A's first query misses, B's first query of the same text misses too, A's repeat hits."""
    from memory3.core.embedder import BUILTIN_EMBEDDER
    from memory3.service.metrics import CACHE_LOOKUPS

    def lookups(result: str) -> float:
        return CACHE_LOOKUPS.labels("query_embedding", result)._value.get()

    text = "which lighthouse did the keeper of tenant isolation watch?"
    clients = []
    for tenant in (new_tenant(), new_tenant()):
        client = Client(server.target, tenant.api_key)
        client.create_bank(BankInfo("q", FINGERPRINT, SPEC, BUILTIN_EMBEDDER, 384, "cosine"))
        clients.append(client)
    a, b = clients
    try:
        steps = []
        for who in (a, b, a):
            hits, misses = lookups("hit"), lookups("miss")
            who.retrieve("q", text=text, top_k=1)
            steps.append((lookups("hit") - hits, lookups("miss") - misses))
        assert steps == [(0, 1), (0, 1), (1, 0)], steps
    finally:
        for client in clients:
            client.close()


def test_page_tokens_and_cursors_are_opaque_and_bound_to_their_tenant(server, new_tenant):
    """Issue 19, finding 6: page tokens were the last bank name (any string accepted) and Read
    cursors a counter shared by all tenants. Now: opaque, and another tenant's, an altered or a
    made-up token is INVALID_ARGUMENT naming the field."""
    from memory3.core.episodes import Episode

    a_keys, b_keys = new_tenant(), new_tenant()
    with Client(server.target, a_keys.api_key) as a, Client(server.target, b_keys.api_key) as b:
        for name in ("k1", "k2", "k3"):
            a.create_bank(BankInfo(name, FINGERPRINT, SPEC, "client", 2, "l2"))
            b.create_bank(BankInfo(name, FINGERPRINT, SPEC, "client", 2, "l2"))
        a.log_episodes([Episode([1], [2], [], FINGERPRINT, 0, episode_id=f"e{i}") for i in range(3)])
        b.log_episodes([Episode([1], [2], [], FINGERPRINT, 0, episode_id=f"e{i}") for i in range(3)])
        page = a.read_episodes(limit=1)
        assert page.cursor and not page.cursor.startswith("c1.") and not page.cursor.isdigit()
        assert [e.episode_id for e in a.read_episodes(cursor=page.cursor).episodes] == ["e1", "e2"]
        altered = page.cursor[:-4] + ("AAAA" if not page.cursor.endswith("AAAA") else "BBBB")
        for bad in (altered, "c1.0", "%%%garbage"):
            with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "cursor"):
                a.read_episodes(cursor=bad)
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "cursor"):
            b.read_episodes(cursor=page.cursor)  # A's cursor is not B's

        from memory3.v1 import banks_pb2, banks_pb2_grpc

        with grpc.insecure_channel(server.target) as channel:
            stub = banks_pb2_grpc.BanksStub(channel)
            auth_a = (("authorization", f"Bearer {a_keys.api_key}"),)
            auth_b = (("authorization", f"Bearer {b_keys.api_key}"),)
            first = stub.ListBanks(banks_pb2.ListBanksRequest(page_size=1), metadata=auth_a, timeout=10)
            assert [x.name for x in first.banks] == ["k1"]
            assert first.next_page_token != "k1" and len(first.next_page_token) > 64  # opaque, not the name
            rest = stub.ListBanks(banks_pb2.ListBanksRequest(page_size=5, page_token=first.next_page_token),
                                  metadata=auth_a, timeout=10)
            assert [x.name for x in rest.banks] == ["k2", "k3"]
            for token, auth in (("%%%garbage", auth_a), ("k1", auth_a), (first.next_page_token, auth_b)):
                with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "page_token"):
                    stub.ListBanks(banks_pb2.ListBanksRequest(page_size=1, page_token=token), metadata=auth, timeout=10)


def test_a_key_revoked_elsewhere_is_refused_once_the_key_cache_expires(database_url, embedder):
    """A key revoked by another replica (here: straight in the database) keeps working on this one
    only while its cache entry lives (key_cache_seconds), then is refused — running streams too."""
    import time

    import psycopg

    from conftest import ServerThread, make_settings
    from memory3.service.embedded_pg import libpq_url

    srv = ServerThread(make_settings(database_url, key_cache_seconds=0.5), embedder)
    try:
        with Client(srv.target, ADMIN_KEY) as admin:
            admin.create_tenant("revoked-elsewhere")
            key_id, key = admin.issue_key("revoked-elsewhere")
        with Client(srv.target, key) as client:
            assert client.list_banks() == []  # verified and cached now
            with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
                conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s", (key_id,))
            assert client.list_banks() == []  # still within the cache's lifetime on this replica
            time.sleep(0.6)
            with expect_status(grpc.StatusCode.UNAUTHENTICATED, "invalid or revoked"):
                client.list_banks()
    finally:
        srv.stop()
