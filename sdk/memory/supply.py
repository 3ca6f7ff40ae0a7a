"""Memory supply: what a decoding model calls to get decoded memories for its query texts.

A model decoding with memory asks for new memories every 64 tokens (Memory3, arXiv 2407.01178); to
stay near plain speed, everything between query text and tensors runs beside the model: an
:class:`~memory3.sdk.client.client.AsyncClient` on its own event-loop thread (:meth:`MemorySupply.request`
returns a future at once), ids-only retrieval plus one deduplicated ``Fetch`` of cache misses, codec
decoding on a worker thread, and an LRU of decoded memories checked against each blob's (size, CRC32).
Memories of another model raise :class:`FingerprintMismatchError`; a retrieved reference without a
memory is encoded with the supply's own copy of the model (or ``encoder=``) and written back. Every
request records a :class:`StepTiming`.

Details: docs/design.md ("Memory supply", "Reading every 64 tokens").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memory3.core.blob import payload_checksum
from memory3.core.loop_thread import LoopThread
from memory3.core.memory_spec import MemorySpec
from memory3.sdk.client.client import AsyncClient
from memory3.core.references import StoredReference
from memory3.sdk.memory.codec import decode_memory
from memory3.sdk.memory.encoder import MemoryEncoder
from memory3.sdk.memory.pq import PQCodebook
from memory3.sdk.memory.tensors import ExplicitMemory
from memory3.sdk.memory.writer import MemoryWriter
from memory3.sdk.model.attention import WRAPPER_PREFIX
from memory3.sdk.model.fingerprint import model_fingerprint


class FingerprintMismatchError(ValueError):
    """A bank or a memory belongs to another model than the one running."""


def _short(fingerprint: str) -> str:
    return fingerprint[:16] + "…" if len(fingerprint) > 16 else fingerprint


@dataclass
class StepTiming:
    """Seconds spent in one retrieval step (all rows of one request).

    search: Retrieve RPCs (query embedding + vector search on the server; in one-round-trip mode
    also the payload transfer). fetch: the Fetch RPC for cache misses. decode: codec decoding on
    the worker thread. encode: cold-start encoding + write back. total: request start to result.
    wait and inject are filled in by the decode loop: time it blocked on the result (what the
    overlap failed to hide) and time to set the memories into the injector.
    """

    rows: int = 0
    search: float = 0.0
    fetch: float = 0.0
    decode: float = 0.0
    encode: float = 0.0
    total: float = 0.0
    wait: float = 0.0
    inject: float = 0.0
    hits: int = 0
    misses: int = 0


@dataclass
class Retrieved:
    """One row's answer: the references (payload bytes dropped) and their decoded memories, in rank order.

    A reference without a usable memory (too short to encode, cold start off) is in ``references``
    but has no entry in ``memories``; ``memory_ids`` says which ones do.
    """

    query: str | None
    references: list[StoredReference] = field(default_factory=list)
    memories: list[ExplicitMemory] = field(default_factory=list)
    memory_ids: list[str] = field(default_factory=list)
    memory_scores: list[float] = field(default_factory=list)  # retrieval score of each memory


def _version(ref: StoredReference) -> tuple[int, int]:
    """What identifies a stored payload's bytes without fetching them."""
    return (ref.memory_size, ref.memory_crc32)


class MemoryCache:
    """LRU of decoded memories keyed by ``(bank, external id, fingerprint)``; thread-safe counters."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str, str], tuple[object, ExplicitMemory]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[tuple[str, str, str]]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def holds_bank(self, bank: str, fingerprint: str) -> bool:
        with self._lock:
            return any(k[0] == bank and k[2] == fingerprint for k in self._items)

    def get(self, key: tuple[str, str, str], version: object = None, count: bool = True) -> ExplicitMemory | None:
        """The cached memory (refreshing its recency) or None; a different payload version is a miss."""
        with self._lock:
            entry = self._items.get(key)
            if entry is not None and (version is None or entry[0] == version):
                self._items.move_to_end(key)
                self.hits += count
                return entry[1]
            self.misses += count
            return None

    def put(self, key: tuple[str, str, str], version: object, memory: ExplicitMemory) -> None:
        with self._lock:
            self._items[key] = (version, memory)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def reset_stats(self) -> None:
        with self._lock:
            self.hits = self.misses = 0

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def clone_model(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy of a model (same config, weights, dtype, device), unhooked.

    Built from config + state dict rather than ``deepcopy`` so an active injector hook (module
    attributes, wrapped attention implementation) is not copied along.
    """
    config = copy.deepcopy(model.config)
    implementation = config._attn_implementation or "sdpa"
    if implementation.startswith(WRAPPER_PREFIX):
        implementation = implementation[len(WRAPPER_PREFIX) :]
    param = next(model.parameters())
    clone = type(model)(config).to(device=param.device, dtype=param.dtype)
    clone.load_state_dict(model.state_dict())
    clone.set_attn_implementation(implementation)
    return clone.eval()


