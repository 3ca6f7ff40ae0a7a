"""The memory codec: one explicit memory <-> a versioned, self-describing, checksummed blob.

Why a format of our own: a memory is written once, read many times by other processes (and by
the service, which must validate it without a model), and belongs to one model fingerprint and
one bank shape. The blob therefore names everything needed to decode or reject it, and nothing
is decoded before the checksum over the whole blob has been verified.

Layout (little-endian), format version 1::

    offset size field
    0      4    magic b"M3KV"
    4      2    format version (1)
    6      1    scheme id: 0 fp16, 1 int8, 2 int4, 3 pq
    7      1    flags: bit0 body is zstd-compressed, bit1 positions are uint16 (else uint8)
    8      8    shape: layers, kv heads, tokens per head, head dim (uint16 each)
    16     4    PQ codebook version (0 unless scheme is pq)
    20     4    payload size: bytes of the body as stored
    24     4    raw size: bytes of the body after decompression
    28     1    fingerprint length F
    29     1    scheme parameter length P
    30     F    model fingerprint (ASCII hex)
    30+F   P    scheme parameters (pq: bytes per vector u8, 8-byte codebook digest)
    ...    S    body
    end-4  4    CRC32 (zlib) of everything before it

Body (before compression): positions (layers, kv heads, tokens) as uint8/uint16, then

* ``fp16``: kv as float16 (layers, 2, heads, tokens, head dim);
* ``int8``: per-vector scales as float16 (layers, 2, heads, tokens), then kv as int8 with
  ``x ~= q * scale``, ``scale = absmax / 127`` (symmetric, per head-dim vector);
* ``int4``: same with ``scale = absmax / 7`` and two 4-bit values ``q + 8`` per byte
  (even index in the low nibble; head dim padded to even), decoded by the compiled
  :mod:`~memory3.sdk.dequantize`;
* ``pq``: one byte per subvector, or per stage of a residual codebook, (layers, 2, heads, tokens,
  M) from a bank's :class:`~memory3.sdk.pq.PQCodebook`; the memory names the codebook version and
  digest it needs.

The body is zstd-compressed when that makes it smaller (always tried); decompression is bounded
by the raw size in the header, which itself must equal the size the shape implies.

Error bounds (what tests/test_codec.py asserts on structured KV-like data: low-rank, heavy-tailed,
outlier channels on keys, RoPE; attention logits with standard deviation 2): per-vector cosine
of K and of V, min / mean, and relative error of softmax(qK^T/sqrt d)V, max / mean:

* fp16 >= 0.9999 / 0.99999, error <= 0.002 / 0.001
* int8 >= 0.999 / 0.9999, error <= 0.03 / 0.015
* int4 >= 0.95 / 0.98, error <= 0.3 / 0.15
* pq (8 bytes per 32-d vector, held-out memories) >= 0.8 / 0.95, error <= 0.4 / 0.2
"""

from __future__ import annotations

import math
import struct
import threading
import warnings
import zlib
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import zstandard

from .dequantize import dequantize_int4
from .memory import ExplicitMemory
from .memory_spec import MemorySpec
from .pq import CodebookError, PQCodebook

MAGIC = b"M3KV"
FORMAT_VERSION = 1
SCHEMES = ("fp16", "int8", "int4", "pq")
ZSTD_LEVEL = 3

FLAG_ZSTD = 0x01
FLAG_POS16 = 0x02
_KNOWN_FLAGS = FLAG_ZSTD | FLAG_POS16

_FIXED = struct.Struct("<4sHBBHHHHIIIBB")
_CRC = struct.Struct("<I")
_PQ_PARAMS = struct.Struct("<B8s")
MIN_SIZE = _FIXED.size + _CRC.size

_zstd_contexts = threading.local()
"""One zstd compressor and decompressor per thread: a zstd context must not be used by two threads
at once (sharing one corrupted memories decoded on the supply's worker thread while another
thread encoded or decoded)."""


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    contexts = getattr(_zstd_contexts, "pair", None)
    if contexts is None:
        contexts = _zstd_contexts.pair = (zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor())
    return contexts


