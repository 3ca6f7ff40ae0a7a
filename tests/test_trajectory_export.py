"""Trajectory exports that load in the usual tools: episodes sampled by a real tiny Llama with a
real tokenizer (so they carry their decoded texts), logged through real gRPC into PostgreSQL,
exported by the `memory3 trajectories export` command in a subprocess with filters, and read
back with Hugging Face datasets, pandas and polars — ids, texts, reward and rewards equal to what
was logged. Also: texts survive Log -> Read exactly (unset stays unset), the proxy_versions filter,
bad texts refused, the CLI's mistakes as one line, and a failed export leaves no file behind."""

from __future__ import annotations

import json
import time
from datetime import timezone

import grpc
import pyarrow.parquet as pq
import pytest
from test_cli import memory3, one_line_error
from test_trajectories import as_stored, make_episode

from helpers import expect_status
from memory3.core.episodes import Episode
from memory3.sdk.client.trajectories import episode_to_record, log_requests
from memory3.sdk.proxy.export import episodes_from_parquet


def _sampled_episodes():
    """Episodes as the sampler leaves them, texts decoded by the model's tokenizer."""
    import torch

    from memory3.sdk.model.sampling import SamplingConfig
    from memory3.sdk.proxy.policy import ProxyPolicy
    from memory3.sdk.proxy.sampling import sample_with_proxy
    from tiny_models import byte_tokenizer, tiny_llama

    torch.set_num_threads(1)
    model, tok = tiny_llama(seed=1), byte_tokenizer()
    prompts = [tok(p)["input_ids"] for p in ("Hello there", "Llamas", "Grüße, ☃")]
    proxy = ProxyPolicy.for_model(model, width=8, seed=0)
    proxy.version = 1
    config = SamplingConfig(max_new_tokens=10, top_p=0.9, max_rejections=4)
    episodes = sample_with_proxy(model, proxy, prompts, config, seed=5, bank="kb", tokenizer=tok)
    for episode in episodes:
        assert episode.prompt_text == tok.decode(episode.prompt_ids, skip_special_tokens=True).replace("\x00", "\ufffd")
        assert episode.response_text is not None
    assert episodes[2].prompt_text == "Grüße, ☃"
    return episodes


def _columns(rows: list[dict]) -> dict[str, list]:
    return {name: [row[name] for row in rows] for name in ("episode_id", "prompt", "completion", "prompt_ids",
                                                           "response_ids", "reward", "rewards", "proxy_version")}


def _expected(episodes: list[Episode], reward_key: str) -> dict[str, list]:
    return {
        "episode_id": [e.episode_id for e in episodes],
        "prompt": [e.prompt_text for e in episodes], "completion": [e.response_text for e in episodes],
        "prompt_ids": [e.prompt_ids for e in episodes], "response_ids": [e.response_ids for e in episodes],
        "reward": [e.rewards.get(reward_key) for e in episodes],
        "rewards": [[{"name": k, "value": v} for k, v in sorted(e.rewards.items())] for e in episodes],
        "proxy_version": [e.proxy_version for e in episodes],
    }


