"""SDK types to and from wire messages, shared by the async and the sync client."""

from __future__ import annotations

from typing import Iterable, Iterator

from memory3.v1 import banks_pb2, memories_pb2

from .codec import payload_checksum, trailer_checksum
from .memory_spec import MemorySpec
from .types import BankInfo, Reference, StoredReference

DEFAULT_CHUNK_BYTES = 1024 * 1024


def size_batches(messages: Iterable, max_bytes: int, overhead: int = 0) -> Iterator[list]:
    """Group protobuf messages into lists of about ``max_bytes`` serialized bytes (each message
    counted as ``ByteSize() + overhead``; one oversized message still forms a list of its own):
    how both sides pack repeated fields into stream messages below the gRPC message limit."""
    batch, size = [], 0
    for message in messages:
        n = message.ByteSize() + overhead
        if batch and size + n > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(message)
        size += n
    if batch:
        yield batch


class CorruptPayload(Exception):
    """A memory arrived with a checksum that does not match what the service stored."""


def bank_to_proto(bank: BankInfo) -> banks_pb2.Bank:
    """A bank definition on the wire (the service's own Bank type has the same fields)."""
    spec = bank.spec
    message = banks_pb2.Bank(
        name=bank.name,
        model_fingerprint=bank.model_fingerprint,
        memory_spec=banks_pb2.MemorySpec(
            memory_layers=list(spec.memory_layers), kv_heads=spec.kv_heads, head_dim=spec.head_dim,
            tokens_per_head=spec.tokens_per_head, reference_length=spec.reference_length, codec=spec.codec,
        ),
        embedder=banks_pb2.EmbedderSpec(name=bank.embedder_name, dimension=bank.embedder_dim, metric=bank.metric),
    )
    if bank.created_at is not None:
        message.created_at.FromDatetime(bank.created_at)
    return message


def bank_from_proto(message: banks_pb2.Bank) -> BankInfo:
    ms = message.memory_spec
    return BankInfo(
        name=message.name,
        model_fingerprint=message.model_fingerprint,
        spec=MemorySpec(tuple(ms.memory_layers), ms.kv_heads, ms.head_dim, ms.tokens_per_head, ms.reference_length, ms.codec),
        embedder_name=message.embedder.name,
        embedder_dim=message.embedder.dimension,
        metric=message.embedder.metric,
        created_at=message.created_at.ToDatetime() if message.HasField("created_at") else None,
    )


def write_requests(
    bank: str, references: Iterable[Reference], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[memories_pb2.WriteRequest]:
    """The messages of one Write stream: each reference, then its memory in chunks."""
    first = True
    for ref in references:
        memory = ref.memory or b""
        record = memories_pb2.ReferenceRecord(
            external_id=ref.external_id, text=ref.text, metadata=dict(ref.metadata),
            embedding=list(ref.embedding) if ref.embedding is not None else [],
            memory_size=len(memory), memory_chunk=memory[:chunk_bytes],
        )
        yield memories_pb2.WriteRequest(bank=bank if first else "", reference=record)
        first = False
        for start in range(chunk_bytes, len(memory), chunk_bytes):
            yield memories_pb2.WriteRequest(memory_chunk=memory[start : start + chunk_bytes])
    if first:
        yield memories_pb2.WriteRequest(bank=bank)


class FrameAssembler:
    """Turns a stream of ReferenceFrames back into whole references, checking each checksum."""

    def __init__(self, expects_memory: bool) -> None:
        self.expects_memory = expects_memory
        self._current: StoredReference | None = None
        self._buffer = bytearray()
        self.done: list[StoredReference] = []

    def _close(self) -> None:
        ref = self._current
        if ref is None:
            return
        if self.expects_memory and ref.memory_size:
            if len(self._buffer) != ref.memory_size:
                raise CorruptPayload(f"{ref.external_id}: got {len(self._buffer)} of {ref.memory_size} memory bytes")
            if not payload_checksum(self._buffer) == trailer_checksum(self._buffer) == ref.memory_crc32:
                raise CorruptPayload(f"{ref.external_id}: memory checksum mismatch")
            ref.memory = bytes(self._buffer)
        self.done.append(ref)
        self._current = None
        self._buffer = bytearray()

    def feed(self, frame: memories_pb2.ReferenceFrame) -> None:
        if frame.HasField("reference"):
            self._close()
            r = frame.reference
            self._current = StoredReference(
                r.external_id, r.text, dict(r.metadata), r.memory_size, r.memory_crc32, None, r.score, r.rank
            )
        elif self._current is None:
            raise CorruptPayload("memory chunk before any reference")
        self._buffer += frame.memory_chunk

    def feed_all(self, frames) -> None:
        for frame in frames:
            self.feed(frame)

    def finish(self) -> list[StoredReference]:
        self._close()
        return self.done