def payload_checksum(payload: bytes) -> int:
    """The blob's own checksum: CRC32 of everything before its 4-byte trailer (which stores it).

    Transfer checks use this rather than a CRC32 of the whole blob: a CRC over data followed by
    its own CRC is the same constant for every well-formed blob, so it cannot tell blobs apart.
    """
    return zlib.crc32(memoryview(payload)[: len(payload) - _CRC.size]) if len(payload) >= MIN_SIZE else 0


def trailer_checksum(payload: bytes) -> int | None:
    """The checksum stored in the blob's trailer (None when it is too short to have one)."""
    return _CRC.unpack_from(payload, len(payload) - _CRC.size)[0] if len(payload) >= MIN_SIZE else None


class CodecError(ValueError):
    """A memory blob is corrupt, truncated, or does not match what it is used with."""


@dataclass(frozen=True)
class MemoryHeader:
    """What a blob says about itself; everything here has been verified against the checksum."""

    version: int
    scheme: str
    fingerprint: str
    shape: tuple[int, int, int, int]  # (layers, kv heads, tokens per head, head dim)
    codebook_version: int
    payload_size: int
    checksum: int
    flags: int = 0
    raw_size: int = 0
    pq_bytes_per_vector: int = 0
    codebook_digest: bytes = b""
    body_offset: int = 0

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_ZSTD)

    @property
    def kv_shape(self) -> tuple[int, int, int, int, int]:
        layers, heads, tokens, dim = self.shape
        return (layers, 2, heads, tokens, dim)


def _short(fp: str) -> str:
    return fp if len(fp) <= 12 else fp[:12] + "…"


