"""Hostile and careless clients (issue 22): nothing a caller holds can starve the others.

Each test runs against a real server on loopback with tight limits (one-second idle deadlines,
few slots) and a real PostgreSQL, and checks both sides: what the hostile caller gets, and that
another tenant is served meanwhile."""

from __future__ import annotations

import threading
import time
import types

import grpc
import numpy as np
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import ADMIN_KEY, ServerThread, make_settings
from helpers import expect_status
from memory3.core.embedder import BUILTIN_EMBEDDER
from memory3.core.episodes import Episode
from memory3.sdk.client import BankInfo, Client, MemorySpec, Reference
from memory3.sdk.client.trajectories import episode_to_record
from memory3.service.embedded_pg import libpq_url
from memory3.v1 import memories_pb2, tenants_pb2, tenants_pb2_grpc, trajectories_pb2

SPEC = MemorySpec((0,), 1, 4, 2)
IDLE = 1.0


@pytest.fixture(scope="module")
def tight(database_url, embedder):
    srv = ServerThread(
        make_settings(database_url, stream_idle_seconds=IDLE, max_in_flight=12, tenant_max_concurrent_calls=4,
                      db_pool_size=2, db_max_overflow=2),
        embedder,
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin_client(tight):
    with Client(tight.target, ADMIN_KEY) as client:
        yield client


def _tenant(admin_client, name):
    admin_client.create_tenant(name)
    return admin_client.issue_key(name)


def _bank(client: Client, name: str) -> None:
    client.create_bank(BankInfo(name, "f" * 16, SPEC, "client", 4, "l2"))


def _write_stream(channel):
    """The raw Memories.Write client stream, for tests that pace or stall its messages."""
    return channel.stream_unary("/memory3.v1.Memories/Write",
                                request_serializer=memories_pb2.WriteRequest.SerializeToString,
                                response_deserializer=memories_pb2.WriteSummary.FromString)


def _metadata(key: str):
    return (("authorization", f"Bearer {key}"),)


class Gate:
    """A request iterator that sends ``first`` messages, then waits (an idle client) until opened."""

    def __init__(self, first):
        self.first, self.opened = list(first), threading.Event()

    def __iter__(self):
        yield from self.first
        self.opened.wait(30)


def _idle_streams(channel, method, key, first, count):
    gates = [Gate(first) for _ in range(count)]
    futures = [method.future(iter(gate), metadata=_metadata(key), timeout=30) for gate in gates]
    return gates, futures


@pytest.fixture(scope="module")
def tenants(tight, admin_client):
    keys = {}
    for name in ("hostile-a", "hostile-b"):
        keys[name] = _tenant(admin_client, name)
    with Client(tight.target, keys["hostile-b"][1]) as b:
        _bank(b, "kb")
        b.write("kb", [Reference("r1", "text", embedding=[1.0, 0, 0, 0])])
    with Client(tight.target, keys["hostile-a"][1]) as a:
        _bank(a, "kb")
    return keys


def test_keyless_idle_streams_take_no_slot_and_are_refused_at_once(tight, tenants):
    """Finding 1: 256 key-less Write streams that never sent anything locked every tenant out."""
    with grpc.insecure_channel(tight.target) as channel:
        write = _write_stream(channel)
        gates, futures = _idle_streams(channel, write, "nope", [], 40)  # more than max_in_flight
        try:
            for future in futures:
                with expect_status(grpc.StatusCode.UNAUTHENTICATED):
                    future.result(timeout=IDLE * 5)  # refused without waiting on the idle client
            assert tight.running.guard.in_flight == 0
            with Client(tight.target, tenants["hostile-b"][1]) as b:
                assert b.stats("kb").references == 1
        finally:
            for gate in gates:
                gate.opened.set()


def _pool_transactions(database_url) -> int:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
            " AND pid <> pg_backend_pid() AND datname = current_database()"
        ).fetchone()[0]


