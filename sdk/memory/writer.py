"""The SDK write path: reference texts -> explicit memories -> compressed blobs -> the service.

Bulk ingestion (warm start) and the decoding path's cold start must produce the same memories, so
both use :class:`MemoryWriter`: it encodes batches with :class:`memory3.sdk.memory.encoder.MemoryEncoder`
on a worker thread, compresses each memory with :func:`memory3.sdk.memory.codec.encode_memory` in the
bank's scheme (``pq`` is refused without the bank's :class:`~memory3.sdk.memory.pq.PQCodebook`), and
writes through :meth:`memory3.sdk.client.client.AsyncClient.write_many`, whose bounded batches in
flight are the back-pressure. With ``skip_short``, references too short for the spec are written as
text only (still retrievable, e.g. for RAG). A bank in a model's retrieval space gets each
reference's key as its vector (the encoder's :class:`~memory3.sdk.memory.retrieval_head.RetrievalHead`,
which must be the bank's: :class:`~memory3.sdk.memory.retrieval_head.RetrievalSpaceError` otherwise).

Details: docs/design.md ("Data path of one memory").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

from memory3.core.blob import CodecError
from memory3.core.references import Reference, StoredReference, WriteSummary
from memory3.sdk.memory.codec import decode_memory, encode_memory
from memory3.sdk.memory.encoder import MemoryEncoder, ReferenceTooShortError
from memory3.sdk.memory.pq import PQCodebook
from memory3.sdk.memory.retrieval_head import RetrievalSpaceError, is_model_space
from memory3.sdk.memory.tensors import ExplicitMemory

RefLike = Reference | StoredReference | tuple
"""A reference to write: a :class:`Reference`, a retrieved :class:`StoredReference`, or a tuple
``(id, text)`` / ``(id, text, metadata)``."""


def as_reference(item: RefLike) -> Reference:
    """Normalise what users hand in (tuples, stored references) to a :class:`Reference` with no memory."""
    if isinstance(item, (Reference, StoredReference)):
        return Reference(item.external_id, item.text, dict(item.metadata or {}))
    if isinstance(item, tuple) and len(item) in (2, 3):
        external_id, text, *rest = item
        return Reference(str(external_id), text, dict(rest[0]) if rest and rest[0] else {})
    raise TypeError(f"expected Reference, StoredReference or (id, text[, metadata]), got {type(item).__name__}")


@dataclass
class EncodedReference:
    """One reference after the first two steps: what is written, and the memory the blob decodes to."""

    reference: Reference  # .memory holds the blob (None when the text was too short and skipped)
    memory: ExplicitMemory | None  # decode(blob): exactly what a reader of the service will get


class MemoryWriter:
    """Encodes, compresses and writes references for one model (and one bank scheme).

    ``scheme`` defaults to the spec's ``codec``. ``codebook`` is required for ``pq``.
    """

    def __init__(
        self,
        encoder: MemoryEncoder,
        *,
        scheme: str | None = None,
        codebook: PQCodebook | None = None,
        encode_batch: int = 16,
        skip_short: bool = False,
    ) -> None:
        self.encoder = encoder
        self.scheme = scheme or encoder.spec.codec
        if self.scheme == "pq" and codebook is None:
            raise CodecError("bank scheme is pq: pass the bank's PQ codebook to the memory writer")
        self.codebook = codebook
        self.encode_batch = encode_batch
        self.skip_short = skip_short
        self._keyed_banks: dict[str, bool] = {}  # bank -> whether it lives in the head's space

    async def bank_wants_keys(self, client, bank: str) -> bool:
        """Whether ``bank`` lives in a model's space (its vectors are this encoder's retrieval keys);
        RetrievalSpaceError when it is another model's or head's, or the encoder has no head."""
        if bank not in self._keyed_banks:
            info = await client.get_bank(bank)
            keyed = is_model_space(info.embedder_name)
            if keyed:
                head = self.encoder.retrieval_head
                if head is None:
                    raise RetrievalSpaceError(
                        f"bank {bank!r} lives in the model space {info.embedder_name!r}: give the encoder the "
                        "model's retrieval head (MemoryEncoder(..., retrieval_head=RetrievalHead.load(model_dir, model)))")
                head.check_bank(bank, info.embedder_name, info.embedder_dim)
            self._keyed_banks[bank] = keyed
        return self._keyed_banks[bank]

    # ---------------------------------------------------------------- encode + compress
    def encode(self, items: Sequence[RefLike], keys: bool = False) -> list[EncodedReference]:
        """Encode and compress one batch (blocking; call from a worker thread in async code).
        ``keys``: give each reference without a vector its retrieval key (model-space banks)."""
        refs = [as_reference(item) for item in items]
        if not refs:
            return []
        try:
            memories: list[ExplicitMemory | None] = list(self.encoder.encode([r.text for r in refs]))
        except ReferenceTooShortError:
            if not self.skip_short:
                raise
            memories = [self._encode_one(r.text) for r in refs]  # find the short ones
        if keys:
            self._set_keys(refs, memories)
        out = []
        for ref, memory in zip(refs, memories):
            if memory is None:
                out.append(EncodedReference(ref, None))
                continue
            ref.memory = encode_memory(memory, self.scheme, self.codebook)
            out.append(EncodedReference(ref, decode_memory(ref.memory, codebook=self.codebook)))
        return out

    def _set_keys(self, refs: list[Reference], memories: list[ExplicitMemory | None]) -> None:
        """Each reference's vector: its memory's key, or for a text kept without memory the same
        key from the embedding lookup alone."""
        if self.encoder.retrieval_head is None:
            raise RetrievalSpaceError("model-space keys need an encoder with a retrieval head")
        bare = [i for i, m in enumerate(memories) if m is None or m.retrieval_key is None]
        looked_up = iter(self.encoder.retrieval_keys([refs[i].text for i in bare]).cpu().tolist() if bare else [])
        bare_set = set(bare)
        for i, (ref, memory) in enumerate(zip(refs, memories)):
            key = next(looked_up) if i in bare_set else memory.retrieval_key.cpu().tolist()
            if ref.embedding is None:  # a reference that carries its own vector keeps it
                ref.embedding = key

    def _encode_one(self, text: str) -> ExplicitMemory | None:
        try:
            return self.encoder.encode([text])[0]
        except ReferenceTooShortError:
            return None

    async def _encoded_stream(self, items: Iterable[RefLike], keys: bool = False) -> AsyncIterator[Reference]:
        batch: list[RefLike] = []
        for item in items:
            batch.append(item)
            if len(batch) >= self.encode_batch:
                for encoded in await asyncio.to_thread(self.encode, batch, keys):
                    yield encoded.reference
                batch = []
        if batch:
            for encoded in await asyncio.to_thread(self.encode, batch, keys):
                yield encoded.reference

    # ---------------------------------------------------------------- write
    async def write(
        self,
        client,
        bank: str,
        items: Iterable[RefLike],
        *,
        write_batch: int = 64,
        max_in_flight: int = 2,
        progress: bool | object = True,
        total: int | None = None,
    ) -> WriteSummary:
        """``encode -> compress -> Write`` for an iterable of references through an AsyncClient.

        ``progress``: True for a tqdm bar (references written), False for none, or a tqdm-like
        object with ``update(n)``.
        """
        keys = await self.bank_wants_keys(client, bank)
        bar, own_bar = progress, False
        if progress is True:
            from tqdm.auto import tqdm

            if total is None and hasattr(items, "__len__"):
                total = len(items)  # type: ignore[arg-type]
            bar, own_bar = tqdm(total=total, unit="ref", desc=f"write {bank}"), True
        elif progress is False:
            bar = None
        try:
            return await client.write_many(
                bank, self._encoded_stream(items, keys), batch_size=write_batch, max_in_flight=max_in_flight, progress=bar
            )
        finally:
            if own_bar:
                bar.close()

    async def ensure_memories(self, client, bank: str, refs: Sequence[StoredReference]) -> dict[str, tuple[ExplicitMemory, bytes]]:
        """Cold start: encode the references that have no memory yet, store them, return them.

        Only ``refs`` with ``memory_size == 0`` are encoded; each is written back under the same id,
        text and metadata (no vector: the bank's built-in embedder re-embeds the text, giving the
        vector it already had; a model-space bank gets the retrieval key again). Returns ``{external_id: (memory, blob)}`` where ``memory`` is the
        decoded blob — exactly what later readers fetch, so cold and warm reads agree. References
        too short to encode are left out of the result (they stay text-only).
        """
        missing = [r for r in refs if r.memory_size == 0]
        if not missing:
            return {}
        keys = await self.bank_wants_keys(client, bank)
        encoded = await asyncio.to_thread(self.encode, missing, keys)
        written = [e for e in encoded if e.memory is not None]
        if written:
            await client.write(bank, [e.reference for e in written])
        return {e.reference.external_id: (e.memory, e.reference.memory) for e in written}


async def write_references(client, bank: str, items: Iterable[RefLike], encoder: MemoryEncoder, **options) -> WriteSummary:
    """Convenience: ``MemoryWriter(encoder, scheme=..., codebook=...).write(client, bank, items, ...)``."""
    writer_keys = {"scheme", "codebook", "encode_batch", "skip_short"}
    writer = MemoryWriter(encoder, **{k: v for k, v in options.items() if k in writer_keys})
    return await writer.write(client, bank, items, **{k: v for k, v in options.items() if k not in writer_keys})


async def ensure_memories(
    client, bank: str, refs: Sequence[StoredReference], encoder: MemoryEncoder, **writer_options
) -> dict[str, ExplicitMemory]:
    """Cold start for retrieved references with no memory: encode, store, return ``{id: memory}``."""
    found = await MemoryWriter(encoder, **writer_options).ensure_memories(client, bank, refs)
    return {key: memory for key, (memory, _) in found.items()}
