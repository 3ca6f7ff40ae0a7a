"""Clients of the memory3 service: :class:`AsyncClient` (asyncio) and :class:`Client` (blocking).

Idempotent calls retry on UNAVAILABLE through gRPC's own retry policy; Write streams are
idempotent per (bank, external id), so the client re-sends a failed batch itself. Writes go in
batches with a bounded number in flight (back-pressure: a slow server slows the writer).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence

from memory3.core.banks import BankInfo, bank_from_proto, bank_to_proto
from memory3.core.loop_thread import LoopThread
from memory3.core.metadata import conditions_from_filter
from memory3.core.references import BankStats, Reference, StoredReference, WriteSummary
from memory3.sdk.client.conversions import (
    FrameAssembler, filter_to_proto, metadata_of, retrieve_filter, write_requests,
)
from memory3.sdk.client.trajectories import TrajectoryMethods
from memory3.sdk.client.transport import Transport
from memory3.v1 import banks_pb2, memories_pb2, tenants_pb2


class AsyncClient(Transport, TrajectoryMethods):
    """asyncio client. ``api_key`` is a tenant key (data) or the admin key (tenants).
    Trajectory and proxy-registry calls come from :class:`TrajectoryMethods`."""

    # banks
    async def create_bank(self, bank: BankInfo) -> BankInfo:
        reply = await self.banks.CreateBank(banks_pb2.CreateBankRequest(bank=bank_to_proto(bank)), **self._call())
        return bank_from_proto(reply)

    async def get_bank(self, name: str) -> BankInfo:
        return bank_from_proto(await self.banks.GetBank(banks_pb2.GetBankRequest(name=name), **self._call()))

    async def list_banks(self) -> list[BankInfo]:
        banks, token = [], ""
        while True:
            reply = await self.banks.ListBanks(banks_pb2.ListBanksRequest(page_token=token), **self._call())
            banks += [bank_from_proto(b) for b in reply.banks]
            token = reply.next_page_token
            if not token:
                return banks

    async def delete_bank(self, name: str) -> int:
        reply = await self.banks.DeleteBank(banks_pb2.DeleteBankRequest(name=name), **self._call())
        return reply.references_deleted

    async def put_codebook(self, bank: str, blob: bytes) -> int:
        """Store a PQ codebook (``PQCodebook.to_bytes()``) with the bank; returns its version."""
        chunks = [blob[i : i + self.chunk_bytes] for i in range(0, len(blob), self.chunk_bytes)] or [b""]
        requests = [banks_pb2.PutCodebookRequest(bank=bank if i == 0 else "", chunk=c) for i, c in enumerate(chunks)]
        return (await self.banks.PutCodebook(iter(requests), **self._call())).version

    async def get_codebook(self, bank: str, version: int = 0) -> bytes:
        """A codebook blob of the bank: ``version`` 0 means the newest."""
        blob = bytearray()
        async for message in self.banks.GetCodebook(
            banks_pb2.GetCodebookRequest(bank=bank, version=version), **self._call()
        ):
            blob += message.chunk
        return bytes(blob)

    # memories
    async def write(self, bank: str, references: Sequence[Reference]) -> WriteSummary:
        """One atomic Write stream; retried whole on UNAVAILABLE (writes are idempotent)."""
        references = list(references)
        reply = await self.retry_stream(
            lambda: self.client_stream(self.memories.Write, write_requests(bank, references, self.chunk_bytes))
        )
        return WriteSummary(reply.inserted, reply.updated, reply.unchanged, reply.memory_bytes, reply.consistency_token)

    async def write_many(
        self,
        bank: str,
        references: Iterable[Reference] | AsyncIterable[Reference],
        *,
        batch_size: int = 64,
        max_in_flight: int = 2,
        progress=None,
    ) -> WriteSummary:
        """Write an iterable of references in batches, at most ``max_in_flight`` batches at once.
        The last batch is sent once all others are acknowledged, so the summary's consistency token
        (the last batch's) covers every batch."""
        total = WriteSummary()
        in_flight: set[asyncio.Task] = set()

        async def flush(batch: list[Reference]) -> None:
            nonlocal total
            summary = await self.write(bank, batch)
            total += summary
            if progress is not None:
                progress.update(len(batch))

        async def submit(batch: list[Reference]) -> None:
            while len(in_flight) >= max_in_flight:
                done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    in_flight.discard(task)
                    task.result()
            in_flight.add(asyncio.ensure_future(flush(batch)))

        batch: list[Reference] = []
        full: list[Reference] | None = None  # the latest full batch: sent once a reference follows it

        async def add(ref: Reference) -> None:
            nonlocal batch, full
            if full is not None:
                await submit(full)
                full = None
            batch.append(ref)
            if len(batch) >= batch_size:
                full, batch = batch, []

        if hasattr(references, "__aiter__"):
            async for ref in references:
                await add(ref)
        else:
            for ref in references:
                await add(ref)
        for task in in_flight:  # every earlier batch committed before the last one starts
            await task
        last = full or batch
        if last:
            await flush(last)
        return total

    async def retrieve(
        self,
        bank: str,
        *,
        text: str | None = None,
        vector: Sequence[float] | None = None,
        top_k: int = 5,
        filter: Mapping[str, Any] | None = None,
        max_overlap: float = 0.0,
        include_memory: bool = False,
        include_text: bool = True,
        consistency_token: str = "",
    ) -> list[StoredReference]:
        """Nearest references to a text (bank's built-in embedder) or a vector, nearest first.
        ``filter``: conditions on metadata, all of which must hold, e.g. ``{"lang": "en", "year":
        {"gte": 2020}, "tags": {"in": ["a", "b"]}}`` (operators eq, in, gt, gte, lt, lte, exists:
        memory3.core.metadata); a malformed one raises MetadataError (a ValueError) before sending.
        ``consistency_token`` (a write's ``WriteSummary.consistency_token``, here and in every read):
        see at least that write, even when a read replica answers."""
        equal, where = retrieve_filter(filter)
        request = memories_pb2.RetrieveRequest(
            bank=bank, top_k=top_k, filter=equal, where=where, max_overlap=max_overlap,
            include_memory=include_memory, include_text=include_text, consistency_token=consistency_token,
        )
        if vector is not None:
            request.vector.values.extend(vector)
        else:
            request.text = text or ""
        assembler = FrameAssembler(include_memory)
        async for message in self.memories.Retrieve(request, **self._call()):
            assembler.feed_all(message.frames)
        return assembler.finish()

    async def retrieve_batch(
        self,
        bank: str,
        queries: Sequence[str | Sequence[float]],
        *,
        top_k: int = 5,
        filter: Mapping[str, Any] | None = None,
        max_overlap: float = 0.0,
        include_memory: bool = False,
        include_text: bool = True,
        consistency_token: str = "",
    ) -> list[list[StoredReference]]:
        """:meth:`retrieve` for several queries (texts or vectors, e.g. a decoding batch's rows) in
        one round trip: per query its ``top_k`` nearest, nearest first, in query order. With
        ``include_memory`` each distinct memory travels once; references found by several queries
        share its bytes. ``filter`` and ``max_overlap`` apply to every query."""
        equal, where = retrieve_filter(filter)
        request = memories_pb2.RetrieveBatchRequest(
            bank=bank, top_k=top_k, filter=equal, where=where, max_overlap=max_overlap,
            include_memory=include_memory, include_text=include_text, consistency_token=consistency_token,
        )
        for query in queries:
            item = request.queries.add()
            if isinstance(query, str):
                item.text = query
            else:
                item.vector.values.extend(float(x) for x in query)
        rows: list[list[StoredReference]] = [[] for _ in request.queries]
        assembler = FrameAssembler(True)
        async for message in self.memories.RetrieveBatch(request, **self._call()):
            for hit in message.hits:
                if not 0 <= hit.query < len(rows):
                    raise ValueError(f"RetrieveBatch answered query {hit.query} of {len(rows)}")
                r = hit.reference
                rows[hit.query].append(StoredReference(r.external_id, r.text, metadata_of(r), r.memory_size,
                                                       r.memory_crc32, None, r.score, r.rank))
            assembler.feed_all(message.frames)
        if include_memory:
            stored = {ref.external_id: ref for ref in assembler.finish()}
            for row in rows:
                for ref in row:
                    now = stored.get(ref.external_id)
                    if now is not None:  # rewritten since the search: the frame's size and checksum
                        ref.memory, ref.memory_size, ref.memory_crc32 = now.memory, now.memory_size, now.memory_crc32
        return rows

    async def fetch(
        self, bank: str, external_ids: Sequence[str], *, include_memory: bool = True, allow_missing: bool = False,
        consistency_token: str = "",
    ) -> list[StoredReference]:
        request = memories_pb2.FetchRequest(
            bank=bank, external_ids=list(external_ids), include_memory=include_memory, allow_missing=allow_missing,
            consistency_token=consistency_token,
        )
        assembler = FrameAssembler(include_memory)
        async for message in self.memories.Fetch(request, **self._call()):
            assembler.feed_all(message.frames)
        return assembler.finish()

    async def scroll_page(
        self,
        bank: str,
        *,
        filter: Mapping[str, Any] | None = None,
        page_size: int = 100,
        page_token: str = "",
        include_text: bool = True,
        include_memory: bool = False,
        consistency_token: str = "",
    ) -> tuple[list[StoredReference], str]:
        """One page of the bank's references in external_id order (``filter`` as for
        :meth:`retrieve`), and the token of the next page ("" after the last)."""
        request = memories_pb2.ScrollRequest(
            bank=bank, where=filter_to_proto(conditions_from_filter(filter)), page_size=page_size,
            page_token=page_token, include_text=include_text, include_memory=include_memory,
            consistency_token=consistency_token,
        )
        assembler, token = FrameAssembler(include_memory), ""
        async for message in self.memories.Scroll(request, **self._call()):
            assembler.feed_all(message.frames)
            token = message.next_page_token or token
        return assembler.finish(), token

    async def scroll(self, bank: str, **options) -> AsyncIterator[StoredReference]:
        """Every reference of the bank (passing ``filter``), page after page: see :meth:`scroll_page`
        for the options, and ScrollRequest in memories.proto for what a scroll sees of concurrent writes."""
        token = None
        while token != "":
            page, token = await self.scroll_page(bank, page_token=token or "", **options)
            for reference in page:
                yield reference

    async def delete(self, bank: str, external_ids: Sequence[str]) -> int:
        reply = await self.memories.Delete(
            memories_pb2.DeleteRequest(bank=bank, external_ids=list(external_ids)), **self._call()
        )
        return reply.deleted

    async def stats(self, bank: str, *, consistency_token: str = "") -> BankStats:
        request = memories_pb2.StatsRequest(bank=bank, consistency_token=consistency_token)
        reply = await self.memories.Stats(request, **self._call())
        return BankStats(reply.references, reply.with_memory, reply.memory_bytes, reply.text_bytes)

    # tenants (admin key)
    async def create_tenant(self, name: str) -> str:
        return (await self.tenants.CreateTenant(tenants_pb2.CreateTenantRequest(name=name), **self._call())).name

    async def list_tenants(self) -> list[str]:
        reply = await self.tenants.ListTenants(tenants_pb2.ListTenantsRequest(), **self._call())
        return [t.name for t in reply.tenants]

    async def issue_key(self, tenant: str, label: str = "") -> tuple[str, str]:
        reply = await self.tenants.IssueKey(tenants_pb2.IssueKeyRequest(tenant=tenant, label=label), **self._call())
        return reply.key_id, reply.api_key

    async def revoke_key(self, key_id: str) -> bool:
        return (await self.tenants.RevokeKey(tenants_pb2.RevokeKeyRequest(key_id=key_id), **self._call())).revoked

    async def get_quotas(self, tenant: str) -> dict[str, tenants_pb2.Quota]:
        """A tenant's quotas by name (limit, default_limit, overridden, used)."""
        reply = await self.tenants.GetQuotas(tenants_pb2.GetQuotasRequest(tenant=tenant), **self._call())
        return {q.name: q for q in reply.quotas}

    async def set_quota(self, tenant: str, name: str, value: int | None) -> dict[str, tenants_pb2.Quota]:
        """Override one quota of a tenant (None: back to the server's default); the quotas after."""
        request = tenants_pb2.SetQuotaRequest(tenant=tenant, name=name, value=value or 0, reset=value is None)
        reply = await self.tenants.SetQuota(request, **self._call())
        return {q.name: q for q in reply.quotas}


class Client:
    """Blocking client: the same calls as :class:`AsyncClient`, run on a private event loop thread."""

    def __init__(self, target: str, api_key: str, **options) -> None:
        self._loop = LoopThread("memory3-client")
        self._async = self._run(self._make(target, api_key, options))

    @staticmethod
    async def _make(target, api_key, options) -> AsyncClient:
        return AsyncClient(target, api_key, **options)

    def _run(self, coroutine):
        return self._loop.run(coroutine)

    @property
    def aio(self) -> AsyncClient:
        """The :class:`AsyncClient` underneath, for SDK coroutines that take one (run them with :meth:`run`)."""
        return self._async

    def run(self, coroutine):
        """Run a coroutine on this client's event loop thread and return its result (e.g.
        ``client.run(writer.write(client.aio, bank, refs))``)."""
        return self._run(coroutine)

    def __getattr__(self, name):
        method = getattr(self._async, name)
        if not asyncio.iscoroutinefunction(method):
            return method
        return lambda *args, **kwargs: self._run(method(*args, **kwargs))

    def scroll(self, bank: str, **options) -> Iterator[StoredReference]:
        """Every reference of the bank, page after page (:meth:`AsyncClient.scroll`)."""
        token = None
        while token != "":
            page, token = self.scroll_page(bank, page_token=token or "", **options)
            yield from page

    def close(self) -> None:
        self._run(self._async.close())
        self._loop.stop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
