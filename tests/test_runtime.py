"""Runtime behaviour: Prometheus metrics, request ids, back-pressure with retry advice, deadlines
that stop database work, and graceful shutdown that lets in-flight calls finish."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
import psycopg
import pytest
from conftest import ADMIN_KEY, ServerThread, make_settings

from helpers import FINGERPRINT, SPEC, expect_status
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import Client
from memory3.service.embedded_pg import libpq_url
from memory3.v1 import memories_pb2, memories_pb2_grpc


@pytest.fixture
def own_server(database_url, embedder):
    """A server of this test's own (tight limits; stopping it does not disturb other tests)."""
    servers = []

    def start(**overrides):
        srv = ServerThread(make_settings(database_url, **overrides), embedder)
        servers.append(srv)
        admin = Client(srv.target, ADMIN_KEY)
        name = f"rt{len(servers)}{int(time.time() * 1000) % 100000}"
        admin.create_tenant(name)
        _, key = admin.issue_key(name)
        admin.close()
        return srv, key

    yield start
    for srv in servers:
        srv.stop()


def test_metrics_count_rpcs_by_method_and_code(server, client):
    client.create_bank(BankInfo("m", FINGERPRINT, SPEC, "client", 2, "l2"))
    with expect_status(grpc.StatusCode.NOT_FOUND):
        client.get_bank("missing")
    port = server.running.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    banks = 'grpc_service="memory3.v1.Banks",grpc_type="unary"'  # prometheus_client writes labels sorted
    assert f'grpc_server_handled_total{{grpc_code="OK",grpc_method="CreateBank",{banks}}}' in body
    assert f'grpc_server_handled_total{{grpc_code="NOT_FOUND",grpc_method="GetBank",{banks}}}' in body
    assert f'grpc_server_handling_seconds_bucket{{grpc_method="CreateBank",{banks},le="0.001"}}' in body
    assert "grpc_server_started_total" in body and "memory3_rpc_in_flight" in body
    assert "memory3_build_info{" in body and "memory3_event_loop_lag_seconds_bucket" in body
    assert "memory3_bank_bytes{" not in body  # no tenant or bank names unless the operator opts in


def test_request_id_is_echoed(server, tenant):
    with grpc.insecure_channel(server.target) as channel:
        stub = memories_pb2_grpc.MemoriesStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Stats(memories_pb2.StatsRequest(bank="nope"),
                       metadata=(("authorization", f"Bearer {tenant.api_key}"), ("x-request-id", "req-42")))
    assert ("x-request-id", "req-42") in tuple(info.value.trailing_metadata())


def test_overload_is_refused_with_pushback_not_queued(own_server):
    srv, key = own_server(max_in_flight=1)
    with Client(srv.target, key) as client:
        client.create_bank(BankInfo("b", FINGERPRINT, SPEC, "client", 2, "l2"))
    with grpc.insecure_channel(srv.target) as channel:
        stub = memories_pb2_grpc.MemoriesStub(channel)
        metadata = (("authorization", f"Bearer {key}"),)
        release = threading.Event()

        def slow_stream():
            yield memories_pb2.WriteRequest(bank="b", reference=memories_pb2.ReferenceRecord(external_id="a", text="t", embedding=[1, 0]))
            release.wait(10)

        holder = stub.Write.future(slow_stream(), metadata=metadata)
        deadline = time.monotonic() + 10
        while srv.running.guard.in_flight < 1:  # the Write holds the one slot now
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as info:
            stub.Stats(memories_pb2.StatsRequest(bank="b"), metadata=metadata, timeout=5)
        release.set()
        assert holder.result(10).inserted == 1
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry after" in info.value.details()
    assert dict(info.value.trailing_metadata())["grpc-retry-pushback-ms"] == "100"


def test_expired_deadline_stops_database_work(server, client, database_url):
    client.create_bank(BankInfo("slow", FINGERPRINT, SPEC, "client", 2, "l2"))
    client.write("slow", [Reference("a", "t", {}, [1, 0])])
    with psycopg.connect(libpq_url(database_url)) as locker:
        bank_id = locker.execute("SELECT id FROM banks WHERE name = 'slow' ORDER BY id DESC LIMIT 1").fetchone()[0]
        locker.execute(f"LOCK TABLE memory_references_b{bank_id} IN ACCESS EXCLUSIVE MODE")  # readers now wait
        with grpc.insecure_channel(server.target) as channel:
            stub = memories_pb2_grpc.MemoriesStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Retrieve(memories_pb2.RetrieveRequest(bank="slow", vector=memories_pb2.Vector(values=[1, 0])),
                                   metadata=(("authorization", client._async._metadata[0][1]),), timeout=1.0))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.time() + 10
        with psycopg.connect(libpq_url(database_url), autocommit=True) as watcher:
            while time.time() < deadline:
                waiting = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                    (f"%memory_references_b{bank_id} %",)).fetchone()[0]
                if waiting == 0:
                    break
                time.sleep(0.2)
        assert waiting == 0, "the expired call's query is still running in PostgreSQL"
        locker.rollback()


def test_graceful_shutdown_turns_health_not_serving_then_finishes_in_flight_calls(own_server):
    srv, key = own_server(grace_seconds=10.0, drain_notice_seconds=3.0)
    with Client(srv.target, key) as client:
        client.create_bank(BankInfo("g", FINGERPRINT, SPEC, "client", 2, "l2"))
    channel = grpc.insecure_channel(srv.target)
    stub = memories_pb2_grpc.MemoriesStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    sent_first, release = threading.Event(), threading.Event()

    def stream():
        yield memories_pb2.WriteRequest(bank="g", reference=memories_pb2.ReferenceRecord(external_id="a", text="t", embedding=[1, 0]))
        sent_first.set()
        release.wait(10)
        yield memories_pb2.WriteRequest(reference=memories_pb2.ReferenceRecord(external_id="b", text="t", embedding=[0, 1]))

    pending = stub.Write.future(stream(), metadata=(("authorization", f"Bearer {key}"),))
    assert sent_first.wait(10)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    not_serving = 0  # polled until the server stops answering: NOT_SERVING for the drain notice
    while True:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            break
        if status == health_pb2.HealthCheckResponse.NOT_SERVING:
            not_serving += 1
            if not_serving == 10:
                release.set()  # the in-flight Write may finish now; the drain goes on
        time.sleep(0.02)
    release.set()
    assert not_serving >= 10, not_serving  # load balancers saw the drain for a while, not for an instant
    summary = pending.result(15)
    stopper.join(20)
    with pytest.raises(grpc.RpcError):  # no new calls once stopped
        grpc.insecure_channel(srv.target).unary_unary("/memory3.v1.Memories/Stats")(b"", timeout=2)
    channel.close()
    assert summary.inserted == 2
