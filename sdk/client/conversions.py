"""SDK types to and from wire messages: Write streams out, memory frames back in, metadata and
filters both ways (bank definitions: memory3.core.banks)."""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator, Mapping

from memory3.core.blob import payload_checksum, trailer_checksum
from memory3.core.metadata import Condition, conditions_from_filter, metadata_to_json
from memory3.core.references import Reference, StoredReference
from memory3.sdk.client.transport import DEFAULT_CHUNK_BYTES
from memory3.v1 import memories_pb2


class CorruptPayload(Exception):
    """A memory arrived with a checksum that does not match what the service stored."""


FILTER_OPS = {
    "eq": memories_pb2.FILTER_OP_EQ, "in": memories_pb2.FILTER_OP_IN, "gt": memories_pb2.FILTER_OP_GT,
    "gte": memories_pb2.FILTER_OP_GTE, "lt": memories_pb2.FILTER_OP_LT, "lte": memories_pb2.FILTER_OP_LTE,
    "exists": memories_pb2.FILTER_OP_EXISTS,
}


def metadata_fields(metadata: Mapping[str, Any]) -> dict:
    """A reference's metadata as ReferenceRecord fields: string values travel in the old map (so
    servers before metadata_json read them too), anything else as metadata_json."""
    if all(isinstance(value, str) for value in metadata.values()):
        return {"metadata": dict(metadata)}
    return {"metadata_json": metadata_to_json(metadata)}


def metadata_of(reference: memories_pb2.StoredReference) -> dict[str, Any]:
    """The whole metadata of a stored reference (the string map from servers before metadata_json)."""
    return json.loads(reference.metadata_json) if reference.metadata_json else dict(reference.metadata)


def filter_to_proto(conditions: list[Condition]) -> memories_pb2.MetadataFilter:
    """Conditions (memory3.core.metadata) as the wire's MetadataFilter."""
    return memories_pb2.MetadataFilter(conditions=[
        memories_pb2.MetadataCondition(
            key=c.key, op=FILTER_OPS[c.op], value_json=json.dumps(list(c.value) if c.op == "in" else c.value))
        for c in conditions
    ])


def retrieve_filter(spec: Mapping[str, Any] | None) -> tuple[dict[str, str], memories_pb2.MetadataFilter | None]:
    """A filter in the JSON syntax (memory3.core.metadata) as RetrieveRequest fields: plain string
    equalities in the old ``filter`` map (which servers before ``where`` read too), the rest as
    ``where``; MetadataError (a ValueError) for a condition that breaks the rules."""
    if spec is not None and not isinstance(spec, Mapping):
        conditions_from_filter(spec)  # raises, saying what a filter looks like
    spec = dict(spec or {})
    equal = {key: test for key, test in spec.items() if isinstance(test, str)}
    rest = conditions_from_filter({key: test for key, test in spec.items() if key not in equal})
    return equal, filter_to_proto(rest) if rest else None


def write_requests(
    bank: str, references: Iterable[Reference], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[memories_pb2.WriteRequest]:
    """The messages of one Write stream: each reference, then its memory in chunks."""
    first = True
    for ref in references:
        memory = ref.memory or b""
        record = memories_pb2.ReferenceRecord(
            external_id=ref.external_id, text=ref.text, **metadata_fields(ref.metadata),
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
                r.external_id, r.text, metadata_of(r), r.memory_size, r.memory_crc32, None, r.score, r.rank
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