def test_cli_export_with_filters_loads_in_datasets_pandas_and_polars(server, client, tenant, tmp_path):
    import datasets
    import pandas as pd
    import polars as pl

    sampled = _sampled_episodes()  # proxy version 1, bank kb, with texts
    for i, episode in enumerate(sampled):
        episode.rewards = {"rule": 0.25 * i - 0.5, "length": float(len(episode.response_ids))}
    sampled[1].response_text = ""  # an empty completion stays "", not null
    older = [make_episode(10 + i, proxy_version=1) for i in range(2)]  # logged first: --since drops them
    other_version = make_episode(20, proxy_version=2, prompt_text="v2 prompt", response_text="v2 answer")
    other_bank = make_episode(21, proxy_version=1, bank="elsewhere", prompt_text="p", response_text="c")
    version_three = make_episode(22, proxy_version=3, prompt_text="v3", response_text="not asked for")
    client.log_episodes(older)
    time.sleep(0.05)
    client.log_episodes([*sampled, other_version, other_bank, version_three])
    client.attach_reward(sampled[0].episode_id, "human", 2.0)
    sampled[0].rewards["human"] = 2.0
    page = client.read_episodes()
    since = page.logged_at[len(older)].astimezone(timezone.utc).isoformat()  # the second Log's commit time
    assert client.count_episodes(proxy_versions=[1, 2])[0] == len(older) + len(sampled) + 2

    out = tmp_path / "episodes.parquet"
    result = memory3("trajectories", "export", "--out", str(out), "--target", server.target, "--api-key",
                     tenant.api_key, "--since", since, "--proxy-version", "1", "--proxy-version", "2", "--bank", "kb",
                     "--reward-key", "rule", "--json")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and tenant.api_key not in result.stderr + result.stdout
    summary = json.loads(result.stdout)
    wanted = [*sampled, other_version]  # log order; older (time), other bank, version 3 filtered out
    assert summary == {"path": str(out), "episodes": len(wanted), "bytes": out.stat().st_size}
    assert "episode" in result.stderr  # the progress bar, on stderr
    expected = _expected(wanted, "rule")
    assert expected["completion"][1] == "" and expected["prompt"][2] == "Grüße, ☃"

    # Hugging Face datasets: the file as is
    loaded = datasets.load_dataset("parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == len(wanted)
    assert _columns(list(loaded)) == expected
    assert isinstance(loaded.features["rewards"], datasets.List)
    # pandas
    frame = pd.read_parquet(out)
    rows = frame.to_dict("records")
    for row in rows:
        row["prompt_ids"], row["response_ids"] = list(row["prompt_ids"]), list(row["response_ids"])
        row["rewards"] = [dict(r) for r in row["rewards"]]
    assert _columns(rows) == expected
    # polars
    assert _columns(pl.read_parquet(out).to_dicts()) == expected
    # and the trainer's way back in: the episodes exactly, texts included
    assert episodes_from_parquet(out) == [as_stored(e) for e in wanted]

    # episode ids and --until instead; the reward is the sum without --reward-key
    ids_out = tmp_path / "ids.parquet"
    result = memory3("trajectories", "--target", server.target, "--api-key", tenant.api_key, "export",
                     "--out", str(ids_out), "--episode", older[1].episode_id, sampled[2].episode_id,
                     "--until", since)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote 1 episodes to {ids_out}"
    table = pq.read_table(ids_out)
    assert table.column("episode_id").to_pylist() == [older[1].episode_id]
    assert table.column("reward").to_pylist() == [older[1].rewards["rule"]]
    assert table.column("prompt").to_pylist() == [None]  # logged without texts: null, not ""


def test_texts_round_trip_through_log_and_read_and_are_checked(client):
    episodes = [make_episode(1, prompt_text="ünïcode ☃ prompt", response_text=""), make_episode(2),
                make_episode(3, prompt_text="", response_text="x" * 300_000)]
    client.log_episodes(episodes)
    back = client.read_episodes().episodes
    assert back == [as_stored(e) for e in episodes]
    assert (back[0].response_text, back[1].prompt_text, back[1].response_text) == ("", None, None)
    assert client.count_episodes(proxy_versions=[5, 1]) == (3, sum(len(e.decisions) for e in episodes))
    assert client.count_episodes(proxy_versions=[2]) == (0, 0)
    assert client.count_episodes(proxy_version=1, proxy_versions=[2])[0] == 0  # both must hold
    assert client.count_episodes(proxy_versions=[-1])[0] == 0

    def refused(code, match, **texts):
        record = episode_to_record(make_episode(9, **texts))
        with expect_status(code, match):
            client.log_requests(list(log_requests([record])), retry=False)

    refused(grpc.StatusCode.INVALID_ARGUMENT, "prompt_text contains a NUL", prompt_text="a\x00b")
    refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "response_text exceeds 1048576 bytes", response_text="é" * 524_289)
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "proxy_versions"):
        client.count_episodes(proxy_versions=list(range(10_001)))
    assert client.count_episodes()[0] == 3  # nothing of the refused streams was stored


@pytest.mark.parametrize("args, status, expected", [
    (["--since", "yesterday"], 2, ["--since 'yesterday' is not an ISO 8601 time", "2025-05-01T12:00:00Z"]),
    (["--since", "2025-05-02", "--until", "2025-05-01"], 2, ["is not before --until"]),
    (["--proxy-version", "-1"], 2, ["--proxy-version -1", "0 (the initial proxy) or more"]),
    (["--timeout", "0"], 2, ["--timeout 0"]),
    (["--reward-key", "bad key!"], 2, ["--reward-key 'bad key!' is not a reward name"]),
])
def test_cli_export_mistakes_are_one_line_and_write_nothing(server, tenant, tmp_path, args, status, expected):
    out = tmp_path / "out.parquet"
    result = memory3("trajectories", "export", "--out", str(out), "--target", server.target,
                     "--api-key", tenant.api_key, *args)
    line = one_line_error(result, status, *expected)
    assert tenant.api_key not in line
    assert list(tmp_path.iterdir()) == []  # no file, no partial file


def test_cli_export_names_a_missing_directory_and_a_missing_key(server, tenant, tmp_path):
    one_line_error(memory3("trajectories", "export", "--out", str(tmp_path / "absent" / "x.parquet"),
                           "--target", server.target, "--api-key", tenant.api_key),
                   2, "--out", str(tmp_path / "absent"), "does not exist")
    one_line_error(memory3("trajectories", "export", "--out", str(tmp_path), "--target", server.target,
                           "--api-key", tenant.api_key), 2, "is a directory", "episodes.parquet")
    one_line_error(memory3("trajectories", "export", "--out", str(tmp_path / "x.parquet"), "--target", server.target),
                   2, "no API key", "MEMORY3_API_KEY")


def test_a_failed_export_leaves_the_old_file_and_no_partial_one(client, tmp_path):
    client.log_episodes([make_episode(i) for i in range(3)])
    out = tmp_path / "keep.parquet"
    out.write_bytes(b"the previous export")
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "reward_key"):
        client.export_parquet(out, reward_key="bad key!")
    with expect_status(grpc.StatusCode.DEADLINE_EXCEEDED):
        client.export_parquet(out, timeout=1e-6)
    assert out.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["keep.parquet"]
    assert client.export_parquet(out) == 3 and pq.read_table(out).num_rows == 3
    assert [p.name for p in tmp_path.iterdir()] == ["keep.parquet"]
