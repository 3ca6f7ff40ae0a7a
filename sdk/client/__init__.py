"""Clients of the memory3 service: :class:`AsyncClient` (asyncio) and :class:`Client` (blocking).

Plain dataclasses in and out, no torch: a user who writes texts and retrieves them loads only
grpc and protobuf. Memories travel as encoded blobs (``memory3.sdk.memory.codec``).
"""

from memory3.core.banks import BankInfo
from memory3.core.episodes import Decision, Episode
from memory3.core.memory_spec import MemorySpec
from memory3.core.metadata import MetadataError
from memory3.core.references import BankStats, Reference, StoredReference, WriteSummary

from .client import AsyncClient, Client
from .conversions import CorruptPayload
from .trajectories import AttachedReward, ChecksumMismatch, EpisodePage, LogSummary, ProxyInfo
from .transport import DEFAULT_CHUNK_BYTES, MAX_MESSAGE_BYTES

__all__ = [
    "AsyncClient", "AttachedReward", "BankInfo", "BankStats", "ChecksumMismatch", "Client", "CorruptPayload",
    "DEFAULT_CHUNK_BYTES", "Decision", "Episode", "EpisodePage", "LogSummary", "MAX_MESSAGE_BYTES", "MemorySpec",
    "MetadataError",
    "ProxyInfo", "Reference", "StoredReference", "WriteSummary",
]
