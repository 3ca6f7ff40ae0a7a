"""Client calls of the Trajectories and Proxies services, mixed into :class:`~memory3.sdk.client.client.AsyncClient`
(and so also available, blocking, on :class:`~memory3.sdk.client.client.Client`).

Episodes travel as :class:`~memory3.core.episodes.Episode`; on the wire their decisions are
packed column-wise (see trajectories.proto). Probabilities are float32 on the wire and in the
store, so ``llm_prob`` / ``p_accept`` come back rounded to float32.

Log is idempotent by episode id (the server deduplicates), so a failed Log stream is simply
re-sent whole; the other calls are retried on UNAVAILABLE by gRPC's retry policy (transport.py).

Export lands in Parquet all or nothing: the stream is written to a hidden file beside the target
and renamed over it only once the stream has ended cleanly, so a failed or interrupted export
never leaves a file that looks complete.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import queue
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from memory3.core.batching import size_batches
from memory3.core.episodes import DECISION_COLUMNS, Episode, decision_columns, decisions_from_columns
from memory3.sdk.client.transport import DEFAULT_CHUNK_BYTES
from memory3.v1 import proxies_pb2, trajectories_pb2

# Log messages are packed up to this many bytes (well under the 4 MiB gRPC default and the
# service's limit); an episode larger than that travels alone.
LOG_MESSAGE_BYTES = 1024 * 1024


class ChecksumMismatch(Exception):
    """Proxy weights arrived with a sha256 other than the registry's."""


@dataclass
class LogSummary:
    logged: int = 0
    duplicates: int = 0
    decisions: int = 0
    consistency_token: str = ""  # as WriteSummary's: pass to a read to see these episodes on any replica

    def __iadd__(self, other: "LogSummary") -> "LogSummary":
        self.logged += other.logged
        self.duplicates += other.duplicates
        self.decisions += other.decisions
        self.consistency_token = other.consistency_token or self.consistency_token
        return self


@dataclass
class AttachedReward:
    changed: bool                 # False: the episode already had this reward with this value
    rewards: dict[str, float]     # the episode's rewards afterwards


@dataclass
class EpisodePage:
    """Episodes of a Read and the cursor that resumes right after the last of them."""

    episodes: list[Episode]
    cursor: str
    logged_at: list[datetime] = field(default_factory=list)


@dataclass
class ProxyInfo:
    name: str
    version: int
    model_fingerprint: str
    parent_version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    weights_size: int = 0
    weights_sha256: str = ""  # hex
    created_at: datetime | None = None
    weights: bytes | None = None
    # Publish's answer only: pass to get_proxy / list_proxies (or any read) to see this version even
    # on a read replica ("" from a service without replicas), as WriteSummary.consistency_token.
    consistency_token: str = ""


# --- conversions -------------------------------------------------------------------------------


def episode_to_record(episode: Episode, include_hidden_states: bool = True) -> trajectories_pb2.EpisodeRecord:
    record = trajectories_pb2.EpisodeRecord(
        episode_id=episode.episode_id, bank=episode.bank, model_fingerprint=episode.model_fingerprint,
        proxy_version=episode.proxy_version, prompt_ids=episode.prompt_ids, response_ids=episode.response_ids,
        rewards=episode.rewards,
        hidden_states=(episode.hidden_states or b"") if include_hidden_states else b"",
    )
    for column, values in zip(DECISION_COLUMNS, decision_columns(episode.decisions)):
        getattr(record, column).extend(values)
    if episode.prompt_text is not None:
        record.prompt_text = episode.prompt_text
    if episode.response_text is not None:
        record.response_text = episode.response_text
    return record


