"""Between wire messages and the service's own types; all request validation of shapes lives here."""

from __future__ import annotations

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from memory3.core.banks import CODEC_ENUMS, METRIC_ENUMS, named
from memory3.core.blob import SCHEMES
from memory3.core.embedder import BUILTIN_DIMENSION, BUILTIN_EMBEDDER, BUILTIN_METRIC
from memory3.core.memory_spec import MemorySpec
from memory3.v1 import banks_pb2

from .bank_store import METRICS, Bank
from .errors import InvalidArgument


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