def test_idle_streams_hold_no_transaction_and_end_at_the_idle_deadline(tight, tenants, database_url):
    """Finding 2: idle Log/Write streams held a pooled connection and an open transaction each."""
    key = tenants["hostile-a"][1]
    episode = episode_to_record(Episode([1, 2], [3], [], "f" * 16, 0, "kb", episode_id="e-idle"))
    with grpc.insecure_channel(tight.target) as channel:
        log_method = channel.stream_unary("/memory3.v1.Trajectories/Log",
                                          request_serializer=trajectories_pb2.LogRequest.SerializeToString,
                                          response_deserializer=trajectories_pb2.LogSummary.FromString)
        write = _write_stream(channel)
        first_ref = memories_pb2.WriteRequest(
            bank="kb", reference=memories_pb2.ReferenceRecord(external_id="x", text="t", embedding=[1, 0, 0, 0]))
        gates, futures = _idle_streams(channel, log_method, key, [trajectories_pb2.LogRequest(episodes=[episode])], 2)
        more_gates, more = _idle_streams(channel, write, key, [first_ref], 2)
        gates += more_gates
        futures += more
        try:
            time.sleep(IDLE / 2)  # the streams sent their first message and are idle now
            assert _pool_transactions(database_url) == 0
            with Client(tight.target, tenants["hostile-b"][1]) as b:
                for _ in range(5):  # the pool (2 + 2 connections) is free for the other tenant
                    assert b.stats("kb").references == 1
            for future in futures:
                with expect_status(grpc.StatusCode.DEADLINE_EXCEEDED, "stream_idle_seconds"):
                    future.result(timeout=IDLE * 10)
        finally:
            for gate in gates:
                gate.opened.set()
    with Client(tight.target, key) as a:
        assert a.stats("kb").references == 0  # nothing the idle streams sent was committed
        assert a.count_episodes() == (0, 0)
    assert tight.running.guard.in_flight == 0


def test_a_tenant_at_its_concurrency_quota_leaves_the_others_served(tight, tenants, admin_client):
    key = tenants["hostile-a"][1]
    admin_client.set_quota("hostile-a", "concurrent_calls", 2)
    try:
        with grpc.insecure_channel(tight.target) as channel:
            write = _write_stream(channel)
            gates, futures = _idle_streams(channel, write, key, [memories_pb2.WriteRequest(bank="kb")], 2)
            try:
                time.sleep(IDLE / 3)
                with Client(tight.target, key) as a, expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                                                        "quota 'concurrent_calls'"):
                    a.stats("kb")
                with Client(tight.target, tenants["hostile-b"][1]) as b:
                    for _ in range(10):
                        assert b.stats("kb").references == 1
            finally:
                for gate in gates:
                    gate.opened.set()
                for future in futures:
                    try:
                        future.result(timeout=IDLE * 10)
                    except grpc.RpcError:
                        pass
    finally:
        admin_client.set_quota("hostile-a", "concurrent_calls", None)


def test_revoking_a_key_ends_its_running_streams(tight, admin_client):
    key_id, key = _tenant(admin_client, "hostile-revoked")
    with Client(tight.target, key) as client:
        _bank(client, "kb")
    with grpc.insecure_channel(tight.target) as channel:
        write = _write_stream(channel)
        revoked = threading.Event()

        def requests():
            yield memories_pb2.WriteRequest(bank="kb")
            for i in range(200):
                if i == 5:
                    admin_client.revoke_key(key_id)
                    revoked.set()
                yield memories_pb2.WriteRequest(reference=memories_pb2.ReferenceRecord(
                    external_id=f"r{i}", text="t", embedding=[1, 0, 0, 0]))
                time.sleep(0.01)

        with expect_status(grpc.StatusCode.UNAUTHENTICATED, "revoked"):
            write(requests(), metadata=_metadata(key), timeout=30)
        assert revoked.is_set()
    with psycopg.connect(libpq_url(tight.running.settings.database_url), autocommit=True) as conn:
        staged = conn.execute("SELECT count(*) FROM reference_staging").fetchone()[0]
        rows = conn.execute(
            "SELECT count(*) FROM memory_references r JOIN banks b ON b.id = r.bank_id"
            " JOIN tenants t ON t.id = b.tenant_id WHERE t.name = 'hostile-revoked'"
        ).fetchone()[0]
    assert rows == 0 and staged == 0  # nothing committed, nothing left staged


