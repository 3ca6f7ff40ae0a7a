"""The memory codec: one explicit memory <-> a versioned, self-describing, checksummed blob.

The blob format (header, CRC, scheme table, validation) is :mod:`memory3.core.blob`, shared with
the service; this module turns tensors into bodies and back. Each scheme is a :class:`SchemeCodec`
in a registry (:func:`register_scheme`): ``fp16``, ``int8`` and ``int4`` (symmetric per-vector
scales, int4 unpacked by the compiled :mod:`~memory3.sdk.memory.dequantize`) and ``pq`` (codes of a
bank's :class:`~memory3.sdk.memory.pq.PQCodebook`, named by version and digest in the blob).
Error bounds per scheme are asserted by tests/test_codec.py; figures: docs/experiments.md.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from memory3.core.blob import (
    PQ_PARAMS,
    SCHEME_FORMATS,
    CodecError,
    MemoryHeader,
    body_bytes,
    pack_blob,
    read_header,
    short_fingerprint,
)

from .pq import CodebookError, PQCodebook
from .tensors import ExplicitMemory


@dataclass
class Encoded:
    """A scheme's body for one memory (after the positions), its parameters and codebook version."""

    data: bytes
    params: bytes = b""
    codebook_version: int = 0


class SchemeCodec:
    """One scheme's tensors <-> body bytes; the format side lives in :data:`SCHEME_FORMATS`."""

    def encode(self, x: np.ndarray, kv: torch.Tensor, positions: torch.Tensor, memory: ExplicitMemory,
               codebook: PQCodebook | None) -> Encoded:
        raise NotImplementedError

    def decode(self, raw: bytes, offset: int, header: MemoryHeader, positions: torch.Tensor,
               codebook: PQCodebook | None) -> torch.Tensor:
        raise NotImplementedError


class Float16Codec(SchemeCodec):
    def encode(self, x, kv, positions, memory, codebook):
        if np.abs(x).max(initial=0) > 65504:
            raise CodecError("values exceed the float16 range; use int8/int4")
        return Encoded(x.astype("<f2").tobytes())

    def decode(self, raw, offset, header, positions, codebook):
        count = math.prod(header.kv_shape)
        kv = _view(raw, torch.float16, count, offset).reshape(header.kv_shape).float()
        _require_finite(kv, "value in fp16 body")
        return kv


class QuantizedCodec(SchemeCodec):
    """Symmetric per-vector quantization: float16 scale = absmax / qmax, then int8 or packed int4
    (two values ``q + 8`` per byte, even index in the low nibble, head dim padded to even)."""

    def __init__(self, qmax: int, pack4: bool) -> None:
        self.qmax, self.pack4 = qmax, pack4

    def encode(self, x, kv, positions, memory, codebook):
        absmax = np.abs(x).max(axis=-1)
        scale = (absmax / self.qmax).astype(np.float16)
        if np.isinf(scale).any():
            raise CodecError("a vector's scale exceeds the float16 range")
        s = scale.astype(np.float32)
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
        q = np.clip(np.rint(x * inv[..., None]), -self.qmax, self.qmax).astype(np.int8)
        if not self.pack4:
            return Encoded(scale.astype("<f2").tobytes() + q.tobytes())
        if q.shape[-1] % 2:
            q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.int8)], axis=-1)
        u = (q + 8).astype(np.uint8)
        return Encoded(scale.astype("<f2").tobytes() + (u[..., 0::2] | (u[..., 1::2] << 4)).tobytes())

    def decode(self, raw, offset, header, positions, codebook):
        kv_shape = header.kv_shape
        vectors = math.prod(kv_shape[:-1])
        if self.pack4:
            return _dequantize_int4_body(raw, offset, kv_shape)
        scale = _view(raw, torch.float16, vectors, offset).float().reshape(kv_shape[:-1] + (1,))
        _require_finite(scale, "scale in body")
        return _view(raw, torch.int8, vectors * kv_shape[-1], offset + vectors * 2).reshape(kv_shape) * scale


class ProductQuantizedCodec(SchemeCodec):
    def encode(self, x, kv, positions, memory, codebook):
        if codebook is None:
            raise CodecError("pq scheme needs a codebook (train one with memory3.sdk.memory.pq.train_codebook)")
        if codebook.fingerprint != memory.fingerprint:
            raise CodecError(
                f"codebook v{codebook.version} was trained for model {short_fingerprint(codebook.fingerprint)}, "
                f"memory was computed by model {short_fingerprint(memory.fingerprint)}"
            )
        try:
            data = codebook.encode(kv, positions).tobytes()
        except CodebookError as exc:
            raise CodecError(str(exc)) from None
        return Encoded(data, PQ_PARAMS.pack(codebook.bytes_per_vector, codebook.digest), codebook.version)

    def decode(self, raw, offset, header, positions, codebook):
        _check_codebook(header, codebook)
        m = header.pq_bytes_per_vector
        codes = _view(raw, torch.uint8, math.prod(header.kv_shape[:-1]) * m, offset).reshape(header.kv_shape[:-1] + (m,))
        try:
            return codebook.decode(codes, positions)
        except CodebookError as exc:
            raise CodecError(str(exc)) from None


SCHEME_CODECS: dict[str, SchemeCodec] = {}


def register_scheme(name: str, codec: SchemeCodec) -> None:
    """Attach tensor code to a scheme the blob format knows (:data:`memory3.core.blob.SCHEME_FORMATS`)."""
    if name not in SCHEME_FORMATS:
        raise ValueError(f"the blob format has no scheme {name!r}; known: {tuple(SCHEME_FORMATS)}")
    SCHEME_CODECS[name] = codec