class MemorySupply:
    """Retrieves, fetches, decodes and caches memories for one running model.

    >>> supply = MemorySupply(target, api_key, model, spec, tokenizer=tokenizer)
    >>> future = supply.request("bank", ["text of chunk 1", "text of chunk 2"], top_k=5)
    >>> ...  # compute meanwhile
    >>> rows = future.result()   # one Retrieved per query, memories ready for the injector
    """

    def __init__(
        self,
        target: str,
        api_key: str,
        model: torch.nn.Module,
        spec: MemorySpec,
        *,
        tokenizer=None,
        encoder: MemoryEncoder | None = None,
        codebook: PQCodebook | None = None,
        cache_size: int = 4096,
        cold_start: bool = True,
        max_overlap: float = 0.0,
        timeout: float | None = 60.0,
    ) -> None:
        self.model = model
        self.spec = spec
        self.tokenizer = tokenizer
        self.codebook = codebook
        self.cold_start = cold_start
        self.max_overlap = max_overlap
        self.fingerprint = model_fingerprint(model)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.cache = MemoryCache(cache_size)
        self.timings: list[StepTiming] = []
        self._encoder = encoder
        self._writer: MemoryWriter | None = None
        self._writer_lock = threading.Lock()
        self._checked_banks: set[str] = set()
        self._loop = LoopThread("memory3-supply")
        self.client: AsyncClient = self._loop.submit(self._make_client(target, api_key, timeout)).result()

    @staticmethod
    async def _make_client(target: str, api_key: str, timeout: float | None) -> AsyncClient:
        return AsyncClient(target, api_key, timeout=timeout)  # its channel binds to the supply's loop

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if self._loop.is_alive():
            self._loop.submit(self.client.close()).result()
            self._loop.stop()

    def __enter__(self) -> "MemorySupply":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, coroutine):
        """Run a coroutine on the supply's loop and wait for it (e.g. ``supply.client`` calls)."""
        return self._loop.submit(coroutine).result()

    # ---------------------------------------------------------------- public calls
    def request(self, bank: str, queries: Sequence[str | None], top_k: int = 5) -> concurrent.futures.Future:
        """Start retrieving memories for each query (one per batch row; None or blank: none).

        Returns a future of ``list[Retrieved]`` in query order; its :class:`StepTiming` is
        appended to :attr:`timings` and available as ``future.timing``.
        """
        timing = StepTiming(rows=len(queries))
        future = self._loop.submit(self._request(bank, list(queries), top_k, timing))
        future.timing = timing  # type: ignore[attr-defined]
        return future

    def request_references(self, bank: str, queries: Sequence[str], top_k: int = 5) -> concurrent.futures.Future:
        """Start retrieving references (text, no payloads) for each query: the RAG baseline's retrieval.

        A future of ``list[list[StoredReference]]`` in query order.
        """

        async def gather():
            return list(await asyncio.gather(*(self._retrieve(bank, q, top_k, False) for q in queries)))

        return self._loop.submit(gather())

    # ---------------------------------------------------------------- internals
    async def _retrieve(self, bank: str, query: str, top_k: int, include_memory: bool) -> list[StoredReference]:
        return await self.client.retrieve(
            bank, text=query, top_k=top_k, include_memory=include_memory, max_overlap=self.max_overlap
        )

    async def _check_bank(self, bank: str) -> None:
        if bank in self._checked_banks:
            return
        info = await self.client.get_bank(bank)
        if info.model_fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"bank {bank!r} holds memories of model {_short(info.model_fingerprint)}, "
                f"the running model is {_short(self.fingerprint)}; its memories cannot be read by this model"
            )
        if info.spec.shape != self.spec.shape:
            raise ValueError(f"bank {bank!r} stores memories of shape {info.spec.shape}, the spec needs {self.spec.shape}")
        self._checked_banks.add(bank)

    def _decode(self, bank: str, refs: Sequence[StoredReference]) -> dict[str, ExplicitMemory]:
        """Decode payloads (worker thread) and refuse memories of another model."""
        out = {}
        for ref in refs:
            memory = decode_memory(ref.memory, dtype=self.dtype, device=self.device, codebook=self.codebook)
            if memory.fingerprint != self.fingerprint:
                raise FingerprintMismatchError(
                    f"memory {ref.external_id!r} in bank {bank!r} was computed by model {_short(memory.fingerprint)}, "
                    f"the running model is {_short(self.fingerprint)}; re-encode it with this model"
                )
            out[ref.external_id] = memory
        return out

    def writer(self) -> MemoryWriter:
        """The cold-start writer, with its own model copy (see module docstring); built once."""
        with self._writer_lock:
            if self._writer is None:
                encoder = self._encoder
                if encoder is None:
                    if self.tokenizer is None:
                        raise ValueError("cold start needs the model's tokenizer (MemorySupply(tokenizer=...)) or an encoder")
                    encoder = MemoryEncoder(clone_model(self.model), self.tokenizer, self.spec)
                self._writer = MemoryWriter(encoder, codebook=self.codebook, skip_short=True)
            return self._writer

    async def _request(self, bank: str, queries: list[str | None], top_k: int, timing: StepTiming) -> list[Retrieved]:
        start = time.perf_counter()
        await self._check_bank(bank)
        active = [i for i, q in enumerate(queries) if q is not None and q.strip()]
        one_trip = not self.cache.holds_bank(bank, self.fingerprint)
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(self._retrieve(bank, queries[i], top_k, one_trip) for i in active))
        timing.search = time.perf_counter() - t0

        results = [Retrieved(q) for q in queries]
        decoded: dict[str, ExplicitMemory] = {}
        to_fetch: dict[str, StoredReference] = {}  # misses with a stored memory
        to_encode: dict[str, StoredReference] = {}  # misses with none yet (cold start)
        for row, refs in zip(active, answers):
            results[row].references = refs
            for ref in refs:
                stored = ref.memory_size > 0
                if not stored and not self.cold_start:
                    continue
                # No memory stored: a memory this supply encoded earlier still serves (crc unknown).
                memory = self.cache.get((bank, ref.external_id, self.fingerprint), _version(ref) if stored else None)
                timing.hits += memory is not None
                timing.misses += memory is None
                if memory is not None:
                    decoded[ref.external_id] = memory
                elif stored:
                    to_fetch.setdefault(ref.external_id, ref)
                else:
                    to_encode.setdefault(ref.external_id, ref)
        versions = {key: _version(ref) for key, ref in to_fetch.items()}
        if to_fetch and not one_trip:
            t0 = time.perf_counter()
            fetched = await self.client.fetch(bank, list(to_fetch), include_memory=True, allow_missing=True)
            timing.fetch = time.perf_counter() - t0
            to_fetch = {ref.external_id: ref for ref in fetched if ref.memory}
            versions.update({key: _version(ref) for key, ref in to_fetch.items()})
        if to_fetch:
            t0 = time.perf_counter()
            fresh = await asyncio.to_thread(self._decode, bank, list(to_fetch.values()))
            timing.decode = time.perf_counter() - t0
            for key, memory in fresh.items():
                self.cache.put((bank, key, self.fingerprint), versions[key], memory)
            decoded.update(fresh)
        if to_encode:
            t0 = time.perf_counter()
            written = await self.writer().ensure_memories(self.client, bank, list(to_encode.values()))
            timing.encode = time.perf_counter() - t0
            for key, (memory, blob) in written.items():
                memory = memory.to(self.dtype, self.device)
                self.cache.put((bank, key, self.fingerprint), (len(blob), payload_checksum(blob)), memory)
                decoded[key] = memory
        for result in results:
            for ref in result.references:
                ref.memory = None  # the decoded tensors are what callers use; do not hold the bytes
                if ref.external_id in decoded:
                    result.memories.append(decoded[ref.external_id])
                    result.memory_ids.append(ref.external_id)
                    result.memory_scores.append(ref.score)
        timing.total = time.perf_counter() - start
        self.timings.append(timing)
        return results
