"""The Trajectories service: Log (client stream, deduplicated by episode id), AttachReward,
Read (filtered, paged, resumable by cursor), Count and Export (the episodes as one Arrow IPC
stream in the columns of core/episode_table.py) — each scoped to the caller's tenant.

An episode's bank is recorded as the name the generation read from; it need not still exist
(a bank can be deleted while its trajectories stay useful for training), so Log checks its
spelling, not its existence. Its prompt and response texts, when logged, are checked only for
size and NUL (the server has no tokenizer to compare them with the ids)."""

from __future__ import annotations

import asyncio
import io
import math
import re
from datetime import timezone

import numpy as np

from memory3.core.episodes import DECISION_COLUMNS
from memory3.v1 import trajectories_pb2, trajectories_pb2_grpc

from .auth import Authenticator
from .bank_store import check_bank_name
from .config import Settings
from .convert import timestamp
from .db import discard_quietly
from .errors import InvalidArgument, ResourceExhausted, rpc
from .offload import CpuPool
from .quotas import QuotaStore
from .tokens import Tokens
from .trajectory_store import (
    EpisodeFilter,
    EpisodeRow,
    TrajectoryStore,
    decode_cursor,
    encode_cursor,
)


EPISODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")  # patterns here fullmatch
REWARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}")
MAX_FINGERPRINT = 128
_INT32_MAX = 2**31 - 1


def check_episode_id(episode_id: str) -> None:
    if not EPISODE_ID.fullmatch(episode_id or ""):
        raise InvalidArgument(
            f"episode_id {episode_id[:64]!r} must be 1-128 characters of letters, digits, '_', '.', ':', '-'"
        )


def check_reward(episode_id: str, name: str, value: float) -> None:
    if not REWARD_NAME.fullmatch(name or ""):
        raise InvalidArgument(f"episode {episode_id!r}: reward name {name[:64]!r} must be 1-64 characters of "
                              "letters, digits, '_', '.', ':', '/', '-'")
    if not math.isfinite(value):
        raise InvalidArgument(f"episode {episode_id!r}: reward {name!r} is {value}; rewards must be finite")


def check_fingerprint(fingerprint: str, what: str) -> None:
    if not fingerprint or len(fingerprint) > MAX_FINGERPRINT or "\x00" in fingerprint:
        raise InvalidArgument(f"{what}: model_fingerprint is required (at most {MAX_FINGERPRINT} characters)")


def _probabilities(values, what: str, episode_id: str) -> list[float]:
    array = np.asarray(values, dtype=np.float64)
    if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
        raise InvalidArgument(f"episode {episode_id!r}: {what} must be probabilities in [0, 1]")
    return list(values)


def _non_negative(values, what: str, episode_id: str, upper: int = _INT32_MAX) -> list[int]:
    values = list(values)
    if values and (min(values) < 0 or max(values) > upper):
        raise InvalidArgument(f"episode {episode_id!r}: {what} must be between 0 and {upper}")
    return values


def row_from_record(record: trajectories_pb2.EpisodeRecord, settings: Settings) -> EpisodeRow:
    """Validate a logged episode; INVALID_ARGUMENT / RESOURCE_EXHAUSTED say which and why."""
    eid = record.episode_id
    check_episode_id(eid)
    if record.bank:
        check_bank_name(record.bank)
    check_fingerprint(record.model_fingerprint, f"episode {eid!r}")
    if record.proxy_version < 0:
        raise InvalidArgument(f"episode {eid!r}: proxy_version must not be negative")
    if len(record.prompt_ids) + len(record.response_ids) > settings.max_episode_tokens:
        raise ResourceExhausted(f"episode {eid!r}: more than {settings.max_episode_tokens} prompt + response tokens")
    n = len(record.decision_position)
    if n > settings.max_episode_decisions:
        raise ResourceExhausted(f"episode {eid!r}: more than {settings.max_episode_decisions} decisions")
    lengths = {c: len(getattr(record, c)) for c in DECISION_COLUMNS}
    if set(lengths.values()) != {n}:
        shown = ", ".join(f"{c}={k}" for c, k in lengths.items())
        raise InvalidArgument(f"episode {eid!r}: decision arrays must have equal lengths ({shown})")
    if len(record.hidden_states) > settings.max_hidden_state_bytes:
        raise ResourceExhausted(f"episode {eid!r}: hidden_states exceed {settings.max_hidden_state_bytes} bytes")
    texts = [record.prompt_text if record.HasField("prompt_text") else None,
             record.response_text if record.HasField("response_text") else None]
    for what, value in zip(("prompt_text", "response_text"), texts):
        if value is None:
            continue
        if "\x00" in value:
            raise InvalidArgument(f"episode {eid!r}: {what} contains a NUL character")
        if len(value.encode()) > settings.max_episode_text_bytes:
            raise ResourceExhausted(f"episode {eid!r}: {what} exceeds {settings.max_episode_text_bytes} bytes")
    rewards = dict(record.rewards)
    for name, value in rewards.items():
        check_reward(eid, name, value)
    decisions = (
        _non_negative(record.decision_position, "decision positions", eid, len(record.response_ids)),
        _non_negative(record.decision_token, "decision tokens", eid),
        _probabilities(record.decision_llm_prob, "decision llm_prob", eid),
        _non_negative(record.decision_rank, "decision ranks", eid),
        _probabilities(record.decision_p_accept, "decision p_accept", eid),
        list(record.decision_accepted),
        _non_negative(record.decision_rejections, "decision rejections", eid),
    )
    return EpisodeRow(
        eid, record.bank, record.model_fingerprint, record.proxy_version,
        _non_negative(record.prompt_ids, "prompt_ids", eid), _non_negative(record.response_ids, "response_ids", eid),
        decisions, rewards, record.hidden_states or None, prompt_text=texts[0], response_text=texts[1],
    )


