"""The background trajectory logger against real servers: batching, a service outage (the server
stopped, the episodes spooled to disk, a new server started on the same port and database),
replay that loses nothing and counts nothing twice, crash leftovers, refused episodes and
compressed hidden states."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest
from conftest import ServerThread, make_settings
from test_trajectories import as_stored, make_episode

from memory3.sdk.client.client import Client
from memory3.sdk.proxy.logger import Spool, TrajectoryLogger, pack_hidden_states, unpack_hidden_states


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_logger_batches_and_logs_everything(client, tmp_path):
    episodes = [make_episode(i) for i in range(300)]
    with TrajectoryLogger(client=client, spool_dir=tmp_path, batch_episodes=64) as logger:
        for episode in episodes:
            logger.log(episode)
        assert logger.flush(30)
        assert logger.stats.logged == 300 and logger.stats.spooled == 0
    assert client.read_episodes().episodes == [as_stored(e) for e in episodes]


def test_outage_spool_and_replay_lose_and_duplicate_nothing(database_url, embedder, tenant, tmp_path):
    port = free_port()
    settings = make_settings(database_url).model_copy(update={"port": port})  # fixed: the logger reconnects to it
    first = ServerThread(settings, embedder)
    episodes = [make_episode(i) for i in range(400)]
    logger = TrajectoryLogger(f"127.0.0.1:{port}", tenant.api_key, spool_dir=tmp_path, batch_episodes=50,
                              retry_interval=0.5, timeout=5.0)
    try:
        for episode in episodes[:150]:
            logger.log(episode)
        assert logger.flush(30) and logger.stats.logged == 150
        first.stop()  # the service goes away
        for episode in episodes[150:300]:
            logger.log(episode)
        assert logger.flush(60)
        assert logger.stats.spooled == 150 and logger.pending_spool() == 150
        # a crash after a segment was half-sent: its first episodes are already stored
        Spool(tmp_path).append(episodes[100:150])  # left .open by a "dead" writer: adopted on replay
        second = ServerThread(settings, embedder)  # back, same port, same database
        try:
            for episode in episodes[300:]:
                logger.log(episode)
            assert logger.flush(30)
            assert wait_until(lambda: logger.pending_spool() == 0), "the spool was not replayed"
            with Client(second.target, tenant.api_key) as check:
                stored = check.read_episodes(omit_decisions=True).episodes
                assert check.count_episodes() == (400, sum(len(e.decisions) for e in episodes))
            assert sorted(e.episode_id for e in stored) == sorted(e.episode_id for e in episodes)
            assert len({e.episode_id for e in stored}) == 400
            assert logger.stats.logged == 400  # each episode counted once ...
            assert logger.stats.duplicates == 50  # ... and the re-sent ones recognised as duplicates
            # everything spooled (the outage, plus whatever went out while the channel reconnected)
            # and the adopted half-sent segment went through the replay
            assert logger.stats.spooled >= 150 and logger.stats.replayed == logger.stats.spooled + 50
        finally:
            logger.close()
            second.stop()
    finally:
        if logger._thread.is_alive():
            logger.close(5)
    assert not list(tmp_path.glob("*.jsonl")) and not list(tmp_path.glob("*.open"))


def test_leftover_spool_is_replayed_on_start_and_torn_line_skipped(client, tmp_path):
    episodes = [make_episode(500 + i) for i in range(20)]
    spool = Spool(tmp_path)
    spool.append(episodes)
    spool.seal()
    segment = next(tmp_path.glob("*.jsonl"))
    with open(segment, "ab") as handle:
        handle.write(b'{"episode_id": "torn", "bank"')  # a crash mid-write
    with TrajectoryLogger(client=client, spool_dir=tmp_path, retry_interval=0.2) as logger:
        assert wait_until(lambda: logger.pending_spool() == 0)
    assert client.count_episodes()[0] == 20


def test_refused_episodes_are_set_aside_not_retried(client, tmp_path):
    good = [make_episode(600 + i) for i in range(5)]
    bad = make_episode(700)
    bad.decisions[0].p_accept = 7.0  # not a probability: INVALID_ARGUMENT
    with TrajectoryLogger(client=client, spool_dir=tmp_path) as logger:
        for episode in [*good[:2], bad, *good[2:]]:
            logger.log(episode)
        assert logger.flush(30)
        assert (logger.stats.logged, logger.stats.rejected, logger.stats.spooled) == (5, 1, 0)
    assert client.count_episodes()[0] == 5
    rejected = list(tmp_path.glob("rejected-*.jsonl"))
    assert len(rejected) == 1 and bad.episode_id in rejected[0].read_text()


@pytest.mark.parametrize("flag", [False, True])
def test_hidden_states_only_with_the_flag(client, tmp_path, flag):
    states = np.random.default_rng(0).standard_normal((12, 64)).astype(np.float32)
    episode = make_episode(800, hidden_states=pack_hidden_states(states))
    raw = make_episode(801, hidden_states=states.tobytes())  # not yet compressed: the logger compresses
    with TrajectoryLogger(client=client, spool_dir=tmp_path, log_hidden_states=flag) as logger:
        logger.log(episode)
        logger.log(raw)
    stored = client.read_episodes(include_hidden_states=True).episodes
    if not flag:
        assert [e.hidden_states for e in stored] == [None, None]
        return
    np.testing.assert_allclose(unpack_hidden_states(stored[0].hidden_states), states, atol=1e-2)
    import zstandard

    assert zstandard.ZstdDecompressor().decompress(stored[1].hidden_states) == states.tobytes()