def _raw_size(scheme: str, shape: tuple[int, int, int, int], pos_bytes: int, pq_m: int) -> int:
    layers, heads, tokens, dim = shape
    vectors = layers * 2 * heads * tokens
    size = layers * heads * tokens * pos_bytes
    if scheme == "fp16":
        return size + vectors * dim * 2
    if scheme == "int8":
        return size + vectors * (2 + dim)
    if scheme == "int4":
        return size + vectors * (2 + (dim + 1) // 2)
    return size + vectors * pq_m


# ---- header ------------------------------------------------------------------------------------


def read_header(payload: bytes) -> MemoryHeader:
    """Parse and verify a blob's header: magic, format version, lengths, scheme, checksum.

    Cheap (no decompression, no torch): the service calls it on every Write.
    """
    buf = memoryview(payload)
    n = len(buf)
    if n < MIN_SIZE:
        raise CodecError(f"truncated: {n} bytes is shorter than the {MIN_SIZE}-byte minimum of a memory")
    (magic, version, scheme_id, flags, layers, heads, tokens, dim, cb_version, size, raw_size, fp_len, p_len) = (
        _FIXED.unpack_from(buf)
    )
    if magic != MAGIC:
        raise CodecError(f"not a memory3 memory: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported memory format version {version} (this build reads {FORMAT_VERSION})")
    expected = _FIXED.size + fp_len + p_len + size + _CRC.size
    if n < expected:
        raise CodecError(f"truncated: header says {size} payload bytes, got {max(0, n - expected + size)}")
    if n > expected:
        raise CodecError(f"{n - expected} trailing bytes after the checksum (header says {size} payload bytes)")
    (stored,) = _CRC.unpack_from(buf, n - _CRC.size)
    computed = zlib.crc32(buf[: n - _CRC.size])
    if stored != computed:
        raise CodecError(f"checksum mismatch: stored 0x{stored:08x} computed 0x{computed:08x}")
    # From here on the bytes are what the writer wrote; remaining checks catch writer bugs.
    if scheme_id >= len(SCHEMES):
        raise CodecError(f"unknown scheme id {scheme_id}; known: {SCHEMES}")
    scheme = SCHEMES[scheme_id]
    if flags & ~_KNOWN_FLAGS:
        raise CodecError(f"unknown flags 0x{flags:02x}")
    shape = (layers, heads, tokens, dim)
    if min(shape) == 0:
        raise CodecError(f"empty shape {shape}")
    off = _FIXED.size
    try:
        fingerprint = bytes(buf[off : off + fp_len]).decode("ascii")
    except UnicodeDecodeError:
        raise CodecError("fingerprint is not ASCII") from None
    off += fp_len
    params = bytes(buf[off : off + p_len])
    off += p_len
    pq_m, digest = 0, b""
    if scheme == "pq":
        if p_len != _PQ_PARAMS.size:
            raise CodecError(f"pq parameters are {p_len} bytes, expected {_PQ_PARAMS.size}")
        pq_m, digest = _PQ_PARAMS.unpack(params)
        if not 1 <= pq_m <= dim:
            raise CodecError(f"pq bytes per vector {pq_m} outside [1, head dim {dim}]")
        if cb_version == 0:
            raise CodecError("pq memory names no codebook version")
    elif p_len or cb_version:
        raise CodecError(f"scheme {scheme} takes no parameters or codebook")
    want_raw = _raw_size(scheme, shape, 2 if flags & FLAG_POS16 else 1, pq_m)
    if raw_size != want_raw:
        raise CodecError(f"raw size {raw_size} does not match {want_raw} implied by {scheme} shape {shape}")
    if not flags & FLAG_ZSTD and size != raw_size:
        raise CodecError(f"uncompressed body is {size} bytes, shape implies {raw_size}")
    return MemoryHeader(
        FORMAT_VERSION, scheme, fingerprint, shape, cb_version, size, stored, flags, raw_size, pq_m, digest, off
    )


def validate_payload(
    payload: bytes,
    spec: MemorySpec,
    fingerprint: str | None = None,
    *,
    codebook_version: int | None = None,
) -> MemoryHeader:
    """Header + checksum + shape against a bank's spec (+ model fingerprint, + codebook version).

    What the service runs on Write; no decompression and no tensors.
    """
    header = read_header(payload)
    want = (len(spec.memory_layers), spec.kv_heads, spec.tokens_per_head, spec.head_dim)
    if header.shape != want:
        raise CodecError(f"shape {_fmt(header.shape)} does not match bank spec {_fmt(want)}")
    if fingerprint is not None and header.fingerprint != fingerprint:
        raise CodecError(
            f"memory was computed by model {_short(header.fingerprint)}, running model is {_short(fingerprint)}"
        )
    if codebook_version is not None and header.scheme == "pq" and header.codebook_version != codebook_version:
        raise CodecError(f"pq memory needs codebook version {header.codebook_version}, got {codebook_version}")
    return header


def _fmt(shape) -> str:
    return "(" + ",".join(str(s) for s in shape) + ")"


# ---- encode ------------------------------------------------------------------------------------


def encode_memory(memory: ExplicitMemory, scheme: str = "int8", codebook: PQCodebook | None = None) -> bytes:
    """Serialize one memory with ``scheme`` (one of :data:`SCHEMES`); ``pq`` needs a codebook."""
    if scheme not in SCHEMES:
        raise CodecError(f"unknown scheme {scheme!r}; known: {SCHEMES}")
    kv = memory.kv.detach()
    layers, _, heads, tokens, dim = kv.shape
    shape = (layers, heads, tokens, dim)
    if max(shape) > 0xFFFF:
        raise CodecError(f"shape {shape} does not fit the format (max 65535 per dimension)")
    fp = memory.fingerprint.encode("ascii")
    if len(fp) > 255:
        raise CodecError("fingerprint longer than 255 bytes")
    positions = memory.positions.detach().cpu()
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) > 0xFFFF):
        raise CodecError("positions must lie in [0, 65535]")
    pos16 = positions.numel() > 0 and int(positions.max()) > 0xFF
    pos = positions.numpy().astype("<u2" if pos16 else "u1").tobytes()
    x = kv.to("cpu", torch.float32).numpy()
    if not np.isfinite(x).all():
        raise CodecError("memory contains NaN or Inf")
    params, cb_version = b"", 0
    if scheme == "fp16":
        if np.abs(x).max(initial=0) > 65504:
            raise CodecError("values exceed the float16 range; use int8/int4")
        data = x.astype("<f2").tobytes()
    elif scheme in ("int8", "int4"):
        data = _quantize(x, 127 if scheme == "int8" else 7, scheme == "int4")
    else:
        if codebook is None:
            raise CodecError("pq scheme needs a codebook (train one with memory3.sdk.pq.train_codebook)")
        if codebook.fingerprint != memory.fingerprint:
            raise CodecError(
                f"codebook v{codebook.version} was trained for model {_short(codebook.fingerprint)}, "
                f"memory was computed by model {_short(memory.fingerprint)}"
            )
        try:
            data = codebook.encode(kv, positions).tobytes()
        except CodebookError as exc:
            raise CodecError(str(exc)) from None
        params = _PQ_PARAMS.pack(codebook.bytes_per_vector, codebook.digest)
        cb_version = codebook.version
    raw = pos + data
    body, flags = raw, FLAG_POS16 if pos16 else 0
    packed = _zstd()[0].compress(raw)
    if len(packed) < len(raw):
        body, flags = packed, flags | FLAG_ZSTD
    scheme_id = SCHEMES.index(scheme)
    head = _FIXED.pack(
        MAGIC, FORMAT_VERSION, scheme_id, flags, *shape, cb_version, len(body), len(raw), len(fp), len(params)
    )
    out = b"".join((head, fp, params, body))
    return out + _CRC.pack(zlib.crc32(out))