def test_a_revocation_this_process_never_hears_of_ends_its_streams_within_the_key_cache_time(database_url, embedder):
    """A key revoked where no notice reaches this process (another process whose notice was lost, or
    an operator's UPDATE) still ends a running stream: streams re-verify their key once the key
    cache's time has passed."""
    srv = ServerThread(make_settings(database_url, key_cache_seconds=0.5), embedder)
    try:
        with Client(srv.target, ADMIN_KEY) as admin:
            key_id, key = _tenant(admin, "hostile-unheard-revoke")
        with Client(srv.target, key) as client:
            _bank(client, "kb")
        revoked = threading.Event()

        def requests():
            yield memories_pb2.WriteRequest(bank="kb")
            for i in range(400):
                if i == 50:  # after at least one periodic re-check that found the key valid
                    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
                        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s", (key_id,))
                    revoked.set()
                yield memories_pb2.WriteRequest(reference=memories_pb2.ReferenceRecord(
                    external_id=f"r{i}", text="t", embedding=[1, 0, 0, 0]))
                time.sleep(0.02)

        with grpc.insecure_channel(srv.target) as channel:
            write = _write_stream(channel)
            with expect_status(grpc.StatusCode.UNAUTHENTICATED, "revoked while the call was running"):
                write(requests(), metadata=_metadata(key), timeout=30)
        assert revoked.is_set()  # the stream was still running when the key was revoked
    finally:
        srv.stop()


def test_a_reader_that_stops_reading_is_cut_off_and_frees_its_slot(tight, admin_client):
    _, key = _tenant(admin_client, "hostile-slow-reader")
    rng = np.random.default_rng(0)
    with Client(tight.target, key) as client:
        _bank(client, "kb")
        client.write("kb", [Reference(f"r{i}", "x" * 60_000, embedding=rng.normal(size=4).tolist()) for i in range(200)])
    with grpc.insecure_channel(tight.target) as channel:
        fetch = channel.unary_stream("/memory3.v1.Memories/Fetch",
                                     request_serializer=memories_pb2.FetchRequest.SerializeToString,
                                     response_deserializer=memories_pb2.ReferenceFrames.FromString)
        responses = fetch(memories_pb2.FetchRequest(bank="kb", external_ids=[f"r{i}" for i in range(200)]),
                          metadata=_metadata(key), timeout=60)
        next(responses)  # take one message, then stop reading
        deadline = time.monotonic() + IDLE * 15
        while tight.running.guard.in_flight and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tight.running.guard.in_flight == 0
        with expect_status(grpc.StatusCode.DEADLINE_EXCEEDED, "stream_idle_seconds"):
            for _ in responses:  # what was sent before the cut, then the deliberate status
                pass


def _health(target, timeout: float = 1) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return reply.status


def test_heavy_overlap_filtering_runs_off_the_event_loop(tight, admin_client):
    """Finding 3: one Retrieve with max_overlap froze every call, health included, for seconds."""
    _, key = _tenant(admin_client, "hostile-overlap")
    words = " ".join(f"w{i}" for i in range(4000))
    with Client(tight.target, key) as client:
        client.create_bank(BankInfo("kb", "f" * 16, SPEC, BUILTIN_EMBEDDER, 384, "cosine"))
        # 320 long references: comparing each with the query on the event loop stalled it for ~1.5 s
        # (vectors sent along: the built-in embedder would spend seconds on texts this long)
        vectors = np.random.default_rng(1).normal(size=(320, 384))
        client.write("kb", [Reference(f"r{i}", f"{i} {words}", embedding=vectors[i].tolist()) for i in range(320)])
        done = threading.Event()
        answers = []

        def heavy():
            try:
                client.retrieve("kb", text=words * 2, top_k=255, max_overlap=0.5)
            finally:
                done.set()

        worker = threading.Thread(target=heavy)
        worker.start()
        while not done.is_set():  # a deadline far above the header's parse time (~20 ms): the server must
            answers.append(_health(tight.target, timeout=5))  # keep answering, whatever else shares this CPU  # each within its 1 s deadline while the query runs
        worker.join()
    assert answers and set(answers) == {health_pb2.HealthCheckResponse.SERVING}


