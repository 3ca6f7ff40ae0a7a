"""Read replicas and several service processes on loopback, for real (issue 18): a primary and a
streaming standby made from the embedded PostgreSQL's own binaries (``pg_basebackup -R``: base
backup, ``standby.signal``, ``primary_conninfo``), and two ``memory3 serve`` processes on them.

Where a read was served is shown by the standby itself: with its replay paused, the standby lacks
the writes made since, so an answer without them came from it and an answer with them from the
primary. Covered: routing, the consistency token (read-your-writes), a lagging standby skipped
(with its lag as a metric), reads failing over when the standby stops and coming back, a key
revoked through one process refused by the other within a second, bank and quota caches dropped
across processes, and the SDK balancing over both processes. Killing a process mid-stream:
tests/test_crash.py."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from prometheus_client import REGISTRY

from conftest import ADMIN_KEY, ServerThread, make_settings
from helpers import FINGERPRINT, SPEC, expect_status, unit_vectors
from memory3.core.episodes import Episode
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import Client
from memory3.service.child_process import ServiceProcess, free_port
from memory3.service.embedded_pg import EmbeddedPostgres, EmbeddedStandby, libpq_url

ADMIN = "replica-admin-" + "0123456789abcdefghijklmnop"
DIM = 4


@dataclass
class Cluster:
    root: Path
    primary: EmbeddedPostgres
    standby: EmbeddedStandby
    a: ServiceProcess
    b: ServiceProcess
    metrics: dict  # process -> its metrics port

    def sql(self, server, query: str):
        with psycopg.connect(libpq_url(server.url), autocommit=True, connect_timeout=5) as conn:
            return conn.execute(query).fetchone()


@pytest.fixture(scope="module")
def cluster():
    # Not under pytest's tmp dir: PostgreSQL runs as its own user, which must traverse to its data.
    root = Path(tempfile.mkdtemp(prefix="m3-replicas-"))
    root.chmod(0o755)
    primary = EmbeddedPostgres(root / "p")
    standby = None
    processes: dict[str, ServiceProcess] = {}
    try:
        standby = EmbeddedStandby(primary, root / "s", sync=False)
        ports = {name: free_port() for name in "ab"}
        failures = []

        def start(name: str) -> None:
            try:
                processes[name] = ServiceProcess(
                    primary.url, root / name, ADMIN, replica_urls=standby.url, replica_check_seconds="0.2",
                    replica_max_lag_seconds="120", key_cache_seconds="60", bank_cache_seconds="60",
                    metrics_port=str(ports[name]), drain_notice_seconds="0", grace_seconds="1")
            except Exception as err:
                failures.append(err)

        starting = [threading.Thread(target=start, args=(name,)) for name in "ab"]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join(180)
        assert not failures, failures
        yield Cluster(root, primary, standby, processes["a"], processes["b"],
                      {processes[n].target: ports[n] for n in "ab"})
    finally:
        for process in processes.values():
            process.stop()
        if standby is not None:
            with contextlib.suppress(Exception):
                standby.stop()
        primary.stop()
        shutil.rmtree(root, ignore_errors=True)


def _tenant(target: str) -> tuple[str, str, str]:
    """A new tenant through the admin key: (name, key id, key)."""
    with Client(target, ADMIN) as admin:
        name = "t-" + secrets.token_hex(4)
        admin.create_tenant(name)
        return (name, *admin.issue_key(name))


def _references(start: int, count: int) -> list[Reference]:
    vectors = unit_vectors(count, DIM, seed=start)
    return [Reference(f"r{start + i}", f"text {start + i}", {"i": str(start + i)}, vectors[i].tolist())
            for i in range(count)]


def _metric(cluster: Cluster, process: str, name: str, **labels) -> float:
    """A sample of a service process's /metrics (0 when absent)."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics[process]}/metrics", timeout=5).read().decode()
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
    for line in body.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def _wait_for(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.02)


def _replayed_everything(cluster: Cluster) -> None:
    """Wait until the standby has replayed all the primary has written."""
    (target,) = cluster.sql(cluster.primary, "SELECT pg_current_wal_lsn()::text")
    _wait_for(lambda: cluster.sql(cluster.standby, f"SELECT pg_last_wal_replay_lsn() >= '{target}'")[0], 10,
              "standby replay")


@contextlib.contextmanager
def _replay_paused(cluster: Cluster):
    cluster.sql(cluster.standby, "SELECT pg_wal_replay_pause()")
    _wait_for(lambda: cluster.sql(cluster.standby, "SELECT pg_get_wal_replay_pause_state()")[0] == "paused", 10,
              "replay pause")
    try:
        yield
    finally:
        cluster.sql(cluster.standby, "SELECT pg_wal_replay_resume()")