def _quantize(x: np.ndarray, qmax: int, pack4: bool) -> bytes:
    """Symmetric per-vector quantization: float16 scale = absmax / qmax, then int8 or packed int4."""
    absmax = np.abs(x).max(axis=-1)
    scale = (absmax / qmax).astype(np.float16)
    if np.isinf(scale).any():
        raise CodecError("a vector's scale exceeds the float16 range")
    s = scale.astype(np.float32)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)
    q = np.clip(np.rint(x * inv[..., None]), -qmax, qmax).astype(np.int8)
    if not pack4:
        return scale.astype("<f2").tobytes() + q.tobytes()
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.int8)], axis=-1)
    u = (q + 8).astype(np.uint8)
    packed = u[..., 0::2] | (u[..., 1::2] << 4)
    return scale.astype("<f2").tobytes() + packed.tobytes()


# ---- decode ------------------------------------------------------------------------------------


def decode_memory(
    payload: bytes, *, dtype=torch.float32, device="cpu", codebook: PQCodebook | None = None
) -> ExplicitMemory:
    """Verify and decode a blob into tensors ready for attention (``dtype`` on ``device``)."""
    header = read_header(payload)
    body = memoryview(payload)[header.body_offset : header.body_offset + header.payload_size]
    if header.compressed:
        try:
            raw = _zstd()[1].decompress(body, max_output_size=header.raw_size)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd body does not decompress: {exc}") from None
        if len(raw) != header.raw_size:
            raise CodecError(f"body decompresses to {len(raw)} bytes, header says {header.raw_size}")
    else:
        raw = bytes(body)
    layers, heads, tokens, dim = header.shape
    kv_shape = header.kv_shape
    vectors = layers * 2 * heads * tokens
    n_pos = layers * heads * tokens
    pos_dtype = "<u2" if header.flags & FLAG_POS16 else np.uint8
    positions = torch.from_numpy(np.frombuffer(raw, pos_dtype, n_pos).astype(np.int64).reshape(layers, heads, tokens))
    off = n_pos * np.dtype(pos_dtype).itemsize
    if header.scheme == "int4":
        kv = _dequantize_int4_body(raw, off, kv_shape)
    else:
        with warnings.catch_warnings():  # read-only views of `raw`; every tensor returned is a fresh copy
            warnings.simplefilter("ignore", UserWarning)
            view = partial(torch.frombuffer, raw)
            if header.scheme == "fp16":
                kv = view(dtype=torch.float16, count=vectors * dim, offset=off).reshape(kv_shape).float()
                _require_finite(kv, "value in fp16 body")
            elif header.scheme == "int8":
                scale = view(dtype=torch.float16, count=vectors, offset=off).float().reshape(kv_shape[:-1] + (1,))
                _require_finite(scale, "scale in body")
                kv = view(dtype=torch.int8, count=vectors * dim, offset=off + vectors * 2).reshape(kv_shape) * scale
            else:
                _check_codebook(header, codebook)
                m = header.pq_bytes_per_vector
                codes = view(dtype=torch.uint8, count=vectors * m, offset=off).reshape(kv_shape[:-1] + (m,))
                try:
                    kv = codebook.decode(codes, positions)
                except CodebookError as exc:
                    raise CodecError(str(exc)) from None
    return ExplicitMemory(kv.to(device=device, dtype=dtype), positions.to(device), header.fingerprint)


def _dequantize_int4_body(raw: bytes, offset: int, kv_shape) -> torch.Tensor:
    """Per-vector float16 scales, then packed nibbles -> float32 kv (one compiled pass, see dequantize)."""
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
