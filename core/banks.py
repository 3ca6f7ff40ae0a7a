"""A bank's definition and its wire form, the one mapping both sides use.

A bank is one model's memories: its fingerprint, memory spec and the embedder that places its
references in a vector space. The service validates a definition it receives (service/convert.py)
and stores it; clients build and read them; both convert with :func:`bank_to_proto` and
:func:`bank_from_proto` here, so a field added to the contract is added in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from memory3.v1 import banks_pb2

from .embedder import BUILTIN_DIMENSION, BUILTIN_EMBEDDER, BUILTIN_METRIC
from .memory_spec import MemorySpec


@dataclass(frozen=True)
class BankInfo:
    name: str
    model_fingerprint: str
    spec: MemorySpec
    embedder_name: str = BUILTIN_EMBEDDER
    embedder_dim: int = BUILTIN_DIMENSION
    metric: str = BUILTIN_METRIC
    created_at: datetime | None = None


CODEC_ENUMS = {"fp16": banks_pb2.CODEC_FP16, "int8": banks_pb2.CODEC_INT8, "int4": banks_pb2.CODEC_INT4,
          "pq": banks_pb2.CODEC_PQ}
METRIC_ENUMS = {"cosine": banks_pb2.METRIC_COSINE, "l2": banks_pb2.METRIC_L2, "ip": banks_pb2.METRIC_IP}


def named(enum_value: int, text: str, names: dict[str, int], what: str) -> str:
    """The name an enum field and its older string field give together ("" when neither is set).
    ValueError when they disagree or the enum value is unknown."""
    if not enum_value:
        return text
    by_value = {v: k for k, v in names.items()}
    if enum_value not in by_value:
        raise ValueError(f"{what}: unknown enum value {enum_value}")
    if text and text != by_value[enum_value]:
        raise ValueError(f"{what}: the enum says {by_value[enum_value]!r}, the string {text!r}")
    return by_value[enum_value]


def memory_spec_to_proto(spec: MemorySpec) -> banks_pb2.MemorySpec:
    return banks_pb2.MemorySpec(
        memory_layers=list(spec.memory_layers), kv_heads=spec.kv_heads, head_dim=spec.head_dim,
        tokens_per_head=spec.tokens_per_head, reference_length=spec.reference_length, codec=spec.codec,
        scheme=CODEC_ENUMS.get(spec.codec, banks_pb2.CODEC_UNSPECIFIED),
    )


def bank_to_proto(bank: BankInfo) -> banks_pb2.Bank:
    """A bank definition on the wire."""
    message = banks_pb2.Bank(
        name=bank.name,
        model_fingerprint=bank.model_fingerprint,
        memory_spec=memory_spec_to_proto(bank.spec),
        embedder=banks_pb2.EmbedderSpec(name=bank.embedder_name, dimension=bank.embedder_dim, metric=bank.metric,
                                        distance=METRIC_ENUMS.get(bank.metric, banks_pb2.METRIC_UNSPECIFIED)),
    )
    if bank.created_at is not None:
        message.created_at.FromDatetime(bank.created_at)
    return message


def bank_from_proto(message: banks_pb2.Bank) -> BankInfo:
    """A bank definition as the service returns it (complete: no defaults to fill in)."""
    ms = message.memory_spec
    return BankInfo(
        name=message.name,
        model_fingerprint=message.model_fingerprint,
        spec=MemorySpec(tuple(ms.memory_layers), ms.kv_heads, ms.head_dim, ms.tokens_per_head, ms.reference_length,
                        named(ms.scheme, ms.codec, CODEC_ENUMS, "memory_spec")),
        embedder_name=message.embedder.name,
        embedder_dim=message.embedder.dimension,
        metric=named(message.embedder.distance, message.embedder.metric, METRIC_ENUMS, "embedder"),
        created_at=message.created_at.ToDatetime() if message.HasField("created_at") else None,
    )