def _episodes(prefix: str, count: int) -> list[Episode]:
    return [Episode([1, 2], [3, 4], [], FINGERPRINT, 0, "kb", episode_id=f"{prefix}-{i}") for i in range(count)]


def test_reads_are_served_by_the_standby_and_a_token_reads_your_writes(cluster):
    _, _, key = _tenant(cluster.a.target)
    routed_before = _metric(cluster, cluster.a.target, "memory3_read_routes_total", target="replica", reason="any")
    with Client(cluster.a.target, key) as client:
        client.create_bank(BankInfo("kb", FINGERPRINT, SPEC, "client", DIM, "cosine"))
        first = client.write("kb", _references(0, 5))
        logged_first = client.log_episodes(_episodes("e", 2))
        assert first.consistency_token and logged_first.consistency_token
        assert client.stats("kb", consistency_token=first.consistency_token).references == 5
        _replayed_everything(cluster)
        with _replay_paused(cluster):
            second = client.write("kb", _references(5, 3))
            logged = client.log_episodes(_episodes("f", 3))
            new_ids = [f"r{i}" for i in range(5, 8)]
            # No token: the standby answers, and its replay stopped before the second write.
            assert client.stats("kb").references == 5
            assert client.fetch("kb", new_ids, allow_missing=True) == []
            assert client.count_episodes() == (2, 0)
            # A token the standby has replayed: still the standby (it is as new as the token asks).
            assert client.stats("kb", consistency_token=first.consistency_token).references == 5
            assert client.count_episodes(consistency_token=logged_first.consistency_token) == (2, 0)
            # The second write's token: the standby has not replayed it, so the primary answers.
            token = second.consistency_token
            assert client.stats("kb", consistency_token=token).references == 8
            assert [r.external_id for r in client.fetch("kb", new_ids, consistency_token=token)] == new_ids
            nearest = client.retrieve("kb", vector=_references(5, 1)[0].embedding, top_k=1, consistency_token=token)
            assert nearest[0].external_id == "r5"
            assert client.retrieve_batch("kb", [_references(6, 1)[0].embedding], top_k=1,
                                         consistency_token=token)[0][0].external_id == "r6"
            assert len(list(client.scroll("kb", page_size=3, consistency_token=token))) == 8
            assert client.count_episodes(consistency_token=logged.consistency_token) == (5, 0)
            assert len(client.read_episodes(consistency_token=logged.consistency_token).episodes) == 5
        # Replay resumed: the standby catches up and answers tokenless reads with everything.
        _wait_for(lambda: client.stats("kb").references == 8, 10, "the standby catching up")
        with Client(cluster.a.target, _tenant(cluster.a.target)[2]) as other:  # a token is the tenant's own
            other.create_bank(BankInfo("kb", FINGERPRINT, SPEC, "client", DIM, "cosine"))
            with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "consistency_token"):
                other.stats("kb", consistency_token=token)
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "consistency_token"):
            client.stats("kb", consistency_token="not-a-token")
    routed = _metric(cluster, cluster.a.target, "memory3_read_routes_total", target="replica", reason="any")
    assert routed >= routed_before + 4  # the tokenless reads above
    assert _metric(cluster, cluster.a.target, "memory3_read_routes_total", target="primary",
                   reason="token_not_replayed") >= 6


def test_a_publish_answer_carries_a_token_that_reads_the_new_version(cluster):
    """Publish's answer carries a consistency token; Get and List presenting it see the version
    even while the standby has not replayed it (a tokenless Get there still sees the old one)."""
    import numpy as np
    from safetensors.numpy import save as save_safetensors

    def weights(seed: int) -> bytes:
        return save_safetensors({"w": np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32)})

    _, _, key = _tenant(cluster.a.target)
    with Client(cluster.a.target, key) as client:
        first = client.publish_proxy("p", weights(0), FINGERPRINT)
        assert first.version == 1 and first.consistency_token
        _replayed_everything(cluster)
        with _replay_paused(cluster):
            second = client.publish_proxy("p", weights(1), FINGERPRINT, parent_version=1)
            assert second.version == 2 and second.consistency_token
            assert client.get_proxy("p", FINGERPRINT, include_weights=False).version == 1  # the standby
            token = second.consistency_token
            assert client.get_proxy("p", FINGERPRINT, consistency_token=token).weights == weights(1)
            assert [p.version for p in client.list_proxies("p", consistency_token=token)] == [1, 2]
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "consistency_token"):
            client.get_proxy("p", FINGERPRINT, consistency_token="not-a-token")


