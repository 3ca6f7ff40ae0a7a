"""Trajectories through real gRPC and PostgreSQL: Log -> Read round trip, deduplication by
episode id, AttachReward, resumable cursors, filters, Parquet export, tenant isolation, bad input."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta, timezone

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import FINGERPRINT, expect_status
from memory3.core.episodes import Decision, Episode
from memory3.sdk.client.client import Client
from memory3.sdk.client.trajectories import episode_to_record, log_requests
from memory3.sdk.proxy.export import episodes_from_parquet, export_parquet, write_parquet


def f32(x: float) -> float:
    return float(np.float32(x))


def make_episode(seed: int, *, proxy_version: int = 1, bank: str = "kb", n_response: int = 12, **kw) -> Episode:
    rng = random.Random(seed)
    response = [rng.randrange(1000) for _ in range(n_response)]
    decisions = []
    for pos, tok in enumerate(response):
        rejected = rng.randrange(3)
        for r in range(rejected):
            decisions.append(Decision(pos, rng.randrange(1000), rng.random(), rng.randrange(40), rng.random(), False, r))
        decisions.append(Decision(pos, tok, rng.random(), rng.randrange(40), rng.random(), True, rejected))
    return Episode(
        prompt_ids=[rng.randrange(1000) for _ in range(rng.randrange(1, 20))], response_ids=response,
        decisions=decisions, model_fingerprint=FINGERPRINT, proxy_version=proxy_version, bank=bank,
        rewards={"rule": rng.uniform(-1, 1)}, **kw,
    )


def as_stored(episode: Episode) -> Episode:
    """What the service gives back: probabilities rounded to float32 (their wire and column type)."""
    decisions = [
        Decision(d.position, d.candidate_token, f32(d.llm_prob), d.rank, f32(d.p_accept), d.accepted, d.rejections)
        for d in episode.decisions
    ]
    return Episode(
        list(episode.prompt_ids), list(episode.response_ids), decisions, episode.model_fingerprint,
        episode.proxy_version, episode.bank, dict(episode.rewards), episode.episode_id, episode.hidden_states,
        episode.prompt_text, episode.response_text,
    )


def test_log_read_round_trip_exact(client):
    episodes = [make_episode(i) for i in range(25)]
    episodes[3].hidden_states = b"\x28\xb5\x2f\xfd compressed"
    episodes[4].decisions = []
    episodes[4].response_ids = []
    summary = client.log_episodes(episodes)
    assert (summary.logged, summary.duplicates) == (25, 0)
    assert summary.decisions == sum(len(e.decisions) for e in episodes)
    page = client.read_episodes(include_hidden_states=True)
    assert page.episodes == [as_stored(e) for e in episodes]  # log order, every field
    assert all(abs(t - datetime.now(timezone.utc)) < timedelta(minutes=5) for t in page.logged_at)
    without = client.read_episodes(omit_decisions=True)
    assert without.episodes[0].decisions == [] and without.episodes[0].response_ids == episodes[0].response_ids
    assert without.episodes[3].hidden_states is None  # hidden states only on request
    assert client.count_episodes() == (25, summary.decisions)


def test_duplicates_are_not_counted_twice(client):
    episodes = [make_episode(i) for i in range(10)]
    first = client.log_episodes(episodes[:6])
    again = client.log_episodes(episodes)  # a retry that overlaps
    assert (first.logged, first.duplicates) == (6, 0)
    assert (again.logged, again.duplicates) == (4, 6)
    assert again.decisions == sum(len(e.decisions) for e in episodes[6:])
    in_one = client.log_episodes([make_episode(99, episode_id="same"), make_episode(98, episode_id="same")])
    assert (in_one.logged, in_one.duplicates) == (1, 1)
    assert client.count_episodes()[0] == 11
    stored = client.read_episodes(episode_ids=["same"]).episodes
    assert stored == [as_stored(make_episode(99, episode_id="same"))]  # the first copy wins


def test_attach_reward_then_read(client):
    episode = make_episode(1)
    client.log_episodes([episode])
    first = client.attach_reward(episode.episode_id, "human", 1.0)
    assert first.changed and first.rewards == {**episode.rewards, "human": 1.0}
    again = client.attach_reward(episode.episode_id, "human", 1.0)  # idempotent
    assert not again.changed and again.rewards == first.rewards
    revised = client.attach_reward(episode.episode_id, "human", -0.25)
    assert revised.changed and revised.rewards["human"] == -0.25
    got = client.read_episodes().episodes[0]
    assert got.rewards == {"rule": episode.rewards["rule"], "human": -0.25}


def test_cursor_resumes_without_gaps_or_repeats(client):
    episodes = [make_episode(i, n_response=3) for i in range(53)]
    client.log_episodes(episodes)
    seen, cursor = [], ""
    while True:
        page = client.read_episodes(cursor=cursor, limit=7, page_size=3)
        if not page.episodes:
            break
        assert len(page.episodes) <= 7
        seen += [e.episode_id for e in page.episodes]
        cursor = page.cursor
    assert seen == [e.episode_id for e in episodes]
    # Episodes logged after a reader finished are picked up from its last cursor.
    late = [make_episode(100 + i) for i in range(3)]
    client.log_episodes(late)
    assert [e.episode_id for e in client.read_episodes(cursor=cursor).episodes] == [e.episode_id for e in late]
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "cursor"):
        client.read_episodes(cursor="bogus")


def test_filters(client):
    client.log_episodes([make_episode(i, proxy_version=i % 3, bank=f"b{i % 2}") for i in range(12)])
    assert client.count_episodes(proxy_version=2)[0] == 4
    assert client.count_episodes(bank="b1")[0] == 6
    assert client.count_episodes(bank="b1", proxy_version=0)[0] == 2
    got = client.read_episodes(proxy_version=1, bank="b0").episodes
    assert [e.proxy_version for e in got] == [1, 1] and {e.bank for e in got} == {"b0"}
    assert client.count_episodes(model_fingerprint="other")[0] == 0
    now = datetime.now(timezone.utc)
    assert client.count_episodes(logged_after=now + timedelta(hours=1))[0] == 0
    assert client.count_episodes(logged_before=now + timedelta(hours=1))[0] == 12
    assert client.count_episodes(logged_after=now - timedelta(hours=1), logged_before=now - timedelta(minutes=30))[0] == 0


def test_parquet_export_readable(client, tmp_path):
    episodes = [make_episode(i) for i in range(9)]
    client.log_episodes(episodes)
    client.attach_reward(episodes[0].episode_id, "human", 2.0)
    path = tmp_path / "traj.parquet"
    rows = export_parquet(client, path)  # through the Export RPC's Arrow stream
    assert rows == 9
    table = pq.read_table(path)
    for column in ("prompt", "completion", "prompt_ids", "response_ids", "proxy_action_mask", "proxy_decision_logprobs",
                   "proxy_logprobs", "rewards", "reward", "model_version", "proxy_version", "episode_id",
                   "decision_p_accept"):
        assert column in table.column_names
    assert "logprobs" not in table.column_names and "action_mask" not in table.column_names  # the LLM's, in TRL
    first = episodes[0]
    row = table.slice(0, 1).to_pylist()[0]
    assert row["episode_id"] == first.episode_id and row["model_version"] == FINGERPRINT
    assert row["prompt_ids"] == first.prompt_ids and row["response_ids"] == first.response_ids
    assert row["proxy_action_mask"] == [1] * len(first.response_ids)  # make_episode accepts every response token
    expected = [math.log(f32(d.p_accept)) if d.accepted else math.log1p(-f32(d.p_accept)) for d in first.decisions]
    np.testing.assert_allclose(row["proxy_decision_logprobs"], expected, rtol=1e-5)
    per_token = [sum(lp for d, lp in zip(first.decisions, expected) if d.position == t) for t in range(12)]
    np.testing.assert_allclose(row["proxy_logprobs"], per_token, rtol=1e-5)
    assert row["rewards"] == sorted([{"name": "rule", "value": first.rewards["rule"]}, {"name": "human", "value": 2.0}],
                                    key=lambda r: r["name"])
    assert row["prompt"] is None and row["completion"] is None  # make_episode logs no texts
    assert row["reward"] == pytest.approx(first.rewards["rule"] + 2.0)
    df = table.to_pandas()  # pandas is a test dependency: this always runs
    assert list(df.episode_id) == [e.episode_id for e in episodes]
    assert list(df.response_ids.iloc[0]) == first.response_ids
    # the trainer's way back in
    back = episodes_from_parquet(path)
    assert [e.episode_id for e in back] == [e.episode_id for e in episodes]
    assert back[1] == as_stored(episodes[1])
    # straight from a list of episodes, without the service
    assert write_parquet(episodes, tmp_path / "local.parquet") == 9
    assert pq.read_table(tmp_path / "local.parquet").num_rows == 9


def test_the_export_rpc_is_an_arrow_stream_any_client_can_read(server, client, tenant):
    """The Export RPC without the SDK: its chunks concatenated are one Arrow IPC stream, filtered on
    the server (here by episode ids), a page at a time; an unknown reward key name is refused."""
    import grpc
    import pyarrow as pa

    from helpers import expect_status
    from memory3.v1 import trajectories_pb2, trajectories_pb2_grpc

    episodes = [make_episode(100 + i) for i in range(5)]
    client.log_episodes(episodes)
    wanted = [episodes[1].episode_id, episodes[3].episode_id]
    with grpc.insecure_channel(server.target) as channel:
        stub = trajectories_pb2_grpc.TrajectoriesStub(channel)
        auth = (("authorization", f"Bearer {tenant.api_key}"),)
        chunks = list(stub.Export(trajectories_pb2.ExportRequest(
            filter=trajectories_pb2.EpisodeFilter(episode_ids=wanted), reward_key="rule"), metadata=auth, timeout=30))
        table = pa.ipc.open_stream(b"".join(c.data for c in chunks)).read_all()
        assert table.column("episode_id").to_pylist() == wanted
        assert table.column("reward").to_pylist() == [episodes[1].rewards["rule"], episodes[3].rewards["rule"]]
        empty = list(stub.Export(trajectories_pb2.ExportRequest(
            filter=trajectories_pb2.EpisodeFilter(episode_ids=["none"])), metadata=auth, timeout=30))
        assert pa.ipc.open_stream(b"".join(c.data for c in empty)).read_all().num_rows == 0  # still a valid stream
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "reward_key"):
            list(stub.Export(trajectories_pb2.ExportRequest(reward_key="bad key!"), metadata=auth, timeout=30))


def test_tenant_isolation(server, client, new_tenant):
    episode = make_episode(7)
    client.log_episodes([episode])
    other = new_tenant()
    with Client(server.target, other.api_key) as intruder:
        assert intruder.read_episodes().episodes == []
        assert intruder.count_episodes() == (0, 0)
        assert intruder.read_episodes(episode_ids=[episode.episode_id]).episodes == []
        with expect_status(grpc.StatusCode.NOT_FOUND):
            intruder.attach_reward(episode.episode_id, "human", 1.0)
        # the same episode id is a different episode in another tenant: not a duplicate
        summary = intruder.log_episodes([episode])
        assert (summary.logged, summary.duplicates) == (1, 0)
    assert client.count_episodes() == (1, len(episode.decisions))
    with Client(server.target, "m3_0000000000000000_" + "x" * 43) as anonymous:
        with expect_status(grpc.StatusCode.UNAUTHENTICATED):
            anonymous.count_episodes()


def _bad(client, mutate, code=grpc.StatusCode.INVALID_ARGUMENT, match=None):
    record = episode_to_record(make_episode(5))
    mutate(record)
    with expect_status(code, match):
        client.log_requests(list(log_requests([record])), retry=False)


def test_bad_input(client):
    with expect_status(grpc.StatusCode.NOT_FOUND, "not found"):
        client.attach_reward("no-such-episode", "human", 1.0)
    episode = make_episode(3)
    client.log_episodes([episode])
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "finite"):
        client.attach_reward(episode.episode_id, "human", float("nan"))
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "finite"):
        client.attach_reward(episode.episode_id, "human", float("inf"))
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "reward name"):
        client.attach_reward(episode.episode_id, "", 1.0)
    _bad(client, lambda r: setattr(r, "episode_id", ""), match="episode_id")
    _bad(client, lambda r: setattr(r, "model_fingerprint", ""), match="model_fingerprint")
    _bad(client, lambda r: r.decision_p_accept.append(0.5), match="equal lengths")
    _bad(client, lambda r: r.decision_p_accept.__setitem__(0, 1.5), match="p_accept")
    _bad(client, lambda r: r.decision_llm_prob.__setitem__(0, float("nan")), match="llm_prob")
    _bad(client, lambda r: r.prompt_ids.append(-3), match="prompt_ids")
    _bad(client, lambda r: r.decision_position.__setitem__(0, 10_000), match="positions")
    _bad(client, lambda r: r.rewards.__setitem__("rule", float("nan")), match="finite")
    _bad(client, lambda r: setattr(r, "bank", "bad bank!"), match="bank")
    _bad(client, lambda r: setattr(r, "proxy_version", -1), match="proxy_version")
    _bad(client, lambda r: r.prompt_ids.extend([1] * 70_000), grpc.StatusCode.RESOURCE_EXHAUSTED, "tokens")
    # a refused stream commits nothing, not even its valid episodes
    good, bad = episode_to_record(make_episode(11)), episode_to_record(make_episode(12))
    bad.decision_rank.append(1)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT):
        client.log_requests(list(log_requests([good, bad])), retry=False)
    assert client.count_episodes(episode_ids=[good.episode_id])[0] == 0
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "page_size"):
        client.read_episodes(page_size=10**6)


def test_time_window_and_cursor_together(client):
    """A time filter and a resume cursor in one Read (their SQL parameters once collided)."""
    from datetime import datetime, timedelta, timezone

    from memory3.core.episodes import Decision, Episode

    episodes = [Episode([1, 2], [3], [Decision(0, 3, 0.5, 0, 0.9, True, 0)], "ab" * 32, 1, "kb") for _ in range(5)]
    client.log_episodes(episodes)
    now = datetime.now(timezone.utc)
    window = dict(logged_after=now - timedelta(minutes=5), logged_before=now + timedelta(minutes=5))
    first = client.read_episodes(limit=2, **window)
    rest = client.read_episodes(limit=10, cursor=first.cursor, **window)
    ids = [e.episode_id for e in first.episodes + rest.episodes]
    assert sorted(ids) == sorted(e.episode_id for e in episodes)