def test_bank_create_and_drop_let_other_banks_write_behind_an_open_transaction(tight, admin_client, database_url):
    """Finding 9: creating a bank queued an ACCESS EXCLUSIVE lock on the shared parent table."""
    _, key = _tenant(admin_client, "hostile-ddl")
    with Client(tight.target, key) as client:
        _bank(client, "busy")
        _bank(client, "other")
        with psycopg.connect(libpq_url(database_url)) as reader:
            reader.execute("SELECT count(*) FROM memory_references")  # holds a lock on the parent until commit
            with Client(tight.target, key, timeout=10) as quick:
                _bank(quick, "created-meanwhile")
                quick.write("other", [Reference("r", "t", embedding=[0, 1, 0, 0])])
                assert quick.stats("other").references == 1
            reader.rollback()
        assert client.delete_bank("created-meanwhile") == 0
        assert "created-meanwhile" not in [b.name for b in client.list_banks()]


def test_quotas_refuse_beyond_the_limit_and_name_it(tight, admin_client):
    _, key = _tenant(admin_client, "hostile-quota")
    quotas = admin_client.get_quotas("hostile-quota")
    assert set(quotas) == {"concurrent_calls", "banks", "stored_bytes"}
    assert not quotas["banks"].overridden and quotas["banks"].used == 0
    admin_client.set_quota("hostile-quota", "banks", 1)
    admin_client.set_quota("hostile-quota", "stored_bytes", 400_000)
    with Client(tight.target, key) as client:
        _bank(client, "first")
        with expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota 'banks'"):
            _bank(client, "second")
        with expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota 'stored_bytes'"):
            client.write("first", [Reference(f"r{i}", "y" * 50_000, embedding=[1, 0, 0, 0]) for i in range(10)])
        assert client.stats("first").references == 0
        with expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota 'stored_bytes'"):
            client.log_episodes([Episode(list(range(20_000)), [1], [], "f" * 16, 0, "first", episode_id=f"e{i}")
                                 for i in range(10)])
        assert client.count_episodes() == (0, 0)
    after = admin_client.set_quota("hostile-quota", "banks", None)
    assert not after["banks"].overridden and after["banks"].limit == after["banks"].default_limit
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "quota name"):
        admin_client.set_quota("hostile-quota", "bogus", 1)
    with expect_status(grpc.StatusCode.NOT_FOUND, "tenant"):
        admin_client.get_quotas("no-such-tenant")


def test_failed_admin_attempts_are_limited_per_address(database_url, embedder):
    srv = ServerThread(make_settings(database_url, admin_failures_per_minute=3), embedder)
    try:
        for _ in range(3):
            with Client(srv.target, "m3_0123456789abcdef_" + "x" * 43) as wrong:
                with expect_status(grpc.StatusCode.UNAUTHENTICATED):
                    wrong.list_tenants()
        with Client(srv.target, ADMIN_KEY) as right, expect_status(grpc.StatusCode.UNAUTHENTICATED, "too many"):
            right.list_tenants()  # refused unchecked, even with the right key, for the rest of the minute
    finally:
        srv.stop()