def record_from_row(row: EpisodeRow) -> trajectories_pb2.EpisodeRecord:
    record = trajectories_pb2.EpisodeRecord(
        episode_id=row.episode_id, bank=row.bank, model_fingerprint=row.model_fingerprint,
        proxy_version=row.proxy_version, prompt_ids=row.prompt_ids, response_ids=row.response_ids,
        rewards=row.rewards, hidden_states=row.hidden_states or b"", logged_at=timestamp(row.logged_at),
    )
    for column, values in zip(DECISION_COLUMNS, row.decisions):
        getattr(record, column).extend(values)
    if row.prompt_text is not None:
        record.prompt_text = row.prompt_text
    if row.response_text is not None:
        record.response_text = row.response_text
    return record


def _when(message, field: str):
    """A Timestamp field as an aware datetime; INVALID_ARGUMENT when it is out of range."""
    if not message.HasField(field):
        return None
    try:
        return getattr(message, field).ToDatetime(tzinfo=timezone.utc)
    except (ValueError, OverflowError) as err:
        raise InvalidArgument(f"{field}: {err}") from None


def filter_from_proto(message: trajectories_pb2.EpisodeFilter, max_ids: int) -> EpisodeFilter:
    flt = EpisodeFilter(
        bank=message.bank if message.HasField("bank") else None,
        proxy_version=message.proxy_version if message.HasField("proxy_version") else None,
        model_fingerprint=message.model_fingerprint if message.HasField("model_fingerprint") else None,
        logged_after=_when(message, "logged_after"),
        logged_before=_when(message, "logged_before"),
        episode_ids=list(message.episode_ids),
        proxy_versions=list(message.proxy_versions),
    )
    if len(flt.episode_ids) > max_ids:
        raise InvalidArgument(f"at most {max_ids} episode_ids per filter, got {len(flt.episode_ids)}")
    if len(flt.proxy_versions) > max_ids:
        raise InvalidArgument(f"at most {max_ids} proxy_versions per filter, got {len(flt.proxy_versions)}")
    return flt


EXPORT_PAGE_EPISODES = 1024


class ArrowStream:
    """The Export RPC's Arrow IPC stream, written a page at a time; each call returns the bytes
    the page added (the schema comes with the first, the end-of-stream marker with close)."""

    def __init__(self) -> None:
        self._sink = io.BytesIO()
        self._writer = None

    def _take(self) -> bytes:
        data = self._sink.getvalue()
        self._sink.seek(0)
        self._sink.truncate()
        return data

    def write(self, rows: list[EpisodeRow], reward_key: str | None, include_hidden_states: bool) -> bytes:
        import pyarrow as pa

        from memory3.core.episode_table import SCHEMA, episodes_batch

        if self._writer is None:
            self._writer = pa.ipc.new_stream(self._sink, SCHEMA)
        self._writer.write_batch(episodes_batch([row.episode() for row in rows], reward_key, include_hidden_states))
        return self._take()

    def close(self) -> bytes:
        import pyarrow as pa

        from memory3.core.episode_table import SCHEMA

        if self._writer is None:  # no episode: still a valid (empty) stream
            self._writer = pa.ipc.new_stream(self._sink, SCHEMA)
        self._writer.close()
        return self._take()


def _page(rows: list[EpisodeRow], cursor: str) -> trajectories_pb2.ReadPage:
    """A Read page of the rows, resumable by ``cursor`` (built on a worker thread: it is CPU work)."""
    page = trajectories_pb2.ReadPage(episodes=[record_from_row(row) for row in rows])
    page.next_cursor = cursor
    return page


