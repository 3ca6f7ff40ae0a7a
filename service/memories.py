"""The Memories service: Write, Retrieve, RetrieveBatch, Fetch, Delete, Stats, Scroll — each scoped to the caller's tenant."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass, field

import numpy as np

from memory3.core.batching import size_batches
from memory3.core.blob import CodecError, validate_payload
from memory3.core.embedder import BUILTIN_EMBEDDER, BuiltinEmbedder
from memory3.core.metadata import Condition, metadata_to_json
from memory3.core.overlap import overlapping
from memory3.core.references import StoredReference
from memory3.v1 import memories_pb2, memories_pb2_grpc

from .auth import Authenticator
from .bank_store import Bank, BankStore, CodebookStore
from .config import Settings
from .convert import conditions_from_proto, metadata_from_record, vector_from_values
from .db import discard_quietly
from .errors import InvalidArgument, NotFound, ResourceExhausted, rpc
from .offload import CpuPool
from .quotas import QuotaStore
from .reference_store import ReferenceRow, ReferenceStore
from .tokens import Tokens

log = logging.getLogger(__name__)

MAX_EXTERNAL_ID = 256
DEFAULT_TOP_K = 5
OVERLAP_MAX_WORDS = 1024  # max_overlap compares the first 1024 words of query and reference (bounded cost)
DEFAULT_SCROLL_PAGE = 100
MAX_SCROLL_PAGE = 1000
MAX_BATCH_QUERIES = 256  # RetrieveBatch: queries per call (and queries x top_k <= max_top_k)


@dataclass
class _PendingReference:
    record: memories_pb2.ReferenceRecord
    metadata: dict
    memory: bytearray = field(default_factory=bytearray)


class MemoriesServicer(memories_pb2_grpc.MemoriesServicer):
    def __init__(
        self,
        settings: Settings,
        auth: Authenticator,
        banks: BankStore,
        refs: ReferenceStore,
        codebooks: CodebookStore,
        embedder: BuiltinEmbedder,
        quotas: QuotaStore,
        cpu: CpuPool,
        tokens: Tokens,
    ) -> None:
        self.tokens = tokens
        self.settings = settings
        self.quotas = quotas
        self.cpu = cpu
        self.codebooks = codebooks
        self.auth = auth
        self.banks = banks
        self.refs = refs
        self.embedder = embedder

    # --- Write -----------------------------------------------------------------------------

    def _check_record(self, bank: Bank, record: memories_pb2.ReferenceRecord) -> dict:
        """Refuse a reference that breaks a rule; its metadata otherwise."""
        if not record.external_id or len(record.external_id) > MAX_EXTERNAL_ID:
            raise InvalidArgument(f"reference external_id must be 1-{MAX_EXTERNAL_ID} characters")
        if "\x00" in record.external_id:
            raise InvalidArgument("reference external_id may not contain NUL")
        if len(record.text.encode()) > self.settings.max_text_bytes:
            raise ResourceExhausted(
                f"reference {record.external_id!r}: text exceeds {self.settings.max_text_bytes} bytes"
            )
        if "\x00" in record.text:
            raise InvalidArgument(f"reference {record.external_id!r}: text may not contain NUL")
        metadata = metadata_from_record(record, self.settings.max_metadata_bytes)
        if record.memory_size > self.settings.max_memory_bytes:
            raise ResourceExhausted(
                f"reference {record.external_id!r}: memory of {record.memory_size} bytes exceeds the limit of "
                f"{self.settings.max_memory_bytes}"
            )
        if not record.embedding and bank.embedder_name != BUILTIN_EMBEDDER:
            raise InvalidArgument(
                f"reference {record.external_id!r} has no embedding; bank {bank.name!r} uses the client-side "
                f"embedder {bank.embedder_name!r}, so send a vector"
            )
        if not record.embedding and not record.text.strip():
            raise InvalidArgument(f"reference {record.external_id!r} has neither text nor embedding")
        return metadata

    async def _finish(self, bank: Bank, pending: _PendingReference) -> ReferenceRow:
        record = pending.record
        if len(pending.memory) != record.memory_size:
            raise InvalidArgument(
                f"reference {record.external_id!r}: memory_size says {record.memory_size} bytes, "
                f"stream carried {len(pending.memory)}"
            )
        memory = bytes(pending.memory) if record.memory_size else None
        if memory is not None:
            try:
                header = await self.cpu.run(validate_payload, memory, bank.spec, bank.model_fingerprint)
            except CodecError as err:
                raise InvalidArgument(f"reference {record.external_id!r}: invalid memory: {err}") from None
            if header.scheme == "pq":
                stored = await self.codebooks.digest(bank, header.codebook_version)
                if stored != header.codebook_digest:
                    problem = "is not in the bank" if stored is None else "differs from the bank's"
                    raise InvalidArgument(
                        f"reference {record.external_id!r}: its pq codebook version {header.codebook_version} {problem}"
                    )
        embedding = (
            vector_from_values(record.embedding, bank, f"embedding of {record.external_id!r}")
            if record.embedding
            else None
        )
        return ReferenceRow(record.external_id, record.text, pending.metadata, embedding, memory)

    async def _stage(self, writer, rows: list[ReferenceRow]) -> None:
        missing = [row for row in rows if row.embedding is None]
        if missing:
            vectors = await self.embedder.embed_async([row.text for row in missing])
            for row, vector in zip(missing, vectors):
                row.embedding = vector
        await writer.stage(rows)

    @rpc
    async def Write(self, request_iterator, context):
        tenant_id = await self.auth.tenant(context)
        await self.quotas.check_storage(tenant_id)
        bank: Bank | None = None
        writer = None
        batch: list[ReferenceRow] = []
        batch_bytes = 0
        current: _PendingReference | None = None
        try:
            async for message in request_iterator:
                if bank is None:
                    if not message.bank:
                        raise InvalidArgument("the first Write message must name the bank")
                    bank = await self.banks.get(tenant_id, message.bank)
                    writer = self.refs.writer(bank)
                elif message.bank and message.bank != bank.name:
                    raise InvalidArgument("one Write stream writes to one bank")
                kind = message.WhichOneof("item")
                if kind == "reference":
                    if current is not None:
                        batch.append(await self._finish(bank, current))
                    metadata = self._check_record(bank, message.reference)
                    current = _PendingReference(message.reference, metadata, bytearray(message.reference.memory_chunk))
                    batch_bytes += message.ByteSize()
                elif kind == "memory_chunk":
                    if current is None:
                        raise InvalidArgument("memory_chunk before any reference")
                    current.memory += message.memory_chunk
                    batch_bytes += len(message.memory_chunk)
                    if len(current.memory) > current.record.memory_size:
                        raise InvalidArgument(
                            f"reference {current.record.external_id!r}: more memory bytes than memory_size "
                            f"({current.record.memory_size})"
                        )
                if len(batch) >= self.settings.write_batch_rows or (batch and batch_bytes >= self.settings.write_batch_bytes):
                    await self._stage(writer, batch)
                    batch, batch_bytes = [], len(current.memory) if current else 0
            if bank is None:
                raise InvalidArgument("empty Write stream")
            if current is not None:
                batch.append(await self._finish(bank, current))
            await self._stage(writer, batch)
            await self.quotas.check_storage(tenant_id, writer.staged_bytes)
            counts = await writer.commit()
        except BaseException:
            if writer is not None and writer.staged_bytes:
                await asyncio.shield(discard_quietly(writer.discard(), "Write"))
            raise
        return memories_pb2.WriteSummary(
            inserted=counts.inserted, updated=counts.updated, unchanged=counts.unchanged,
            memory_bytes=counts.memory_bytes,
        )

    # --- Reads -----------------------------------------------------------------------------

    def _frames(self, row: StoredReference, rank: int | None, with_text: bool, with_memory: bool):
        """A reference's frames: its description with the first memory chunk, then the rest."""
        chunk = self.settings.chunk_bytes
        memory = row.memory if with_memory and row.memory else b""
        yield memories_pb2.ReferenceFrame(
            reference=memories_pb2.StoredReference(
                external_id=row.external_id, text=row.text if with_text else "",
                metadata={key: value for key, value in row.metadata.items() if isinstance(value, str)},
                metadata_json=metadata_to_json(row.metadata), score=row.score, memory_size=row.memory_size,
                memory_crc32=row.memory_crc32, rank=rank if rank is not None else 0,
            ),
            memory_chunk=memory[:chunk],
        )
        for start in range(chunk, len(memory), chunk):
            yield memories_pb2.ReferenceFrame(memory_chunk=memory[start : start + chunk])

    def _packed(self, frames):
        """Group frames into messages of up to about chunk_bytes (one message per small answer)."""
        for batch in size_batches(frames, self.settings.chunk_bytes):
            yield memories_pb2.ReferenceFrames(frames=batch)

    async def _query_vector(self, bank: Bank, request: memories_pb2.RetrieveRequest) -> np.ndarray:
        kind = request.WhichOneof("query")
        if kind == "vector":
            return vector_from_values(request.vector.values, bank, "query vector")
        if kind == "text" and request.text.strip():
            if bank.embedder_name != BUILTIN_EMBEDDER:
                raise InvalidArgument(
                    f"bank {bank.name!r} uses the client-side embedder {bank.embedder_name!r}: query by vector"
                )
            if len(request.text.encode()) > self.settings.max_text_bytes:
                raise ResourceExhausted(f"query text exceeds {self.settings.max_text_bytes} bytes")
            return await self.embedder.embed_query(request.text, namespace=bank.tenant_id)  # per tenant: no side channel
        raise InvalidArgument("Retrieve needs a query: non-empty text or a vector")

    @rpc
    async def Retrieve(self, request, context):
        tenant_id = await self.auth.tenant(context)
        top_k = request.top_k or DEFAULT_TOP_K
        if top_k < 0:
            raise InvalidArgument(f"top_k must be positive, got {top_k}")
        if top_k > self.settings.max_top_k:
            raise InvalidArgument(f"top_k {top_k} exceeds the limit of {self.settings.max_top_k}")
        if not 0.0 <= request.max_overlap <= 1.0:
            raise InvalidArgument(f"max_overlap must be a fraction in [0, 1], got {request.max_overlap}")
        if request.max_overlap > 0 and request.WhichOneof("query") != "text":
            raise InvalidArgument("max_overlap compares with the query text: query by text to use it")
        conditions = conditions_from_proto("where", request.where, self.settings.max_metadata_bytes,
                                           dict(request.filter))
        bank = await self.banks.get(tenant_id, request.bank)
        vector = await self._query_vector(bank, request)
        excluding = request.max_overlap > 0
        limit = min(top_k * 4 + 16, self.settings.max_top_k) if excluding else top_k
        # Without the overlap rule the search statement reads the memories too (one round trip, one
        # snapshot); with it, memories are read after the rule, only for the references it keeps.
        inline = request.include_memory and not excluding
        rows = await self.refs.search(bank, vector, limit, conditions,
                                      memory_budget=self.settings.read_batch_bytes if inline else None)
        if excluding:
            dropped = await self.cpu.run(overlapping, request.text, [r.text for r in rows], request.max_overlap,
                                         max_words=OVERLAP_MAX_WORDS)
            rows = [r for r, drop in zip(rows, dropped) if not drop]
        rows = rows[:top_k]
        for rank, row in enumerate(rows):
            row.rank = rank
        if not request.include_memory:
            for message in self._packed(self._all_frames(rows, request.include_text, False, ranked=True)):
                yield message
            return
        if inline:  # the nearest references whose memories fit read_batch_bytes came with them
            ready = next((i for i, row in enumerate(rows) if row.memory is None and row.memory_size), len(rows))
            for message in self._packed(self._all_frames(rows[:ready], request.include_text, True, ranked=True)):
                yield message
            rows = rows[ready:]
            if not rows:
                return
        async for message in self._with_memories(bank, rows, request.include_text, ranked=True):
            yield message

    async def _batch_vectors(self, bank: Bank, request: memories_pb2.RetrieveBatchRequest) -> list[np.ndarray]:
        """Each query's vector: given, or its text embedded (all texts of the batch together)."""
        vectors: list[np.ndarray | None] = []
        texts: dict[int, str] = {}
        for i, query in enumerate(request.queries):
            kind = query.WhichOneof("query")
            if kind == "vector":
                vectors.append(vector_from_values(query.vector.values, bank, f"queries[{i}].vector"))
                continue
            if kind != "text" or not query.text.strip():
                raise InvalidArgument(f"queries[{i}] needs a query: non-empty text or a vector")
            if bank.embedder_name != BUILTIN_EMBEDDER:
                raise InvalidArgument(f"queries[{i}]: bank {bank.name!r} uses the client-side embedder "
                                      f"{bank.embedder_name!r}: query by vector")
            if len(query.text.encode()) > self.settings.max_text_bytes:
                raise ResourceExhausted(f"queries[{i}].text exceeds {self.settings.max_text_bytes} bytes")
            texts[i] = query.text
            vectors.append(None)
        if texts:  # concurrent lookups: the embedder batches them into few model calls
            embedded = await asyncio.gather(*(self.embedder.embed_query(t, namespace=bank.tenant_id)
                                              for t in texts.values()))
            for i, vector in zip(texts, embedded):
                vectors[i] = vector
        return vectors  # type: ignore[return-value]

    @rpc
    async def RetrieveBatch(self, request, context):
        tenant_id = await self.auth.tenant(context)
        n = len(request.queries)
        if not 1 <= n <= MAX_BATCH_QUERIES:
            raise InvalidArgument(f"queries must hold 1 to {MAX_BATCH_QUERIES} queries, got {n}")
        top_k = request.top_k or DEFAULT_TOP_K
        if top_k < 0:
            raise InvalidArgument(f"top_k must be positive, got {top_k}")
        if top_k > self.settings.max_top_k:
            raise InvalidArgument(f"top_k {top_k} exceeds the limit of {self.settings.max_top_k}")
        if n * top_k > self.settings.max_top_k:
            raise InvalidArgument(f"{n} queries x top_k {top_k} = {n * top_k} references exceeds the limit of "
                                  f"{self.settings.max_top_k} per call")
        if not 0.0 <= request.max_overlap <= 1.0:
            raise InvalidArgument(f"max_overlap must be a fraction in [0, 1], got {request.max_overlap}")
        excluding = request.max_overlap > 0
        if excluding and any(q.WhichOneof("query") != "text" for q in request.queries):
            raise InvalidArgument("max_overlap compares with each query's text: every query must be a text to use it")
        conditions = conditions_from_proto("where", request.where, self.settings.max_metadata_bytes,
                                           dict(request.filter))
        bank = await self.banks.get(tenant_id, request.bank)
        vectors = await self._batch_vectors(bank, request)
        # Candidates for the overlap rule as Retrieve takes them, but never more than one
        # Retrieve's limit for the whole batch.
        limit = max(top_k, min(top_k * 4 + 16, self.settings.max_top_k // n)) if excluding else top_k
        found = await self.refs.search_many(bank, vectors, limit, conditions)
        hits = []
        for i, rows in enumerate(found):
            if excluding:
                dropped = await self.cpu.run(overlapping, request.queries[i].text, [r.text for r in rows],
                                             request.max_overlap, max_words=OVERLAP_MAX_WORDS)
                rows = [r for r, drop in zip(rows, dropped) if not drop]
            for rank, row in enumerate(rows[:top_k]):
                row.rank = rank
                hits.append((i, row))
        messages = (memories_pb2.BatchHit(query=i, reference=next(self._frames(row, row.rank, request.include_text,
                                                                               False)).reference)
                    for i, row in hits)
        for batch in size_batches(messages, self.settings.chunk_bytes):
            yield memories_pb2.RetrieveBatchResponse(hits=batch)
        if not request.include_memory:
            return
        stored = list({row.external_id: row for _, row in hits if row.memory_size}.values())
        for group in size_batches(stored, self.settings.read_batch_bytes, size_of=lambda row: row.memory_size):
            current = await self.refs.load(bank, [r.external_id for r in group], True)
            rows = [current[r.external_id] for r in group if r.external_id in current and current[r.external_id].memory]
            for batch in size_batches(self._all_frames(rows, False, True, ranked=False), self.settings.chunk_bytes):
                yield memories_pb2.RetrieveBatchResponse(frames=batch)
            current = rows = None  # let this group go before the next one is read

    def _all_frames(self, rows, with_text: bool, with_memory: bool, ranked: bool):
        for row in rows:
            yield from self._frames(row, row.rank if ranked else None, with_text, with_memory)

    async def _with_memories(self, bank: Bank, rows: list[StoredReference], with_text: bool, ranked: bool):
        """Messages for the rows with their memories, read a group of about ``read_batch_bytes`` at a
        time (so a call's memory stays bounded whatever it asks for), each row as it is now; a row
        deleted meanwhile is left out."""
        for group in size_batches(rows, self.settings.read_batch_bytes, size_of=lambda row: row.memory_size):
            current = await self.refs.load(bank, [r.external_id for r in group], True)
            fresh = []
            for old in group:
                now = current.get(old.external_id)
                if now is not None:
                    now.score, now.rank = old.score, old.rank
                    fresh.append(now)
            for message in self._packed(self._all_frames(fresh, with_text, True, ranked)):
                yield message
            current = fresh = None  # let this group go before the next one is read

    def _check_ids(self, ids) -> list[str]:
        ids = list(ids)
        if not ids:
            raise InvalidArgument("external_ids is empty")
        if len(ids) > self.settings.max_fetch_ids:
            raise InvalidArgument(f"at most {self.settings.max_fetch_ids} external_ids per call, got {len(ids)}")
        return ids

    @rpc
    async def Fetch(self, request, context):
        tenant_id = await self.auth.tenant(context)
        ids = self._check_ids(request.external_ids)
        bank = await self.banks.get(tenant_id, request.bank)
        wanted = list(dict.fromkeys(ids))
        # One statement: the references that fit read_batch_bytes whole, the sizes of the rest.
        whole, later = await self.refs.fetch(bank, wanted, request.include_memory, self.settings.read_batch_bytes)
        if not request.allow_missing and len(whole) + len(later) < len(wanted):
            present = {row.external_id for row in whole}.union(external_id for external_id, _ in later)
            missing = [i for i in wanted if i not in present]
            shown = ", ".join(repr(i) for i in missing[:10])
            raise NotFound(f"{len(missing)} reference(s) not found in bank {bank.name!r}: {shown}")
        for message in self._packed(self._all_frames(whole, True, request.include_memory, ranked=False)):
            yield message
        whole = None
        sizes = dict(later)
        for group in size_batches(list(sizes), self.settings.read_batch_bytes, size_of=sizes.__getitem__):
            current = await self.refs.load(bank, group, request.include_memory)
            rows = [current[i] for i in group if i in current]  # deleted meanwhile: left out
            for message in self._packed(self._all_frames(rows, True, request.include_memory, ranked=False)):
                yield message
            current = rows = None  # let this group go before the next one is read

    @rpc
    async def Delete(self, request, context):
        tenant_id = await self.auth.tenant(context)
        ids = self._check_ids(request.external_ids)
        bank = await self.banks.get(tenant_id, request.bank)
        return memories_pb2.DeleteResponse(deleted=await self.refs.delete(bank, ids))

    @rpc
    async def Stats(self, request, context):
        tenant_id = await self.auth.tenant(context)
        bank = await self.banks.get(tenant_id, request.bank)
        return memories_pb2.StatsResponse(**await self.refs.stats(bank))

    # --- Scroll ----------------------------------------------------------------------------

    @staticmethod
    def _listing(bank: Bank, conditions: list[Condition]) -> str:
        """What a scroll token is bound to besides the tenant: the bank (its id: a bank dropped and
        made again is another listing) and the filter."""
        digest = hashlib.sha256(json.dumps([c.to_json() for c in conditions], sort_keys=True).encode()).hexdigest()
        return f"scroll.{bank.id}.{digest[:32]}"

    @rpc
    async def Scroll(self, request, context):
        tenant_id = await self.auth.tenant(context)
        if not 0 <= request.page_size <= MAX_SCROLL_PAGE:
            raise InvalidArgument(f"page_size must be between 1 and {MAX_SCROLL_PAGE} (0: {DEFAULT_SCROLL_PAGE}), "
                                  f"got {request.page_size}")
        page_size = request.page_size or DEFAULT_SCROLL_PAGE
        conditions = conditions_from_proto("where", request.where, self.settings.max_metadata_bytes)
        bank = await self.banks.get(tenant_id, request.bank)
        listing = self._listing(bank, conditions)
        after = self.tokens.open(tenant_id, listing, request.page_token, "page_token")
        page = await self.refs.page(bank, after, page_size + 1, conditions)
        more = len(page) > page_size
        page = page[:page_size]

        def weight(entry) -> int:
            _, text_bytes, memory_bytes = entry
            return text_bytes + (memory_bytes if request.include_memory else 0)

        for group in size_batches(page, self.settings.read_batch_bytes, size_of=weight):
            ids = [external_id for external_id, _, _ in group]
            current = await self.refs.load(bank, ids, request.include_memory, conditions)
            rows = [current[i] for i in ids if i in current]  # a reference deleted or changed meanwhile: left out
            frames = self._all_frames(rows, request.include_text, request.include_memory, ranked=False)
            for batch in size_batches(frames, self.settings.chunk_bytes):
                yield memories_pb2.ScrollResponse(frames=batch)
            current = rows = None  # let this group go before the next one is read
        last = page[-1][0] if more else ""
        yield memories_pb2.ScrollResponse(next_page_token=self.tokens.seal(tenant_id, listing, last))
