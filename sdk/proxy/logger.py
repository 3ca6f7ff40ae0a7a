"""Background trajectory logging that never loses an episode and never counts one twice.

:class:`TrajectoryLogger` takes episodes from the sampler (``log`` returns at once) and sends them in
batches, one Log stream each, from a background thread. While the service is unreachable batches go to
an fsync'd JSONL spool in ``spool_dir``, replayed when it answers again (and at start-up); the service
deduplicates by episode id, so a replay never counts twice. Episodes refused for good go to
``rejected-*.jsonl``. Hidden states are dropped unless ``log_hidden_states=True``
(:func:`pack_hidden_states`, :func:`unpack_hidden_states`). Processes may share a spool: a segment is
replayed by whoever holds its ``flock``. Spool lines carry the episode's texts when it has them
(lines written before texts existed still replay, without them).

Details: docs/design.md ("Trajectory path").
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import grpc
import numpy as np
import zstandard

from memory3.core.episodes import DECISION_FIELDS, Episode, decision_columns, decisions_from_columns

log = logging.getLogger(__name__)

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Failures that say "not now" rather than "never": the batch is spooled and replayed later.
TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
}


# --- hidden states ----------------------------------------------------------------------------


def pack_hidden_states(states, dtype=np.float16, level: int = 3) -> bytes:
    """An array of hidden states (any shape; torch tensors too) as zstd-compressed ``.npy`` bytes."""
    if hasattr(states, "detach"):
        states = states.detach().float().cpu().numpy()
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(np.asarray(states, dtype=dtype)), allow_pickle=False)
    return zstandard.ZstdCompressor(level=level).compress(buffer.getvalue())


MAX_HIDDEN_STATES_BYTES = 256 * 1024 * 1024
"""Largest decompressed hidden states :func:`unpack_hidden_states` accepts (a 4 MiB compressed
payload — the server's limit — could otherwise declare gigabytes: a decompression bomb)."""


def unpack_hidden_states(blob: bytes, max_bytes: int = MAX_HIDDEN_STATES_BYTES) -> np.ndarray:
    """The array :func:`pack_hidden_states` packed; ValueError for a frame larger than ``max_bytes``
    decompressed (checked from the frame header before anything is allocated)."""
    declared = zstandard.frame_content_size(blob)
    if declared > max_bytes:
        raise ValueError(f"hidden states declare {declared} bytes decompressed; the limit is {max_bytes}")
    raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=max_bytes)
    return np.load(io.BytesIO(raw), allow_pickle=False)


def compressed(blob: bytes, level: int = 3) -> bytes:
    """Bytes as they are if already zstd, else zstd-compressed (so hidden states always travel compressed)."""
    return blob if blob.startswith(ZSTD_MAGIC) else zstandard.ZstdCompressor(level=level).compress(blob)


# --- the spool's line format ------------------------------------------------------------------

def episode_to_json(episode: Episode) -> str:
    """One JSON line; decisions column-wise (compact), floats exact (JSON keeps the repr)."""
    return json.dumps(
        {
            "episode_id": episode.episode_id, "bank": episode.bank, "model_fingerprint": episode.model_fingerprint,
            "proxy_version": episode.proxy_version, "prompt_ids": episode.prompt_ids,
            "response_ids": episode.response_ids, "rewards": episode.rewards,
            "decisions": {f.attribute: values for f, values in zip(DECISION_FIELDS, decision_columns(episode.decisions))},
            "hidden_states": base64.b64encode(episode.hidden_states).decode() if episode.hidden_states else None,
            "prompt_text": episode.prompt_text, "response_text": episode.response_text,
        },
        separators=(",", ":"),
    )


