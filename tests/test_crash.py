"""Crash tests: the service is SIGKILLed while a writer streams references with memories, and
(separately) PostgreSQL is stopped hard. Afterwards every acknowledged write is present exactly
once with a valid checksum, an unacknowledged stream is all-or-nothing, HNSW answers equal those
before the crash, and the SDK's retries complete the rest.

Bounded in count and time; MEMORY3_CRASH_ROUNDS sets the number of kills (bench runs more)."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from helpers import FINGERPRINT, SPEC, memory_payload, unit_vectors
from memory3.sdk.client import BankInfo, Reference
from memory3.sdk.client.client import Client
from memory3.service.child_process import ServiceProcess
from memory3.service.embedded_pg import EmbeddedPostgres

ADMIN = "crash-admin-" + "k" * 8 + "0123456789abcdef0123"
DIM = 8
BATCH = 20
ROUNDS = int(os.environ.get("MEMORY3_CRASH_ROUNDS", "3"))


@pytest.fixture
def crash_env():
    # Not under pytest's tmp dir: pytest re-tightens that dir's permissions, and the restarted
    # PostgreSQL runs as an unprivileged user that must traverse to its data directory.
    root = Path(tempfile.mkdtemp(prefix="memory3-crash-"))
    pg = EmbeddedPostgres(root / "db")
    service = ServiceProcess(pg.url, root, ADMIN, key_cache_seconds=0)
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
    """Writes batches one after another, retrying through outages; records what was acknowledged."""

    def __init__(self, target: str, key: str, batches: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(target, key, write_retries=40)
        self.batches = batches
        self.acknowledged: dict[str, bytes] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for b in range(self.batches):
                refs = _references(b * BATCH, BATCH)
                self.client.write("kb", refs)
                self.acknowledged.update({r.external_id: r.memory for r in refs})
        except BaseException as err:  # surfaced by the test
            self.error = err
        finally:
            self.client.close()


def _check_everything_acknowledged_is_intact(client: Client, acknowledged: dict[str, bytes]) -> None:
    ids = sorted(acknowledged)
    stored = client.fetch("kb", ids)  # FrameAssembler verifies each memory's CRC32
    assert [s.external_id for s in stored] == ids
    for s in stored:
        assert s.memory == acknowledged[s.external_id]
    assert client.stats("kb").references == len(ids)


def _query_answers(client: Client) -> list[list[tuple[str, float]]]:
    return [[(h.external_id, round(h.score, 5)) for h in client.retrieve("kb", vector=q.tolist(), top_k=5)]
            for q in unit_vectors(10, DIM, seed=999)]


def test_service_sigkill_during_writes(crash_env):
    pg, service, key = crash_env
    rng = random.Random(0)
    with Client(service.target, key) as client:
        client.create_bank(BankInfo("kb", FINGERPRINT, SPEC, "client", DIM, "cosine"))
    writer = Writer(service.target, key, batches=6 * ROUNDS)
    writer.start()
    for _ in range(ROUNDS):
        time.sleep(rng.uniform(0.3, 1.5))
        service.kill()
        service.start()
    writer.join(300)
    assert not writer.is_alive() and writer.error is None, writer.error
    with Client(service.target, key) as client:
        _check_everything_acknowledged_is_intact(client, writer.acknowledged)
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
    writer = Writer(service.target, key, batches=4 * ROUNDS)
    writer.start()
    rng = random.Random(1)
    for _ in range(ROUNDS):
        time.sleep(rng.uniform(0.3, 1.0))
        pg.kill()
        time.sleep(rng.uniform(0.2, 1.0))
        pg.restart()
    writer.join(300)
    assert not writer.is_alive() and writer.error is None, writer.error
    with Client(service.target, key) as client:
        _check_everything_acknowledged_is_intact(client, writer.acknowledged)
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
