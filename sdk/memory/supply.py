"""Memory supply: what a decoding model calls to get decoded memories for its queries.

A model decoding with memory asks for new memories every 64 tokens (Memory3, arXiv 2407.01178); to
stay near plain speed, everything between query and tensors runs beside the model: an
:class:`~memory3.sdk.client.client.AsyncClient` on its own event-loop thread (:meth:`MemorySupply.request`
returns a future at once), one ids-only ``RetrieveBatch`` for all rows of a step plus one
deduplicated ``Fetch`` of cache misses, codec decoding on a worker thread, and an LRU of decoded
memories checked against each blob's (size, CRC32). Queries are texts, or for a bank in the
model's retrieval space vectors of the supply's :class:`~memory3.sdk.memory.retrieval_head.RetrievalHead`
(:meth:`MemorySupply.model_space`; a bank of another model's or head's space is refused).
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
from memory3.sdk.memory.retrieval_head import RetrievalHead, RetrievalSpaceError, is_model_space
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

    search: the RetrieveBatch RPC (text queries: embedding + vector search on the server; in
    one-round-trip mode also the payload transfer). fetch: the Fetch RPC for cache misses. decode: codec decoding on
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

    query: str | list[float] | None  # the query text, or its vector in a model-space bank
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

    ``retrieval_head`` (trained for ``model``) serves banks in the model's retrieval space: their
    queries are vectors (:meth:`query_vectors`), their cold-start writes carry keys.
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
        retrieval_head: RetrievalHead | None = None,
    ) -> None:
        if retrieval_head is not None:
            retrieval_head.check_model(model)
        self.retrieval_head = retrieval_head
        self._model_space: dict[str, bool] = {}  # bank -> lives in the head's space (checked once)
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
    def model_space(self, bank: str) -> bool:
        """Whether ``bank`` lives in the model's retrieval space (query it with :meth:`query_vectors`),
        else in a text embedder's (query with texts). The bank is checked once (fingerprint, shape,
        space): FingerprintMismatchError / RetrievalSpaceError."""
        if bank not in self._model_space:
            self.run(self._check_bank(bank))
        return self._model_space[bank]

    def query_vectors(self, id_lists: Sequence[Sequence[int] | None], ignore_ids: Sequence[int] = ()) -> list:
        """Query vectors of token id chunks from the running model's own input embeddings, on its
        device, by the supply's retrieval head (None for a row with no tokens)."""
        if self.retrieval_head is None:
            raise RetrievalSpaceError("model-space queries need MemorySupply(retrieval_head=...)")
        return self.retrieval_head.vectors(self.model, id_lists, ignore_ids)

    def request(self, bank: str, queries: Sequence[str | Sequence[float] | None], top_k: int = 5) -> concurrent.futures.Future:
        """Start retrieving memories for each query (one per batch row: a text, a vector, or None
        or a blank text for none). All rows go in one RetrieveBatch call.

        Returns a future of ``list[Retrieved]`` in query order; its :class:`StepTiming` is
        appended to :attr:`timings` and available as ``future.timing``.
        """
        timing = StepTiming(rows=len(queries))
        future = self._loop.submit(self._request(bank, list(queries), top_k, timing))
        future.timing = timing  # type: ignore[attr-defined]
        return future

    def request_references(self, bank: str, queries: Sequence[str | Sequence[float]], top_k: int = 5) -> concurrent.futures.Future:
        """Start retrieving references (text, no payloads) for each query (text or vector): the RAG
        baseline's retrieval. A future of ``list[list[StoredReference]]`` in query order.
        """
        return self._loop.submit(self._retrieve_batch(bank, list(queries), top_k, False))

    # ---------------------------------------------------------------- internals
    async def _retrieve_batch(self, bank: str, queries: list, top_k: int, include_memory: bool) -> list[list[StoredReference]]:
        """RetrieveBatch for the queries: one call, or one per group of at most 256 rows and 1024
        references (the RPC's limits), concurrently. A None (or blank) query finds nothing."""
        active = [i for i, q in enumerate(queries) if q is not None and (not isinstance(q, str) or q.strip())]
        if len(active) < len(queries):
            found = await self._retrieve_batch(bank, [queries[i] for i in active], top_k, include_memory)
            out: list[list[StoredReference]] = [[] for _ in queries]
            for i, row in zip(active, found):
                out[i] = row
            return out
        texts = [isinstance(q, str) for q in queries]
        if self.max_overlap > 0 and not all(texts):
            raise ValueError("max_overlap compares texts: it needs text queries, not vectors")
        if self._model_space.get(bank) and any(texts):
            raise RetrievalSpaceError(f"bank {bank!r} lives in the model's retrieval space: query it with vectors "
                                      "(MemorySupply.query_vectors), not texts")
        if not queries:
            return []
        size = max(1, min(256, 1024 // max(1, top_k)))
        groups = [queries[i : i + size] for i in range(0, len(queries), size)]
        answers = await asyncio.gather(*(self.client.retrieve_batch(
            bank, group, top_k=top_k, include_memory=include_memory, max_overlap=self.max_overlap) for group in groups))
        return [row for answer in answers for row in answer]

    async def _check_bank(self, bank: str) -> None:
        if bank in self._checked_banks:
            return
        info = await self.client.get_bank(bank)
        model_space = is_model_space(info.embedder_name)
        if model_space:
            if self.retrieval_head is None:
                raise RetrievalSpaceError(
                    f"bank {bank!r} lives in the model space {info.embedder_name!r}: give the supply the model's "
                    "retrieval head (MemorySupply(..., retrieval_head=RetrievalHead.load(model_dir, model)))")
            self.retrieval_head.check_bank(bank, info.embedder_name, info.embedder_dim)
        if info.model_fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"bank {bank!r} holds memories of model {_short(info.model_fingerprint)}, "
                f"the running model is {_short(self.fingerprint)}; its memories cannot be read by this model"
            )
        if info.spec.shape != self.spec.shape:
            raise ValueError(f"bank {bank!r} stores memories of shape {info.spec.shape}, the spec needs {self.spec.shape}")
        self._model_space[bank] = model_space
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
                    encoder = MemoryEncoder(clone_model(self.model), self.tokenizer, self.spec,
                                            retrieval_head=self.retrieval_head)
                self._writer = MemoryWriter(encoder, codebook=self.codebook, skip_short=True)
            return self._writer

    async def _request(self, bank: str, queries: list, top_k: int, timing: StepTiming) -> list[Retrieved]:
        start = time.perf_counter()
        await self._check_bank(bank)
        active = [i for i, q in enumerate(queries) if q is not None and (not isinstance(q, str) or q.strip())]
        one_trip = not self.cache.holds_bank(bank, self.fingerprint)
        t0 = time.perf_counter()
        answers = await self._retrieve_batch(bank, [queries[i] for i in active], top_k, one_trip)
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
        if one_trip:  # a reference deleted since the search has a hit but no memory: nothing to read
            to_fetch = {key: ref for key, ref in to_fetch.items() if ref.memory}
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
