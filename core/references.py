"""References as both sides see them: what a client writes, what Retrieve and Fetch return, what a
Write stream did, a bank's size. Plain dataclasses, no protobuf; the service builds the same ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence



@dataclass
class Reference:
    """A reference to write: its text, metadata (a JSON object: strings, numbers, booleans, null,
    lists, objects; see memory3.core.metadata), optional vector (else the bank's built-in embedder
    embeds the text) and optional encoded memory (else it is encoded on first retrieval)."""

    external_id: str
    text: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    embedding: Sequence[float] | None = None
    memory: bytes | None = None


@dataclass
class StoredReference:
    """A reference as Retrieve (with score and rank), Fetch or Scroll returns it."""

    external_id: str
    text: str
    metadata: dict[str, Any]
    memory_size: int
    memory_crc32: int
    memory: bytes | None = None
    score: float = 0.0
    rank: int = 0


@dataclass
class WriteSummary:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    memory_bytes: int = 0
    # Read-your-writes: pass to a read's consistency_token to see this write even on a read replica
    # ("" from a service without replicas). A sum keeps the token of the summary added last.
    consistency_token: str = ""

    def __iadd__(self, other: "WriteSummary") -> "WriteSummary":
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.memory_bytes += other.memory_bytes
        self.consistency_token = other.consistency_token or self.consistency_token
        return self


@dataclass
class BankStats:
    references: int
    with_memory: int
    memory_bytes: int
    text_bytes: int