def test_a_lagging_standby_is_skipped_and_its_lag_is_exported(cluster, embedder):
    srv = ServerThread(make_settings(cluster.primary.url, replica_urls=[cluster.standby.url],
                                     replica_max_lag_seconds=0.5, replica_check_seconds=0.1), embedder)
    try:
        with Client(srv.target, ADMIN_KEY) as admin:
            admin.create_tenant("lagging")
            _, key = admin.issue_key("lagging")
        lag = lambda: REGISTRY.get_sample_value("memory3_replica_lag_seconds", {"replica": "0"})  # noqa: E731
        up = lambda: REGISTRY.get_sample_value("memory3_replica_up", {"replica": "0"})  # noqa: E731
        with Client(srv.target, key) as client:
            client.create_bank(BankInfo("kb", FINGERPRINT, SPEC, "client", DIM, "cosine"))
            client.write("kb", _references(0, 2))
            _replayed_everything(cluster)
            _wait_for(lambda: up() == 1, 5, "the standby taken")
            with _replay_paused(cluster):
                client.write("kb", _references(2, 2))
                _wait_for(lambda: up() == 0, 5, "the lagging standby skipped")
                assert lag() > 0.5
                assert client.stats("kb").references == 4  # the primary now
            _wait_for(lambda: up() == 1, 5, "the standby taken back")
            assert lag() <= 0.5
            _wait_for(lambda: client.stats("kb").references == 4, 5, "the standby caught up")
    finally:
        srv.stop()


def test_reads_fail_over_to_the_primary_when_the_standby_stops_and_come_back(cluster):
    _, _, key = _tenant(cluster.a.target)
    target = cluster.a.target
    with Client(target, key) as client:
        client.create_bank(BankInfo("kb", FINGERPRINT, SPEC, "client", DIM, "cosine"))
        client.write("kb", _references(0, 3))
        _replayed_everything(cluster)
        _wait_for(lambda: client.stats("kb").references == 3, 5, "the write on the standby")
        cluster.standby.kill()
        try:
            stopped = time.monotonic()
            for i in range(10):  # every read answers (the SDK retries a call the vanished standby failed)
                client.write("kb", _references(3 + i, 1))
                assert client.stats("kb").references == 4 + i  # the primary: it has them all
                assert [h.external_id for h in client.fetch("kb", [f"r{3 + i}"])] == [f"r{3 + i}"]
            _wait_for(lambda: _metric(cluster, target, "memory3_replica_up", replica="0") == 0, 2, "standby skipped")
            print(f"10 writes and reads with the standby down in {time.monotonic() - stopped:.2f} s")
        finally:
            cluster.standby.start()
        before = _metric(cluster, target, "memory3_read_routes_total", target="replica", reason="any")
        _wait_for(lambda: _metric(cluster, target, "memory3_replica_up", replica="0") == 1, 10, "standby taken back")
        _wait_for(lambda: client.stats("kb").references == 13, 10, "the restarted standby caught up")
        assert _metric(cluster, target, "memory3_read_routes_total", target="replica", reason="any") > before


def test_a_key_revoked_through_one_process_is_refused_by_the_other_within_a_second(cluster):
    _, key_id, key = _tenant(cluster.a.target)
    with Client(cluster.b.target, key) as on_b, Client(cluster.a.target, ADMIN) as admin_on_a:
        on_b.create_bank(BankInfo("kb", FINGERPRINT, SPEC, "client", DIM, "cosine"))
        assert on_b.list_banks()  # B now holds the key as verified (for key_cache_seconds = 60 s)
        admin_on_a.revoke_key(key_id)
        revoked = time.monotonic()
        while True:
            try:
                on_b.list_banks()
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
                break
            assert time.monotonic() - revoked < 1.0, "process B still accepts a key revoked through A"
            time.sleep(0.01)
        print(f"refused by the other process {1000 * (time.monotonic() - revoked):.0f} ms after the revocation")


def test_a_listener_that_lost_its_connection_reconnects_and_forgets_what_it_may_have_missed(cluster):
    """Both processes' listener connections are cut, and a key is revoked through A at once: B may
    miss the notice, but its listener reconnects (backoff from 0.1 s) and drops its caches, so
    the key is refused there within a second all the same."""
    _, key_id, key = _tenant(cluster.a.target)
    listeners = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'memory3 invalidation listener'")
    with Client(cluster.b.target, key) as on_b, Client(cluster.a.target, ADMIN) as admin_on_a:
        assert on_b.list_banks() == []  # verified and cached by B
        (cut,) = cluster.sql(cluster.primary, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                              " WHERE application_name = 'memory3 invalidation listener'")
        assert cut == 2
        admin_on_a.revoke_key(key_id)
        revoked = time.monotonic()
        while True:
            try:
                on_b.list_banks()
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
                break
            assert time.monotonic() - revoked < 1.0, "process B still accepts the key a second after its revocation"
            time.sleep(0.01)
    _wait_for(lambda: cluster.sql(cluster.primary, listeners)[0] == 2, 5, "both listeners back")
    assert _metric(cluster, cluster.b.target, "memory3_invalidation_listener_up") == 1