def episode_from_record(record: trajectories_pb2.EpisodeRecord) -> Episode:
    return Episode(
        prompt_ids=list(record.prompt_ids),
        response_ids=list(record.response_ids),
        decisions=decisions_from_columns(list(getattr(record, column)) for column in DECISION_COLUMNS),
        model_fingerprint=record.model_fingerprint,
        proxy_version=record.proxy_version,
        bank=record.bank,
        rewards=dict(record.rewards),
        episode_id=record.episode_id,
        hidden_states=record.hidden_states or None,
        prompt_text=record.prompt_text if record.HasField("prompt_text") else None,
        response_text=record.response_text if record.HasField("response_text") else None,
    )


def log_requests(
    records: Iterable[trajectories_pb2.EpisodeRecord], message_bytes: int = LOG_MESSAGE_BYTES
) -> Iterator[trajectories_pb2.LogRequest]:
    """Pack episode records into Log messages of about ``message_bytes`` each."""
    for batch in size_batches(records, message_bytes, overhead=8):  # 8: field tag and length per record
        yield trajectories_pb2.LogRequest(episodes=batch)


def _timestamp(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=timezone.utc))
    return ts


def episode_filter(
    *,
    bank: str | None = None,
    proxy_version: int | None = None,
    model_fingerprint: str | None = None,
    logged_after: datetime | None = None,
    logged_before: datetime | None = None,
    episode_ids: Sequence[str] | None = None,
    proxy_versions: Sequence[int] | None = None,
) -> trajectories_pb2.EpisodeFilter:
    flt = trajectories_pb2.EpisodeFilter(episode_ids=list(episode_ids or ()),
                                         proxy_versions=list(proxy_versions or ()))
    if bank is not None:
        flt.bank = bank
    if proxy_version is not None:
        flt.proxy_version = proxy_version
    if model_fingerprint is not None:
        flt.model_fingerprint = model_fingerprint
    if logged_after is not None:
        flt.logged_after.CopyFrom(_timestamp(logged_after))
    if logged_before is not None:
        flt.logged_before.CopyFrom(_timestamp(logged_before))
    return flt


def proxy_info_from_proto(info: proxies_pb2.ProxyInfo) -> ProxyInfo:
    return ProxyInfo(
        name=info.name, version=info.version, model_fingerprint=info.model_fingerprint,
        parent_version=info.parent_version, metrics=dict(info.metrics),
        config=json.loads(info.config_json or "{}"), weights_size=info.weights_size,
        weights_sha256=info.weights_sha256.hex(),
        created_at=info.created_at.ToDatetime(tzinfo=timezone.utc) if info.HasField("created_at") else None,
        consistency_token=info.consistency_token,
    )