def episode_from_json(line: str) -> Episode:
    d = json.loads(line)
    return Episode(
        prompt_ids=d["prompt_ids"], response_ids=d["response_ids"],
        decisions=decisions_from_columns(d["decisions"][f.attribute] for f in DECISION_FIELDS),
        model_fingerprint=d["model_fingerprint"],
        proxy_version=d["proxy_version"], bank=d["bank"], rewards=d["rewards"], episode_id=d["episode_id"],
        hidden_states=base64.b64decode(d["hidden_states"]) if d["hidden_states"] else None,
        prompt_text=d.get("prompt_text"), response_text=d.get("response_text"),
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Append-only, fsync'd JSONL segments: ``*.open`` while a logger appends, ``*.jsonl`` once sealed."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file = None
        self._path: Path | None = None

    def append(self, episodes: Iterable[Episode]) -> int:
        data = "".join(episode_to_json(e) + "\n" for e in episodes).encode()
        if not data:
            return 0
        if self._file is None:
            self._path = self.dir / f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.open"
            self._file = open(self._path, "ab")
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _fsync_dir(self.dir)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        return data.count(b"\n")

    def seal(self) -> None:
        """Close the segment being appended, making it replayable."""
        if self._file is None:
            return
        sealed = self._path.with_suffix(".jsonl")
        os.rename(self._path, sealed)
        self._file.close()  # releases the lock
        self._file = self._path = None
        _fsync_dir(self.dir)

    def segments(self) -> list[Path]:
        """Sealed segments, oldest first, adopting ``.open`` ones whose writer is gone."""
        for path in sorted(self.dir.glob("*.open")):
            if path == self._path:
                continue
            try:
                with open(path, "rb") as handle:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    os.rename(path, path.with_suffix(".jsonl"))
            except (BlockingIOError, FileNotFoundError):
                continue
        return sorted(p for p in self.dir.glob("*.jsonl") if not p.name.startswith("rejected-"))

    @staticmethod
    def read(handle) -> list[Episode]:
        """A segment's episodes; a torn last line (a crash mid-write, never fsync'd) is skipped."""
        episodes = []
        for line in handle.read().decode().splitlines():
            try:
                episodes.append(episode_from_json(line))
            except (ValueError, KeyError, TypeError):
                log.warning("skipping an unreadable spool line (torn write?)")
        return episodes

    def pending(self) -> int:
        """Episodes waiting in the spool (sealed or being appended)."""
        total = 0
        for path in [*self.dir.glob("*.jsonl"), *self.dir.glob("*.open")]:
            if not path.name.startswith("rejected-"):
                try:
                    total += path.read_bytes().count(b"\n")
                except FileNotFoundError:
                    pass
        return total

    def reject(self, episodes: list[Episode], reason: str) -> None:
        path = self.dir / f"rejected-{os.getpid()}.jsonl"
        with open(path, "ab") as handle:
            for episode in episodes:
                handle.write((json.dumps({"reason": reason, "episode": json.loads(episode_to_json(episode))}) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())

    def close(self) -> None:
        self.seal()


@dataclass
class LoggerStats:
    logged: int = 0       # newly stored by the service (live or replayed)
    duplicates: int = 0   # the service already had them (replays of half-sent segments)
    spooled: int = 0      # written to the spool during an outage
    replayed: int = 0     # sent from the spool
    rejected: int = 0     # refused by the service for good (see rejected-*.jsonl)


class TrajectoryLogger:
    """Logs episodes in the background; spools to disk while the service is unreachable.

    ``client`` is a blocking :class:`~memory3.sdk.client.client.Client` (else one is made from
    ``target`` and ``api_key`` and closed with the logger)."""

    def __init__(
        self,
        target: str | None = None,
        api_key: str | None = None,
        *,
        client=None,
        spool_dir: str | Path = "~/.cache/memory3/trajectory-spool",
        batch_episodes: int = 256,
        linger: float = 0.2,
        retry_interval: float = 2.0,
        log_hidden_states: bool = False,
        timeout: float = 10.0,
    ) -> None:
        if client is None:
            from memory3.sdk.client.client import Client

            client = Client(target, api_key, timeout=timeout)
            self._owns_client = True
        else:
            self._owns_client = False
        self.client = client
        self.spool = Spool(spool_dir)
        self.batch_episodes = batch_episodes
        self.linger = linger
        self.retry_interval = retry_interval
        self.log_hidden_states = log_hidden_states
        self.stats = LoggerStats()
        self._queue: deque[Episode] = deque()
        self._cond = threading.Condition()
        self._submitted = 0
        self._handled = 0
        self._flushing = 0
        self._stopping = False
        self._down_until = 0.0
        self._next_replay = 0.0  # replay what an earlier run left, as soon as the service answers
        self._thread = threading.Thread(target=self._run, name="memory3-trajectory-logger", daemon=True)
        self._thread.start()

    # --- the caller's side ---

    def log(self, episode: Episode) -> None:
        """Queue one episode (returns at once)."""
        if self.log_hidden_states:
            if episode.hidden_states:
                episode = replace(episode, hidden_states=compressed(episode.hidden_states))
        elif episode.hidden_states is not None:
            episode = replace(episode, hidden_states=None)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the trajectory logger is closed")
            self._queue.append(episode)
            self._submitted += 1
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every episode logged so far is stored by the service or fsync'd to the spool."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._handled < target:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                return True
            finally:
                self._flushing -= 1

    def pending_spool(self) -> int:
        return self.spool.pending()

    def close(self, timeout: float = 30.0) -> None:
        """Flush, try once more to empty the spool, stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._replay(force=True)
        self.spool.close()
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> "TrajectoryLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the background thread ---

    def _take_batch(self) -> list[Episode]:
        with self._cond:
            wait = self._next_wait()
            while not self._queue and not self._stopping and wait > 0:
                self._cond.wait(wait)
                wait = self._next_wait()
            if self._queue and len(self._queue) < self.batch_episodes and not self._stopping:
                # linger briefly so a burst goes as one stream, unless someone is waiting in flush()
                deadline = time.monotonic() + self.linger
                while len(self._queue) < self.batch_episodes and not self._flushing and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            n = min(len(self._queue), self.batch_episodes)
            return [self._queue.popleft() for _ in range(n)]

    def _next_wait(self) -> float:
        """How long the thread may sleep: until the next replay attempt if anything is spooled."""
        if self.spool._file is None and not self.spool.segments():
            return self.retry_interval
        return max(0.0, self._next_replay - time.monotonic())

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch:
                try:
                    self._deliver(batch)
                except Exception:  # never lose a batch to a bug in delivery: spool it
                    log.exception("trajectory delivery failed; spooling the batch")
                    self._spool(batch)
                with self._cond:
                    self._handled += len(batch)
                    self._cond.notify_all()
            if time.monotonic() >= self._next_replay:
                try:
                    self._replay()
                except Exception:  # the spool stays on disk; try again later
                    log.exception("spool replay failed")
            with self._cond:
                if self._stopping and not self._queue:
                    return

    def _spool(self, batch: list[Episode]) -> None:
        self.stats.spooled += self.spool.append(batch)

    def _deliver(self, batch: list[Episode], replaying: bool = False) -> bool:
        """Send a batch; True if the service took it (stored or refused for good), False if spooled/kept."""
        if time.monotonic() < self._down_until:
            if not replaying:
                self._spool(batch)
            return False
        try:
            summary = self.client.log_episodes(batch, retry=False)
        except grpc.RpcError as err:
            if err.code() in TRANSIENT:
                log.info("trajectory service unreachable (%s): spooling", err.code().name)
                self._down_until = time.monotonic() + self.retry_interval
                self._next_replay = self._down_until
                if not replaying:
                    self._spool(batch)
                return False
            if len(batch) > 1:  # find the episodes it refuses; the others still go
                return all([self._deliver([episode], replaying) for episode in batch])
            log.error("trajectory service refused episode %s: %s", batch[0].episode_id, err.details())
            self.spool.reject(batch, f"{err.code().name}: {err.details()}")
            self.stats.rejected += 1
            return True
        self.stats.logged += summary.logged
        self.stats.duplicates += summary.duplicates
        if replaying:
            self.stats.replayed += len(batch)
        if self._next_replay > time.monotonic() and not replaying:
            self._next_replay = 0.0  # the service is back: replay the spool now
        return True

    def _replay(self, force: bool = False) -> None:
        """Send sealed spool segments, deleting each once the service has all of it."""
        if force:
            self._down_until = 0.0
        self._next_replay = time.monotonic() + self.retry_interval
        self.spool.seal()
        for path in self.spool.segments():
            try:
                handle = open(path, "rb")
            except FileNotFoundError:
                continue
            with handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # another logger is replaying it
                episodes = Spool.read(handle)
                for start in range(0, len(episodes), self.batch_episodes):
                    if not self._deliver(episodes[start : start + self.batch_episodes], replaying=True):
                        return  # still down: keep the segment (re-sent parts are deduplicated)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
