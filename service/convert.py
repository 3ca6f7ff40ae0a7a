"""Between wire messages and the service's own types; all request validation of shapes lives here."""

from __future__ import annotations

import json

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from memory3.core.banks import CODEC_ENUMS, METRIC_ENUMS, named
from memory3.core.blob import SCHEMES
from memory3.core.embedder import BUILTIN_DIMENSION, BUILTIN_EMBEDDER, BUILTIN_METRIC
from memory3.core.memory_spec import MemorySpec
from memory3.core.metadata import (
    MAX_CONDITIONS, Condition, MetadataError, check_condition, metadata_from_json, parse_json,
)
from memory3.v1 import banks_pb2, memories_pb2

from .bank_store import METRICS, Bank
from .errors import InvalidArgument, ResourceExhausted


def timestamp(value) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def bank_from_proto(message: banks_pb2.Bank, tenant_id: int) -> Bank:
    """A bank definition from a CreateBank request; INVALID_ARGUMENT says what is wrong."""
    fingerprint = message.model_fingerprint
    if not fingerprint or len(fingerprint) > 128:
        raise InvalidArgument("bank.model_fingerprint is required (at most 128 characters)")
    if not message.HasField("memory_spec"):
        raise InvalidArgument("bank.memory_spec is required")
    ms = message.memory_spec
    embedder = message.embedder
    try:
        codec = named(ms.scheme, ms.codec, CODEC_ENUMS, "memory_spec.scheme / memory_spec.codec")
        metric = named(embedder.distance, embedder.metric, METRIC_ENUMS, "embedder.distance / embedder.metric")
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
    if codec not in SCHEMES:
        raise InvalidArgument(f"memory_spec.codec must be one of {', '.join(SCHEMES)}, got {codec!r}")
    try:
        spec = MemorySpec(
            tuple(ms.memory_layers), ms.kv_heads, ms.head_dim, ms.tokens_per_head or 8,
            ms.reference_length or 128, codec,
        )
    except ValueError as err:
        raise InvalidArgument(f"memory_spec: {err}") from None
    name = embedder.name or BUILTIN_EMBEDDER
    metric = metric or BUILTIN_METRIC
    if metric not in METRICS:
        raise InvalidArgument(f"embedder.metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if name == BUILTIN_EMBEDDER:
        if embedder.dimension not in (0, BUILTIN_DIMENSION):
            raise InvalidArgument(f"{BUILTIN_EMBEDDER} embeds to {BUILTIN_DIMENSION} dimensions, not {embedder.dimension}")
        dimension = BUILTIN_DIMENSION
    else:
        dimension = embedder.dimension
        if not 1 <= dimension <= 16000:
            raise InvalidArgument("embedder.dimension must be between 1 and 16000 for a client-side embedder")
    return Bank(0, tenant_id, message.name, fingerprint, spec, name, dimension, metric, None)


def vector_from_values(values, bank: Bank, what: str) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    if vector.shape != (bank.embedder_dim,):
        raise InvalidArgument(f"{what} has {vector.size} dimensions; bank {bank.name!r} uses {bank.embedder_dim}")
    if not np.isfinite(vector).all():
        raise InvalidArgument(f"{what} contains NaN or infinity")
    if bank.metric == "cosine" and not np.any(vector):
        raise InvalidArgument(f"{what} is all zeros: cosine distance is undefined")
    return vector


# The wire's operators (memories.proto, FilterOp) by number.
FILTER_OPS = {
    memories_pb2.FILTER_OP_EQ: "eq", memories_pb2.FILTER_OP_IN: "in", memories_pb2.FILTER_OP_GT: "gt",
    memories_pb2.FILTER_OP_GTE: "gte", memories_pb2.FILTER_OP_LT: "lt", memories_pb2.FILTER_OP_LTE: "lte",
    memories_pb2.FILTER_OP_EXISTS: "exists",
}


def metadata_from_record(record: memories_pb2.ReferenceRecord, max_bytes: int) -> dict:
    """A written reference's metadata: the string map, or the JSON object of ``metadata_json``."""
    where = f"reference {record.external_id!r}"
    if not record.metadata_json:
        if len(json.dumps(dict(record.metadata))) > max_bytes:
            raise ResourceExhausted(f"{where}: metadata exceeds {max_bytes} bytes")
        if any("\x00" in s for s in (*record.metadata.keys(), *record.metadata.values())):
            raise InvalidArgument(f"{where}: metadata may not contain NUL")
        return dict(record.metadata)
    if record.metadata:
        raise InvalidArgument(f"{where}: set metadata (string values) or metadata_json, not both")
    if len(record.metadata_json.encode()) > max_bytes:
        raise ResourceExhausted(f"{where}: metadata_json exceeds {max_bytes} bytes")
    try:
        return metadata_from_json(record.metadata_json, f"{where}: metadata_json")
    except MetadataError as err:
        raise InvalidArgument(str(err)) from None


def conditions_from_proto(field: str, where: memories_pb2.MetadataFilter, max_bytes: int,
                          equal: dict[str, str] | None = None) -> list[Condition]:
    """The conditions of a request: each entry of the old string map ``equal`` is an eq condition,
    then those of ``where`` (named ``field`` in errors); INVALID_ARGUMENT naming the bad one."""
    conditions = []
    try:
        for key, value in (equal or {}).items():
            if len(key.encode()) > max_bytes or len(value.encode()) > max_bytes:
                raise MetadataError(f"filter: keys and values may each be at most {max_bytes} bytes")
            conditions.append(check_condition(key, "eq", value, f"filter[{key[:40]!r}]"))
        if len(where.conditions) > MAX_CONDITIONS:
            raise MetadataError(f"{field}.conditions has {len(where.conditions)} conditions; at most {MAX_CONDITIONS}")
        for index, condition in enumerate(where.conditions):
            named = f"{field}.conditions[{index}]"
            op = FILTER_OPS.get(condition.op)
            if op is None:
                raise MetadataError(f"{named}.op must be one of {', '.join(memories_pb2.FilterOp.keys()[1:])}")
            if len(condition.key.encode()) > max_bytes or len(condition.value_json.encode()) > max_bytes:
                raise MetadataError(f"{named}: key and value_json may each be at most {max_bytes} bytes")
            if not condition.value_json:
                raise MetadataError(f"{named}.value_json is required (the operand as JSON, e.g. 2020 or \"en\")")
            value = parse_json(condition.value_json, f"{named}.value_json")
            conditions.append(check_condition(condition.key, op, value, named))
    except MetadataError as err:
        raise InvalidArgument(str(err)) from None
    return conditions
