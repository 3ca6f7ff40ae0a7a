"""Grouping items by size: protobuf messages into stream messages below the gRPC message limit,
and rows into reads of a bounded number of bytes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator


def size_batches(messages: Iterable, max_bytes: int, overhead: int = 0,
                 size_of: Callable[[object], int] | None = None) -> Iterator[list]:
    """Group items into lists of at most about ``max_bytes`` (each counted as ``size_of(item)``,
    by default a protobuf message's ``ByteSize()``, plus ``overhead``; one oversized item still
    forms a list of its own): how both sides pack repeated fields into stream messages below the
    gRPC message limit, and how the service reads rows a bounded group at a time."""
    batch, size = [], 0
    for message in messages:
        n = (message.ByteSize() if size_of is None else size_of(message)) + overhead
        if batch and size + n > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(message)
        size += n
    if batch:
        yield batch