def publish_requests(
    name: str, weights: bytes, model_fingerprint: str, parent_version: int, metrics: dict[str, float] | None,
    config: dict | None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[proxies_pb2.PublishRequest]:
    yield proxies_pb2.PublishRequest(
        info=proxies_pb2.ProxyInfo(
            name=name, model_fingerprint=model_fingerprint, parent_version=parent_version, metrics=metrics or {},
            config_json=json.dumps(config or {}, sort_keys=True), weights_size=len(weights),
            weights_sha256=hashlib.sha256(weights).digest(),
        )
    )
    for start in range(0, len(weights), chunk_bytes):
        yield proxies_pb2.PublishRequest(weights_chunk=weights[start : start + chunk_bytes])


# --- the client mixin --------------------------------------------------------------------------


class TrajectoryMethods:
    """Trajectories and Proxies calls, mixed into :class:`~memory3.sdk.client.client.AsyncClient`
    on a :class:`~memory3.sdk.client.transport.Transport`."""

    # trajectories

    async def log_episodes(
        self, episodes: Iterable[Episode], *, include_hidden_states: bool = True, retry: bool = True
    ) -> LogSummary:
        """Log episodes in one atomic stream; episodes the tenant already logged count as duplicates."""
        messages = list(log_requests(episode_to_record(e, include_hidden_states) for e in episodes))
        return await self.log_requests(messages, retry=retry)

    async def log_requests(self, messages: Sequence[trajectories_pb2.LogRequest], *, retry: bool = True) -> LogSummary:
        """Send prepared Log messages (see :func:`log_requests`) as one stream."""
        make = lambda: self.client_stream(self.trajectories.Log, messages)  # noqa: E731
        reply = await (self.retry_stream(make) if retry else make())
        return LogSummary(reply.logged, reply.duplicates, reply.decisions, reply.consistency_token)

    async def attach_reward(self, episode_id: str, name: str, value: float) -> AttachedReward:
        """Set a named reward of a logged episode (idempotent per (episode, name); a new value replaces)."""
        reply = await self.trajectories.AttachReward(
            trajectories_pb2.AttachRewardRequest(episode_id=episode_id, name=name, value=value), **self._call()
        )
        return AttachedReward(reply.changed, dict(reply.rewards))

    async def iter_episode_pages(
        self, *, cursor: str = "", page_size: int = 0, limit: int = 0, omit_decisions: bool = False,
        include_hidden_states: bool = False, consistency_token: str = "", **filter_args,
    ) -> AsyncIterator[EpisodePage]:
        """Pages of episodes in log order; each page's cursor resumes right after it.
        ``consistency_token`` (a LogSummary's, here and in the other reads): see those episodes
        even when a read replica answers."""
        request = trajectories_pb2.ReadRequest(
            filter=episode_filter(**filter_args), cursor=cursor, page_size=page_size, limit=limit,
            omit_decisions=omit_decisions, include_hidden_states=include_hidden_states,
            consistency_token=consistency_token,
        )
        async for page in self.trajectories.Read(request, **self._call()):
            yield EpisodePage(
                [episode_from_record(r) for r in page.episodes], page.next_cursor,
                [r.logged_at.ToDatetime(tzinfo=timezone.utc) for r in page.episodes],
            )

    async def read_episodes(self, *, cursor: str = "", limit: int = 0, **options) -> EpisodePage:
        """All matching episodes after ``cursor`` (at most ``limit``), with the cursor to resume from."""
        result = EpisodePage([], cursor)
        async for page in self.iter_episode_pages(cursor=cursor, limit=limit, **options):
            result.episodes += page.episodes
            result.logged_at += page.logged_at
            result.cursor = page.cursor
        return result

    async def count_episodes(self, *, consistency_token: str = "", **filter_args) -> tuple[int, int]:
        """(episodes, decisions) matching the filter."""
        reply = await self.trajectories.Count(
            trajectories_pb2.CountRequest(filter=episode_filter(**filter_args), consistency_token=consistency_token),
            **self._call(),
        )
        return reply.episodes, reply.decisions

    async def export_parquet(
        self, path: str | Path, *, reward_key: str | None = None, include_hidden_states: bool = False,
        timeout: float = 3600.0, progress=None, consistency_token: str = "", **filter_args,
    ) -> int:
        """The episodes the filter selects, through the Export RPC's Arrow stream, into one Parquet
        file at ``path`` (a row group per page, bounded memory); returns the rows written.

        All or nothing: written beside ``path`` under a hidden name and renamed onto it once the
        stream has ended cleanly; on any error (the call's status, its ``timeout`` in seconds, a
        full disk) that file is removed and ``path`` is left as it was. ``progress``, if given,
        gets ``update(rows)`` after each record batch (a tqdm bar, say)."""
        request = trajectories_pb2.ExportRequest(
            filter=episode_filter(**filter_args), reward_key=reward_key or "", include_hidden_states=include_hidden_states,
            consistency_token=consistency_token,
        )
        path = Path(path)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.partial")
        pieces: queue.Queue = queue.Queue(maxsize=16)  # chunks on their way to the Parquet writer's thread
        writing = asyncio.ensure_future(asyncio.to_thread(_arrow_stream_to_parquet, pieces, partial, progress))

        async def hand_over(item) -> bool:
            """Queue ``item`` without blocking the event loop; False once the writer has stopped."""
            while True:
                try:
                    pieces.put_nowait(item)
                    return True
                except queue.Full:
                    if writing.done():
                        return False
                    await asyncio.sleep(0.01)

        try:
            async for chunk in self.trajectories.Export(request, **self._call(timeout=timeout)):
                if not await hand_over(chunk.data):
                    break  # the writer stopped: its error is raised below
        except BaseException:
            await hand_over(_ABORT)
            await asyncio.gather(writing, return_exceptions=True)
            partial.unlink(missing_ok=True)
            raise
        await hand_over(None)
        try:
            rows = await writing
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, path)
        return rows

    # proxies

    async def publish_proxy(
        self, name: str, weights: bytes, model_fingerprint: str, *, parent_version: int = 0,
        metrics: dict[str, float] | None = None, config: dict | None = None,
    ) -> ProxyInfo:
        """Publish safetensors weights as the next version of ``name`` (same weights+metadata: same version)."""
        messages = list(
            publish_requests(name, weights, model_fingerprint, parent_version, metrics, config, self.chunk_bytes)
        )
        reply = await self.retry_stream(lambda: self.client_stream(self.proxies.Publish, messages))
        return proxy_info_from_proto(reply)

    async def get_proxy(
        self, name: str, model_fingerprint: str, *, version: int = 0, include_weights: bool = True,
        consistency_token: str = "",
    ) -> ProxyInfo:
        """A version (0: latest) for this model; FAILED_PRECONDITION if trained for another model.
        ``consistency_token`` (a publish_proxy answer's): see at least that version on any replica."""
        request = proxies_pb2.GetProxyRequest(
            name=name, version=version, model_fingerprint=model_fingerprint, include_weights=include_weights,
            consistency_token=consistency_token,
        )
        info, weights = None, bytearray()
        async for frame in self.proxies.Get(request, **self._call()):
            if frame.HasField("info"):
                info = proxy_info_from_proto(frame.info)
            weights += frame.weights_chunk
        if info is None:
            raise ChecksumMismatch(f"proxy {name!r}: the service sent no info")
        if include_weights:
            if len(weights) != info.weights_size or hashlib.sha256(weights).hexdigest() != info.weights_sha256:
                raise ChecksumMismatch(f"proxy {name!r} version {info.version}: weights do not match their sha256")
            info.weights = bytes(weights)
        return info

    async def list_proxies(self, name: str = "", *, consistency_token: str = "") -> list[ProxyInfo]:
        """Every version (of ``name``, or of all proxies), by name then version (``consistency_token``
        as for :meth:`get_proxy`)."""
        found, token = [], ""
        while True:
            reply = await self.proxies.List(
                proxies_pb2.ListProxiesRequest(name=name, page_token=token, consistency_token=consistency_token),
                **self._call()
            )
            found += [proxy_info_from_proto(p) for p in reply.proxies]
            token = reply.next_page_token
            if not token:
                return found


_ABORT = object()  # on the chunk queue: the call failed, the stream will not be completed


class _Aborted(Exception):
    """The Export call failed before its stream ended."""


class _Chunks(io.RawIOBase):
    """A readable file over byte chunks arriving on a queue (None: the end; _ABORT: failed)."""

    def __init__(self, pieces: queue.Queue) -> None:
        self.pieces, self.buffer, self.ended = pieces, b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while not self.buffer and not self.ended:
            piece = self.pieces.get(timeout=3600)
            if piece is None:
                self.ended = True
            elif piece is _ABORT:
                raise _Aborted("the Export call failed")
            else:
                self.buffer = piece
        n = min(len(target), len(self.buffer))
        target[:n] = self.buffer[:n]
        self.buffer = self.buffer[n:]
        return n


def _arrow_stream_to_parquet(pieces: queue.Queue, path: Path, progress=None) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    with pa.ipc.open_stream(io.BufferedReader(_Chunks(pieces), buffer_size=1 << 20)) as reader:
        with pq.ParquetWriter(str(path), reader.schema, compression="zstd") as writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows
                if progress is not None:
                    progress.update(batch.num_rows)
    return rows

