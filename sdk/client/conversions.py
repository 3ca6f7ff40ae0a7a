"""SDK types to and from wire messages: Write streams out, memory frames back in (bank definitions: memory3.core.banks)."""

from __future__ import annotations

from typing import Iterable, Iterator

from memory3.core.blob import payload_checksum, trailer_checksum
from memory3.core.references import Reference, StoredReference
from memory3.sdk.client.transport import DEFAULT_CHUNK_BYTES
from memory3.v1 import memories_pb2


class CorruptPayload(Exception):
    """A memory arrived with a checksum that does not match what the service stored."""


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