class TrajectoriesServicer(trajectories_pb2_grpc.TrajectoriesServicer):
    def __init__(
        self, settings: Settings, auth: Authenticator, store: TrajectoryStore, quotas: QuotaStore, cpu: CpuPool,
        tokens: Tokens,
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.quotas = quotas
        self.cpu = cpu
        self.auth = auth
        self.store = store

    @rpc
    async def Log(self, request_iterator, context):
        tenant_id = await self.auth.tenant(context)
        await self.quotas.check_storage(tenant_id)
        writer = self.store.writer(tenant_id)
        batch: list[EpisodeRow] = []
        batch_bytes = 0
        try:
            async for message in request_iterator:
                for record in message.episodes:
                    batch.append(row_from_record(record, self.settings))
                batch_bytes += message.ByteSize()
                if len(batch) >= self.settings.log_batch_episodes or batch_bytes >= self.settings.write_batch_bytes:
                    await writer.stage(batch)
                    batch, batch_bytes = [], 0
            await writer.stage(batch)
            await self.quotas.check_storage(tenant_id, writer.staged_bytes)
            counts = await writer.commit()
        except BaseException:
            if writer.staged_bytes:
                await asyncio.shield(discard_quietly(writer.discard(), "Log"))
            raise
        return trajectories_pb2.LogSummary(
            logged=counts.logged, duplicates=counts.duplicates, decisions=counts.decisions
        )

    @rpc
    async def AttachReward(self, request, context):
        tenant_id = await self.auth.tenant(context)
        check_episode_id(request.episode_id)
        check_reward(request.episode_id, request.name, request.value)
        changed, rewards = await self.store.attach_reward(tenant_id, request.episode_id, request.name, request.value)
        return trajectories_pb2.AttachRewardResponse(changed=changed, rewards=rewards)

    @rpc
    async def Read(self, request, context):
        tenant_id = await self.auth.tenant(context)
        flt = filter_from_proto(request.filter, self.settings.max_fetch_ids)
        after = decode_cursor(self.tokens.open(tenant_id, "episodes", request.cursor, "cursor"))
        if request.page_size < 0 or request.limit < 0:
            raise InvalidArgument("page_size and limit must not be negative")
        if request.page_size > self.settings.max_read_page_episodes:
            raise InvalidArgument(f"page_size exceeds the limit of {self.settings.max_read_page_episodes}")
        page_size = request.page_size or self.settings.read_page_episodes
        remaining = request.limit or None
        # A page also ends at about half the message limit, so large episodes never make an oversized message.
        byte_budget = self.settings.max_message_bytes // 2
        while remaining is None or remaining > 0:
            want = page_size if remaining is None else min(page_size, remaining)
            rows, exhausted = await self.store.read(
                tenant_id, flt, after, want, byte_budget, not request.omit_decisions, request.include_hidden_states
            )
            if not rows:
                return
            page = await self.cpu.run(_page, rows, self.tokens.seal(tenant_id, "episodes", encode_cursor(rows[-1].seq)))
            yield page
            after = rows[-1].seq
            if remaining is not None:
                remaining -= len(page.episodes)
            if exhausted:
                return

    @rpc
    async def Export(self, request, context):
        tenant_id = await self.auth.tenant(context)
        flt = filter_from_proto(request.filter, self.settings.max_fetch_ids)
        reward_key = request.reward_key or None
        if reward_key is not None and not REWARD_NAME.fullmatch(reward_key):
            raise InvalidArgument(f"reward_key {reward_key[:64]!r} must be a reward name (1-64 characters of "
                                  "letters, digits, '_', '.', ':', '/', '-')")
        budget = self.settings.max_message_bytes // 2
        stream = ArrowStream()
        after = 0
        while True:
            rows, exhausted = await self.store.read(
                tenant_id, flt, after, EXPORT_PAGE_EPISODES, budget, True, request.include_hidden_states
            )
            if rows:
                after = rows[-1].seq
                data = await self.cpu.run(stream.write, rows, reward_key, request.include_hidden_states)
                for start in range(0, len(data), self.settings.chunk_bytes):
                    yield trajectories_pb2.ExportChunk(data=data[start : start + self.settings.chunk_bytes])
            if exhausted or not rows:
                break
        yield trajectories_pb2.ExportChunk(data=stream.close())

    @rpc
    async def Count(self, request, context):
        tenant_id = await self.auth.tenant(context)
        episodes, decisions = await self.store.count(
            tenant_id, filter_from_proto(request.filter, self.settings.max_fetch_ids)
        )
        return trajectories_pb2.CountResponse(episodes=episodes, decisions=decisions)
