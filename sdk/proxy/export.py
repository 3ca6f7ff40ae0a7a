"""Trajectories to Parquet that Hugging Face ``datasets``, pandas and polars load as is, and back.

One row per episode in the columns of :data:`~memory3.core.episode_table.SCHEMA` (defined there
once, shared with the service's Export stream): ``prompt`` / ``completion`` (the logged texts),
``prompt_ids``, ``response_ids``, ``reward`` (``rewards[reward_key]``, else their sum) and
``rewards`` (a list of ``{name, value}``), the proxy's own columns named ``proxy_*`` so they are
not mistaken for the LLM's log-probs or action mask of TRL / OpenRLHF, plus the decision columns,
from which :func:`episodes_from_parquet` rebuilds the episodes exactly. The service's export is
:func:`export_parquet` (the Export RPC; ``memory3 trajectories export`` on the command line);
:func:`write_parquet` writes a list of episodes without the service.

Details: docs/design.md ("Trajectory export", "Episodes and decisions").
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from memory3.core.episode_table import LOG_EPS, SCHEMA, behaviour_logprob, episode_from_row, episode_row
from memory3.core.episodes import Episode

__all__ = ["LOG_EPS", "SCHEMA", "behaviour_logprob", "episodes_from_parquet", "export_parquet", "write_parquet"]

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
            table = pa.Table.from_pylist([episode_row(e, reward_key, include_hidden_states) for e in batch],
                                         schema=SCHEMA)
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
    **filter_args,
) -> int:
    """Export the episodes matching ``filter_args`` (bank, proxy_version, proxy_versions,
    model_fingerprint, logged_after, logged_before, episode_ids) from the service to Parquet through
    its Export RPC (any gRPC client can pull the same Arrow stream); returns rows. ``timeout`` and
    ``progress`` go to :meth:`~memory3.sdk.client.client.AsyncClient.export_parquet`."""
    return client.export_parquet(path, reward_key=reward_key, include_hidden_states=include_hidden_states,
                                 **filter_args)


def episodes_from_parquet(path: str | Path) -> list[Episode]:
    """The episodes of a file written by :func:`write_parquet` or :func:`export_parquet` (for
    trainers reading offline)."""
    episodes = []
    for batch in pq.ParquetFile(str(path)).iter_batches():
        episodes.extend(episode_from_row(row) for row in batch.to_pylist())
    return episodes