register_scheme("fp16", Float16Codec())
register_scheme("int8", QuantizedCodec(127, pack4=False))
register_scheme("int4", QuantizedCodec(7, pack4=True))
register_scheme("pq", ProductQuantizedCodec())


def encode_memory(memory: ExplicitMemory, scheme: str = "int8", codebook: PQCodebook | None = None) -> bytes:
    """Serialize one memory with ``scheme`` (one of :data:`~memory3.core.blob.SCHEMES`); ``pq`` needs a codebook."""
    if scheme not in SCHEME_CODECS:
        raise CodecError(f"unknown scheme {scheme!r}; known: {tuple(SCHEME_CODECS)}")
    kv = memory.kv.detach()
    layers, _, heads, tokens, dim = kv.shape
    shape = (layers, heads, tokens, dim)
    if max(shape) > 0xFFFF:
        raise CodecError(f"shape {shape} does not fit the format (max 65535 per dimension)")
    if len(memory.fingerprint.encode("ascii")) > 255:
        raise CodecError("fingerprint longer than 255 bytes")
    positions = memory.positions.detach().cpu()
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) > 0xFFFF):
        raise CodecError("positions must lie in [0, 65535]")
    pos16 = positions.numel() > 0 and int(positions.max()) > 0xFF
    pos = positions.numpy().astype("<u2" if pos16 else "u1").tobytes()
    x = kv.to("cpu", torch.float32).numpy()
    if not np.isfinite(x).all():
        raise CodecError("memory contains NaN or Inf")
    encoded = SCHEME_CODECS[scheme].encode(x, kv, positions, memory, codebook)
    return pack_blob(scheme, shape, memory.fingerprint, pos + encoded.data, pos16=pos16, params=encoded.params,
                     codebook_version=encoded.codebook_version)


def decode_memory(
    payload: bytes, *, dtype=torch.float32, device="cpu", codebook: PQCodebook | None = None
) -> ExplicitMemory:
    """Verify and decode a blob into tensors ready for attention (``dtype`` on ``device``)."""
    header = read_header(payload)
    raw = body_bytes(payload, header)
    layers, heads, tokens, _ = header.shape
    n_pos = layers * heads * tokens
    pos_dtype = "<u2" if header.position_bytes == 2 else np.uint8
    positions = torch.from_numpy(np.frombuffer(raw, pos_dtype, n_pos).astype(np.int64).reshape(layers, heads, tokens))
    kv = SCHEME_CODECS[header.scheme].decode(raw, n_pos * header.position_bytes, header, positions, codebook)
    return ExplicitMemory(kv.to(device=device, dtype=dtype), positions.to(device), header.fingerprint)


def _view(raw: bytes, dtype: torch.dtype, count: int, offset: int) -> torch.Tensor:
    """A read-only view of ``raw``; every tensor returned by a decoder is a fresh copy of it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return partial(torch.frombuffer, raw)(dtype=dtype, count=count, offset=offset)


def _dequantize_int4_body(raw: bytes, offset: int, kv_shape) -> torch.Tensor:
    """Per-vector float16 scales, then packed nibbles -> float32 kv (one compiled pass, see dequantize)."""
    from .dequantize import (
        dequantize_int4,  # numba compiles on first import: only int4 readers pay it
    )

    dim = kv_shape[-1]
    half = (dim + 1) // 2
    vectors = math.prod(kv_shape[:-1])
    scales = np.frombuffer(raw, "<f2", vectors, offset).astype(np.float32)
    packed = np.frombuffer(raw, np.uint8, vectors * half, offset + 2 * vectors).reshape(vectors, half)
    kv = torch.empty(kv_shape[:-1] + (2 * half,))
    if not dequantize_int4(packed, scales, kv.numpy().reshape(vectors, 2 * half)):
        raise CodecError("non-finite scale in body")
    return kv if dim == 2 * half else kv[..., :dim].contiguous()


def _require_finite(x: torch.Tensor, what: str) -> None:
    """One cheap reduction instead of isfinite().all(): any NaN/Inf makes the float64 sum non-finite
    (fp16-range values cannot overflow it)."""
    if not math.isfinite(float(x.sum(dtype=torch.float64))):
        raise CodecError(f"non-finite {what}")


def _check_codebook(header: MemoryHeader, codebook: PQCodebook | None) -> None:
    if codebook is None:
        raise CodecError(f"pq memory needs codebook version {header.codebook_version}, got none")
    if codebook.version != header.codebook_version:
        raise CodecError(f"pq memory needs codebook version {header.codebook_version}, got {codebook.version}")
    if codebook.digest != header.codebook_digest:
        raise CodecError(
            f"pq memory needs codebook version {header.codebook_version} with digest "
            f"{header.codebook_digest.hex()}, got one with digest {codebook.digest.hex()}"
        )
    if codebook.bytes_per_vector != header.pq_bytes_per_vector:
        raise CodecError(
            f"pq memory has {header.pq_bytes_per_vector} bytes per vector, codebook has {codebook.bytes_per_vector}"
        )
    layers, heads, _, dim = header.shape
    if (codebook.layers, codebook.kv_heads, codebook.head_dim) != (layers, heads, dim):
        raise CodecError(
            f"codebook v{codebook.version} is for (layers, kv heads, head dim) "
            f"{(codebook.layers, codebook.kv_heads, codebook.head_dim)}, memory has {(layers, heads, dim)}"
        )
