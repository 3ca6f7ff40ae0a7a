"""Packing repeated protobuf messages into stream messages below the gRPC message limit."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


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