def test_bank_and_quota_changes_reach_the_other_process_at_once(cluster):
    tenant, _, key = _tenant(cluster.a.target)
    with Client(cluster.a.target, key) as on_a, Client(cluster.b.target, key) as on_b:
        on_a.create_bank(BankInfo("kb", FINGERPRINT, SPEC, "client", DIM, "cosine"))
        assert on_b.get_bank("kb").embedder_dim == DIM  # cached by B for bank_cache_seconds = 60 s
        on_a.delete_bank("kb")
        on_a.create_bank(BankInfo("kb", FINGERPRINT, SPEC, "client", 2 * DIM, "l2"))
        assert on_b.get_bank("kb").embedder_dim == 2 * DIM  # B dropped its copy on the notice
        on_b.create_bank(BankInfo("kb2", FINGERPRINT, SPEC, "client", DIM, "cosine"))  # B reads the quota
        with Client(cluster.a.target, ADMIN) as admin:
            admin.set_quota(tenant, "banks", 2)
        with expect_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota 'banks'"):
            on_b.create_bank(BankInfo("kb3", FINGERPRINT, SPEC, "client", DIM, "cosine"))


def test_the_sdk_balances_over_both_processes(cluster):
    _, _, key = _tenant(cluster.a.target)
    handled = lambda target: _metric(cluster, target, "grpc_server_handled_total", grpc_code="OK",  # noqa: E731
                                     grpc_method="ListBanks", grpc_service="memory3.v1.Banks", grpc_type="unary")
    before = {t: handled(t) for t in (cluster.a.target, cluster.b.target)}
    with Client(f"{cluster.a.target},{cluster.b.target}", key) as client:
        for _ in range(20):
            client.list_banks()
    for target, count in before.items():
        assert handled(target) - count >= 5, "round robin sends calls to every process"


def test_several_addresses_make_one_balanced_target():
    from memory3.sdk.client.transport import BALANCED_SERVICE_CONFIG, SERVICE_CONFIG, channel_target

    assert channel_target("127.0.0.1:50051") == ("127.0.0.1:50051", None)  # one address (or DNS name): as is
    assert channel_target("dns:///memory3:50051") == ("dns:///memory3:50051", None)
    assert channel_target("127.0.0.1:1, 127.0.0.2:2") == ("ipv4:127.0.0.1:1,127.0.0.2:2", None)
    assert channel_target(["[::1]:1", "[::1]:2"]) == ("ipv6:[::1]:1,[::1]:2", None)
    target, tls_name = channel_target(["localhost:1", "127.0.0.1:2"])  # a name: resolved, and verified by TLS
    assert target.startswith("ipv4:127.0.0.1:1") and tls_name == "localhost"
    for wrong in ("127.0.0.1,127.0.0.2", "127.0.0.1:1,[::1]:2", ""):
        with pytest.raises(ValueError):
            channel_target(wrong)
    assert '"round_robin"' in BALANCED_SERVICE_CONFIG and "round_robin" not in SERVICE_CONFIG  # one address: as before


def test_replica_lag_is_how_long_ago_the_primary_first_wrote_past_the_replay_position():
    from sqlalchemy.ext.asyncio import create_async_engine

    from memory3.service.config import load_settings
    from memory3.service.replicas import Replicas
    from memory3.service.tokens import Tokens

    engine = create_async_engine("postgresql+psycopg://nobody@/nowhere")  # never connected
    replicas = Replicas(engine, [], load_settings(), Tokens("k" * 40))
    assert not replicas.enabled and replicas.lag(0, 10.0) == (0.0, 0)  # nothing sampled: no lag known
    replicas._samples.extend([(1.0, 100), (2.0, 200), (3.0, 300)])
    assert replicas.lag(300, 3.5) == (0.0, 0)  # replayed all the primary had at the last sample
    assert replicas.lag(400, 3.5) == (0.0, 0)
    assert replicas.lag(250, 3.5) == (0.5, 50)  # the primary first wrote past 250 at t=3
    assert replicas.lag(150, 3.5) == (1.5, 150)
    assert replicas.lag(50, 3.5) == (2.5, 250)  # behind every sample: at least since the oldest