def test_failed_admin_attempts_count_per_host_across_connections(database_url, embedder):
    """An attacker who reconnects gets a new source port each time: the limit is per host, not per
    connection. Each channel here has its own subchannel pool, so each attempt is its own TCP
    connection (gRPC otherwise shares one connection between channels to the same target)."""
    srv = ServerThread(make_settings(database_url, admin_failures_per_minute=3), embedder)

    def list_tenants(key: str) -> grpc.RpcError:
        with grpc.insecure_channel(srv.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                tenants_pb2_grpc.TenantsStub(channel).ListTenants(
                    tenants_pb2.ListTenantsRequest(), metadata=_metadata(key), timeout=10)
            return refused.value

    try:
        for _ in range(3):
            assert list_tenants("m3_0123456789abcdef_" + "x" * 43).code() == grpc.StatusCode.UNAUTHENTICATED
        refused = list_tenants(ADMIN_KEY)
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED and "too many" in refused.details()
    finally:
        srv.stop()


def test_admin_attempts_slide_over_a_minute_and_name_the_wait(monkeypatch):
    """The refusal says when the oldest failure leaves the minute, and then the address is served
    again; addresses are hosts (the port is dropped, IPv6 brackets kept)."""
    from memory3.service import guard

    clock = [100.0]
    monkeypatch.setattr(guard, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    attempts = guard.AdminAttempts(per_minute=3)
    assert attempts.address("ipv4:127.0.0.1:5301") == "ipv4:127.0.0.1"
    assert attempts.address("ipv6:[::1]:40000") == "ipv6:[::1]"
    for t, port in ((100.0, 5301), (110.0, 5302), (120.0, 5303)):
        clock[0] = t
        attempts.check(f"ipv4:10.0.0.7:{port}")
        attempts.fail(f"ipv4:10.0.0.7:{port}")
    attempts.check("ipv4:10.0.0.8:5301")  # another host is not limited
    clock[0] = 125.0
    with pytest.raises(guard.Unauthenticated, match=r"retry in 36 s"):  # the failure at 100 leaves at 160
        attempts.check("ipv4:10.0.0.7:6000")
    clock[0] = 160.5
    attempts.check("ipv4:10.0.0.7:6001")  # two failures left in the minute
    attempts.fail("ipv4:10.0.0.7:6001")
    with pytest.raises(guard.Unauthenticated, match=r"retry in 10 s"):  # the failure at 110 leaves at 170
        attempts.check("ipv4:10.0.0.7:6002")
    clock[0] = 170.0
    with pytest.raises(guard.Unauthenticated, match=r"retry in 1 s"):  # exactly a minute old: still counted
        attempts.check("ipv4:10.0.0.7:6003")
    for _ in range(5):  # concurrent attempts all pass the check before any fails: the limit still holds
        attempts.fail("ipv4:10.0.0.9:7000")
    with pytest.raises(guard.Unauthenticated, match="too many"):
        attempts.check("ipv4:10.0.0.9:7001")


def test_a_weak_admin_key_is_refused_at_start(database_url):
    with pytest.raises(ValueError, match="at least 32 characters"):
        ServerThread(make_settings(database_url, admin_key="change-me"))


def test_revoking_a_key_ends_a_running_read(tight, admin_client):
    key_id, key = _tenant(admin_client, "hostile-revoked-reader")
    with Client(tight.target, key) as client:
        client.log_episodes([Episode([1], [2, 3], [], "f" * 16, 0, "kb", episode_id=f"e{i}") for i in range(300)])
    with grpc.insecure_channel(tight.target) as channel:
        read = channel.unary_stream("/memory3.v1.Trajectories/Read",
                                    request_serializer=trajectories_pb2.ReadRequest.SerializeToString,
                                    response_deserializer=trajectories_pb2.ReadPage.FromString)
        pages = read(trajectories_pb2.ReadRequest(page_size=1), metadata=_metadata(key), timeout=30)
        received = 0
        with expect_status(grpc.StatusCode.UNAUTHENTICATED, "revoked"):
            for _ in pages:
                received += 1
                if received == 1:
                    admin_client.revoke_key(key_id)
                time.sleep(0.01)
    assert received < 300


def test_hidden_state_bombs_are_refused_before_allocating():
    """Finding 5: logged hidden states had no decompressed size bound."""
    import zstandard

    from memory3.sdk.proxy.logger import unpack_hidden_states

    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 * 2**20))  # 64 MiB in a few KiB
    assert len(bomb) < 16_384
    with pytest.raises(ValueError, match="declare 67108864 bytes"):
        unpack_hidden_states(bomb, max_bytes=2**20)


