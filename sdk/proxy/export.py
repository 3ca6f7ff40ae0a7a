"""Trajectories to Parquet, in the shape RLHF libraries (TRL, OpenRLHF) expect, and back.

One row per episode: ``prompt_ids``, ``response_ids``, ``action_mask`` (1 where the proxy accepted the
response token), ``logprobs`` (per token, the behaviour proxy's summed log-probability of its decisions
there), ``behaviour_logprobs`` (per decision, log p_accept or log(1 - p_accept), what off-policy
corrections divide by), ``rewards`` and ``reward`` (``rewards[reward_key]``, else their sum),
``model_version``, ``proxy_version``, ``episode_id``, ``bank``, plus the decision columns, from which
:func:`episodes_from_parquet` rebuilds the episodes exactly.

Details: docs/design.md ("Trajectory path", "Episodes and decisions").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from memory3.core.episodes import (
    DECISION_COLUMNS,
    DECISION_FIELDS,
    Decision,
    Episode,
    decision_columns,
    decisions_from_columns,
)

LOG_EPS = 1e-12  # log(0) guard for a logged p_accept of exactly 0 or 1

SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("model_version", pa.string()),
        ("proxy_version", pa.int64()),
        ("bank", pa.string()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("response_ids", pa.list_(pa.int32())),
        ("action_mask", pa.list_(pa.int8())),
        ("logprobs", pa.list_(pa.float32())),
        ("behaviour_logprobs", pa.list_(pa.float32())),
        ("rewards", pa.map_(pa.string(), pa.float64())),
        ("reward", pa.float64()),
        *[(f.column, pa.list_(getattr(pa, f.arrow_type)())) for f in DECISION_FIELDS],
        ("hidden_states", pa.binary()),
    ]
)


def behaviour_logprob(decision: Decision) -> float:
    """log π_b(action): the behaviour proxy's log-probability of the action it took."""
    p = decision.p_accept if decision.accepted else 1.0 - decision.p_accept
    return math.log(max(p, LOG_EPS))


def _row(episode: Episode, reward_key: str | None, include_hidden_states: bool) -> dict:
    n = len(episode.response_ids)
    mask, token_logprobs = [0] * n, [0.0] * n
    decision_logprobs = []
    for d in episode.decisions:
        lp = behaviour_logprob(d)
        decision_logprobs.append(lp)
        if 0 <= d.position < n:
            token_logprobs[d.position] += lp
            if d.accepted and d.candidate_token == episode.response_ids[d.position]:
                mask[d.position] = 1
    if reward_key is not None:
        reward = episode.rewards.get(reward_key)
    else:
        reward = sum(episode.rewards.values()) if episode.rewards else None
    row = {
        "episode_id": episode.episode_id, "model_version": episode.model_fingerprint,
        "proxy_version": episode.proxy_version, "bank": episode.bank, "prompt_ids": episode.prompt_ids,
        "response_ids": episode.response_ids, "action_mask": mask, "logprobs": token_logprobs,
        "behaviour_logprobs": decision_logprobs, "rewards": list(episode.rewards.items()), "reward": reward,
        "hidden_states": episode.hidden_states if include_hidden_states else None,
    }
    row.update(zip(DECISION_COLUMNS, decision_columns(episode.decisions)))
    return row


def _batches(episodes: Iterable[Episode], rows: int) -> Iterator[list[Episode]]:
    batch = []
    for episode in episodes:
        batch.append(episode)
        if len(batch) >= rows:
            yield batch
            batch = []
    if batch:
        yield batch


def write_parquet(
    episodes: Iterable[Episode], path: str | Path, *, reward_key: str | None = None,
    include_hidden_states: bool = False, row_group_episodes: int = 1024,
) -> int:
    """Write episodes to one Parquet file, a row group at a time (bounded memory); returns rows."""
    written = 0
    with pq.ParquetWriter(str(path), SCHEMA, compression="zstd") as writer:
        for batch in _batches(episodes, row_group_episodes):
            table = pa.Table.from_pylist([_row(e, reward_key, include_hidden_states) for e in batch], schema=SCHEMA)
            writer.write_table(table)
            written += len(batch)
    return written


def iter_service_episodes(client, *, page_size: int = 0, batch_episodes: int = 1024, **read_options) -> Iterator[Episode]:
    """Every episode a (blocking) :class:`~memory3.sdk.client.client.Client` Read returns, fetched
    ``batch_episodes`` at a time by cursor, so an export never holds the whole store."""
    cursor = read_options.pop("cursor", "")
    while True:
        page = client.read_episodes(cursor=cursor, limit=batch_episodes, page_size=page_size, **read_options)
        yield from page.episodes
        if len(page.episodes) < batch_episodes:
            return
        cursor = page.cursor


def export_parquet(
    client, path: str | Path, *, reward_key: str | None = None, include_hidden_states: bool = False,
    page_size: int = 0, progress: bool = False, **filter_args,
) -> int:
    """Export the episodes matching ``filter_args`` (bank, proxy_version, model_fingerprint,
    logged_after, logged_before, episode_ids) from the service to Parquet; returns rows."""
    episodes = iter_service_episodes(
        client, page_size=page_size, include_hidden_states=include_hidden_states, **filter_args
    )
    if progress:
        from tqdm import tqdm

        episodes = tqdm(episodes, total=client.count_episodes(**filter_args)[0], unit="episode", desc="export")
    return write_parquet(episodes, path, reward_key=reward_key, include_hidden_states=include_hidden_states)


def episodes_from_parquet(path: str | Path) -> list[Episode]:
    """The episodes of a file written by :func:`write_parquet` (for trainers reading offline)."""
    episodes = []
    for batch in pq.ParquetFile(str(path)).iter_batches():
        for row in batch.to_pylist():
            episodes.append(
                Episode(
                    prompt_ids=row["prompt_ids"], response_ids=row["response_ids"],
                    decisions=decisions_from_columns(row[column] for column in DECISION_COLUMNS),
                    model_fingerprint=row["model_version"], proxy_version=row["proxy_version"], bank=row["bank"],
                    rewards=dict(row["rewards"]), episode_id=row["episode_id"], hidden_states=row["hidden_states"],
                )
            )
    return episodes
