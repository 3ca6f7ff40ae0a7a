"""Crash tests: the service is SIGKILLed while a writer streams references with memories and
trajectory episodes, one of two service processes is (the writer's client balancing over both),
and (separately) PostgreSQL is stopped hard. Each kill is triggered by the
writer's progress, while one of its streams is in flight, so it lands mid-stream and the SDK must
retry. Afterwards every acknowledged write is present exactly once with a valid checksum, every
acknowledged episode exactly once, an unacknowledged stream is all-or-nothing, and HNSW answers
equal those before the crash.

Bounded in count and time; MEMORY3_CRASH_ROUNDS sets the number of kills (bench runs more)."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from helpers import FINGERPRINT, SPEC, memory_payload, unit_vectors
from memory3.core.episodes import Episode
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import Client
from memory3.service.child_process import ServiceProcess, free_port
from memory3.service.embedded_pg import EmbeddedPostgres

ADMIN = "crash-admin-" + "k" * 8 + "0123456789abcdef0123"
DIM = 8
BATCH = 40
EPISODES_PER_BATCH = 20
ROUNDS = int(os.environ.get("MEMORY3_CRASH_ROUNDS", "3"))


@pytest.fixture
def crash_env():
    # Not under pytest's tmp dir: pytest re-tightens that dir's permissions, and the restarted
    # PostgreSQL runs as an unprivileged user that must traverse to its data directory.
    root = Path(tempfile.mkdtemp(prefix="memory3-crash-"))
    pg = EmbeddedPostgres(root / "db")
    service = ServiceProcess(pg.url, root, ADMIN)
    with Client(service.target, ADMIN) as admin:
        admin.create_tenant("crash")
        _, key = admin.issue_key("crash")
    yield pg, service, key
    service.stop()
    pg.stop()
    shutil.rmtree(root, ignore_errors=True)


def _references(start: int, count: int, payload_seed_offset: int = 0) -> list[Reference]:
    vectors = unit_vectors(count, DIM, seed=start)
    return [
        Reference(f"r{start + i}", f"reference {start + i}", {"batch": str(start // BATCH)}, vectors[i].tolist(),
                  memory_payload(seed=start + i + payload_seed_offset))
        for i in range(count)
    ]


class Writer(threading.Thread):
    """Streams batches until stopped — references with memories, then a batch of episodes, in
    turn — retrying through outages; records what was acknowledged and whether a stream is in
    flight, so a kill can be timed by progress rather than by a sleep."""

    def __init__(self, target: str, key: str, batch: int = BATCH) -> None:
        super().__init__(daemon=True)
        self.batch = batch
        self.client = Client(target, key, write_retries=40)
        self.acknowledged: dict[str, bytes] = {}
        self.episodes: set[str] = set()
        self.acked_batches = 0
        self.in_flight = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.cut_streams = 0  # stream attempts that failed (cut by a kill) and were re-sent
        send = self.client.aio.client_stream

        async def counted(method, messages):
            try:
                return await send(method, messages)
            except grpc.RpcError:
                self.cut_streams += 1
                raise

        self.client.aio.client_stream = counted

    def run(self) -> None:
        try:
            b = 0
            while not self.stop.is_set():
                refs = _references(b * self.batch, self.batch)
                episodes = _episodes(b)
                self.in_flight.set()
                self.client.write("kb", refs)
                self.acknowledged.update({r.external_id: r.memory for r in refs})
                self.client.log_episodes(episodes)
                self.episodes.update(e.episode_id for e in episodes)
                self.in_flight.clear()
                self.acked_batches += 1
                b += 1
        except BaseException as err:  # surfaced by the test
            self.error = err
        finally:
            self.in_flight.clear()
            self.client.close()

    def kill_in_flight(self, kill, rounds: int, min_batches_between: int = 1) -> int:
        """``rounds`` times: once a batch has been acknowledged since the last kill, wait for the
        next stream in flight and ``kill()``; the number of kills that landed in a stream."""
        landed = 0
        for _ in range(rounds):
            start = self.acked_batches
            deadline = time.time() + 120
            while self.acked_batches < start + min_batches_between or not self.in_flight.is_set():
                assert time.time() < deadline and self.is_alive(), self.error or "the writer made no progress"
                time.sleep(0.001)
            before = self.acked_batches
            kill()
            if self.acked_batches == before:  # its batch was not acknowledged before the kill: retried
                landed += 1
        return landed


def _episodes(batch: int) -> list[Episode]:
    return [Episode(list(range(8)), list(range(16)), [], FINGERPRINT, 0, "kb", episode_id=f"e{batch}-{i}")
            for i in range(EPISODES_PER_BATCH)]


def _check_everything_acknowledged_is_intact(client: Client, writer: Writer) -> None:
    acknowledged = writer.acknowledged
    ids = sorted(acknowledged)
    stored = [s for start in range(0, len(ids), 5000)  # FrameAssembler verifies each memory's CRC32
              for s in client.fetch("kb", ids[start:start + 5000])]
    assert [s.external_id for s in stored] == ids
    for s in stored:
        assert s.memory == acknowledged[s.external_id]
    assert client.stats("kb").references == len(ids)
    logged = [e.episode_id for e in client.read_episodes().episodes]
    assert len(logged) == len(set(logged))  # each episode once, retried or not
    assert writer.episodes <= set(logged)
    assert len(logged) <= len(writer.episodes) + EPISODES_PER_BATCH  # at most the batch in flight at the end


def _query_answers(client: Client) -> list[list[tuple[str, float]]]:
    return [[(h.external_id, round(h.score, 5)) for h in client.retrieve("kb", vector=q.tolist(), top_k=5)]
            for q in unit_vectors(10, DIM, seed=999)]


def test_service_sigkill_during_writes(crash_env):
    pg, service, key = crash_env
    with Client(service.target, key) as client:
        client.create_bank(BankInfo("kb", FINGERPRINT, SPEC, "client", DIM, "cosine"))
    writer = Writer(service.target, key)
    writer.start()

    def kill_and_restart():
        service.kill()
        service.start()

    landed = writer.kill_in_flight(kill_and_restart, ROUNDS)
    writer.stop.set()
    writer.join(300)
    assert not writer.is_alive() and writer.error is None, writer.error
    print(f"service SIGKILLs that landed in a stream: {landed} of {ROUNDS}")
    assert landed >= max(1, ROUNDS - 1)  # each round's stream was cut and retried (one may finish first)
    with Client(service.target, key) as client:
        _check_everything_acknowledged_is_intact(client, writer)
        before = _query_answers(client)

        # an unacknowledged stream cut by a crash is all or nothing
        doomed = _references(10_000, 200, payload_seed_offset=7)
        no_retry = Client(service.target, key, write_retries=0)
        outcome: list = []
        t = threading.Thread(target=lambda: outcome.append(_try(no_retry.write, "kb", doomed)))
        t.start()
        time.sleep(0.3)
        service.kill()
        t.join(60)
        no_retry.close()
        service.start()
        present = client.fetch("kb", [r.external_id for r in doomed], allow_missing=True)
        acknowledged = not isinstance(outcome[0], grpc.RpcError)
        assert len(present) == (len(doomed) if acknowledged else len(present))
        assert len(present) in (0, len(doomed)), f"{len(present)} of {len(doomed)} visible after a crash"
        if present:
            assert all(p.memory == r.memory for p, r in zip(present, doomed))
            client.delete("kb", [r.external_id for r in doomed])
        assert _query_answers(client) == before


def _try(fn, *args):
    try:
        return fn(*args)
    except grpc.RpcError as err:
        return err


def test_postgres_hard_stop_during_writes(crash_env):
    pg, service, key = crash_env
    with Client(service.target, key) as client:
        client.create_bank(BankInfo("kb", FINGERPRINT, SPEC, "client", DIM, "cosine"))
    writer = Writer(service.target, key)
    writer.start()
    rng = random.Random(1)

    def stop_and_restart():
        pg.kill()
        time.sleep(rng.uniform(0.2, 1.0))
        pg.restart()

    landed = writer.kill_in_flight(stop_and_restart, ROUNDS)
    writer.stop.set()
    writer.join(300)
    assert not writer.is_alive() and writer.error is None, writer.error
    print(f"PostgreSQL immediate stops that landed in a stream: {landed} of {ROUNDS}")
    assert landed >= max(1, ROUNDS - 1)
    with Client(service.target, key) as client:
        _check_everything_acknowledged_is_intact(client, writer)
        before = _query_answers(client)
        pg.kill()
        pg.restart()
        deadline = time.time() + 30
        while True:  # the pool notices the restarted database on the next checkout
            try:
                after = _query_answers(client)
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE and time.time() < deadline, err
                time.sleep(0.5)
        assert after == before
        assert np.isfinite([s for row in after for _, s in row]).all()


@pytest.fixture
def two_services():
    """One database, two `memory3 serve` processes (each with its metrics port)."""
    root = Path(tempfile.mkdtemp(prefix="memory3-crash2-"))
    pg = EmbeddedPostgres(root / "db")
    services: list[ServiceProcess] = []
    try:
        for name in "ab":
            services.append(ServiceProcess(pg.url, root / name, ADMIN, metrics_port=str(free_port()),
                                           drain_notice_seconds="0"))
        with Client(services[0].target, ADMIN) as admin:
            admin.create_tenant("crash")
            _, key = admin.issue_key("crash")
        yield pg, services, key
    finally:
        for service in services:
            service.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def _calls_in_flight(service: ServiceProcess) -> float:
    port = service.env["MEMORY3_METRICS_PORT"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return next(float(line.split()[-1]) for line in body.splitlines() if line.startswith("memory3_rpc_in_flight "))


def test_one_of_two_service_processes_sigkilled_during_writes(two_services):
    """The writer's client balances over both processes (round robin); each round the process
    serving its stream at that moment is SIGKILLed, and restarted: the stream is retried on the
    other one, and nothing acknowledged is lost or doubled."""
    pg, services, key = two_services
    target = ",".join(service.target for service in services)
    with Client(target, key) as client:
        client.create_bank(BankInfo("kb", FINGERPRINT, SPEC, "client", DIM, "cosine"))
    writer = Writer(target, key, batch=10 * BATCH)  # streams long enough to be caught in flight
    writer.start()
    killed: list[int] = []

    def kill_the_busy_one():
        deadline = time.time() + 5
        while True:  # the process with the writer's call in flight (read from each one's metrics)
            busy = [service for service in services if _calls_in_flight(service) >= 1]
            if busy or time.time() > deadline:
                break
        victim = busy[0] if busy else services[len(killed) % 2]
        killed.append(services.index(victim))
        victim.kill()

    landed = 0
    for _ in range(ROUNDS):
        cut = writer.cut_streams
        writer.kill_in_flight(kill_the_busy_one, 1)
        acked = writer.acked_batches
        deadline = time.time() + 120
        while writer.acked_batches < acked + 1:  # the writer goes on through the surviving process
            assert time.time() < deadline and writer.is_alive(), writer.error or "no progress on the other process"
            time.sleep(0.01)
        landed += writer.cut_streams > cut
        services[killed[-1]].start()
    writer.stop.set()
    writer.join(300)
    assert not writer.is_alive() and writer.error is None, writer.error
    print(f"SIGKILLs of one of two processes that cut a stream: {landed} of {ROUNDS} (processes {killed})")
    assert landed >= max(1, ROUNDS - 1)  # each round's stream was cut and re-sent to the other process
    with Client(target, key) as client:
        _check_everything_acknowledged_is_intact(client, writer)