def test_a_large_safetensors_header_is_parsed_off_the_event_loop_and_a_huge_one_refused(tight, admin_client):
    """Finding 3: Publish parsed a JSON header of up to 512 MiB on the event loop. Now the header is
    parsed on a worker and may be at most 1 MiB; a larger one is refused from its 8-byte length."""
    import hashlib
    import json as json_module

    from memory3.v1 import proxies_pb2

    _, key = _tenant(admin_client, "hostile-header")
    header = json_module.dumps({f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
                                for i in range(14_000)}).encode()  # ~0.9 MiB of JSON
    weights = len(header).to_bytes(8, "little") + header + b"\0" * 4
    info = proxies_pb2.ProxyInfo(name="p", model_fingerprint="f" * 16, weights_size=len(weights),
                                 weights_sha256=hashlib.sha256(weights).digest())
    chunks = [proxies_pb2.PublishRequest(info=info)] + [
        proxies_pb2.PublishRequest(weights_chunk=weights[i:i + 2**20]) for i in range(0, len(weights), 2**20)]
    done, answers = threading.Event(), []
    with grpc.insecure_channel(tight.target, options=[("grpc.max_send_message_length", 64 * 2**20)]) as channel:
        publish = channel.stream_unary("/memory3.v1.Proxies/Publish",
                                       request_serializer=proxies_pb2.PublishRequest.SerializeToString,
                                       response_deserializer=proxies_pb2.ProxyInfo.FromString)
        future = publish.future(iter(chunks), metadata=_metadata(key), timeout=60)
        future.add_done_callback(lambda _: done.set())
        while not done.is_set():
            answers.append(_health(tight.target))
        assert future.result().version == 1
    assert answers and set(answers) == {health_pb2.HealthCheckResponse.SERVING}
    huge = (20 * 2**20).to_bytes(8, "little") + b"{" + b" " * 100
    with Client(tight.target, key) as client, expect_status(grpc.StatusCode.INVALID_ARGUMENT, "exceeds 1048576"):
        client.publish_proxy("p", huge, "f" * 16)


def test_the_embedded_database_keeps_its_directories_closed(tmp_path):
    """Finding 11: as root, the embedded PostgreSQL opened every parent of its data dir to 0755,
    and a long data-dir path moved its socket into a world-writable runtime directory."""
    import os
    import stat

    from memory3.service.embedded_pg import EmbeddedDatabaseError, EmbeddedPostgres

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    database = EmbeddedPostgres(private / "data")
    try:
        for directory in (private, private / "data"):
            mode = stat.S_IMODE(directory.stat().st_mode)
            assert not mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IRGRP | stat.S_IWGRP), (directory, oct(mode))
        assert stat.S_IMODE((private / "data" / "pgdata").stat().st_mode) == 0o700
        if os.geteuid() == 0:
            assert stat.S_IMODE(private.stat().st_mode) & stat.S_IXOTH  # PostgreSQL's user passes through
    finally:
        database.stop()
    with pytest.raises(EmbeddedDatabaseError, match="too long a path"):
        EmbeddedPostgres(tmp_path / ("d" * 100))


def test_admin_key_strength_at_its_bounds():
    from memory3.service.auth import check_admin_key_strength

    check_admin_key_strength("abcdefghij" + "k" * 22)  # 32 characters: the minimum
    with pytest.raises(ValueError, match="at least 32 characters"):
        check_admin_key_strength("abcdefghij" + "k" * 21)  # 31


def test_admin_key_needs_ten_distinct_characters():
    from memory3.service.auth import check_admin_key_strength

    check_admin_key_strength("abcdefghi" + "j" * 23)  # exactly 10 distinct
    with pytest.raises(ValueError, match="10 distinct"):
        check_admin_key_strength("abcdefgh" + "i" * 24)  # 9


@pytest.mark.parametrize("metadata, message", [
    ((("authorization", "Basic dXNlcjpwYXNz"),), "must be 'Bearer <key>'"),
    ((("authorization", "Zzz m3_0123456789abcdef_" + "x" * 43),), "must be 'Bearer <key>'"),
    ((("authorization", "Bearer "),), "must be 'Bearer <key>'"),
    ((("a-header", "Bearer m3_0123456789abcdef_" + "x" * 43),), "missing API key"),
    ((), "missing API key"),
])
def test_the_authorization_metadata_is_read_exactly(metadata, message):
    from memory3.service.auth import presented_key
    from memory3.service.errors import Unauthenticated

    with pytest.raises(Unauthenticated, match=message):
        presented_key(metadata)
    assert presented_key((("x-other", "v"), ("authorization", "bearer  m3_key "))) == "m3_key"
