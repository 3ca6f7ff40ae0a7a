"""The memory blob format: header, checksum, scheme table and validation, without tensors.

A memory is written once and read many times by other processes, and the service must validate
it without a model, so the blob names everything needed to decode or reject it, and nothing is
decoded before the CRC over the whole blob has been verified. This module is the torch-free half
of the codec: the service validates every Write with it; :mod:`memory3.sdk.memory.codec` turns
tensors into bodies and back, one :class:`SchemeFormat` per scheme. Byte layout: docs/memory-blob.md.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from .memory_spec import MemorySpec

MAGIC = b"M3KV"
FORMAT_VERSION = 1
ZSTD_LEVEL = 3
FLAG_ZSTD = 0x01  # the body is zstd-compressed
FLAG_POS16 = 0x02  # positions are uint16 (else uint8)
_KNOWN_FLAGS = FLAG_ZSTD | FLAG_POS16

_FIXED = struct.Struct("<4sHBBHHHHIIIBB")
_CRC = struct.Struct("<I")
PQ_PARAMS = struct.Struct("<B8s")  # pq: bytes per vector, 8-byte codebook digest
MIN_SIZE = _FIXED.size + _CRC.size


@dataclass(frozen=True)
class SchemeFormat:
    """What the format knows of one scheme: its id in the header and its body size per vector."""

    name: str
    id: int
    vector_bytes: Callable[[int, int], int]  # (head dim, pq bytes per vector) -> stored bytes per K or V vector
    uses_codebook: bool = False


SCHEME_FORMATS: dict[str, SchemeFormat] = {
    f.name: f
    for f in (
        SchemeFormat("fp16", 0, lambda dim, m: 2 * dim),
        SchemeFormat("int8", 1, lambda dim, m: 2 + dim),  # float16 scale + int8 values
        SchemeFormat("int4", 2, lambda dim, m: 2 + (dim + 1) // 2),  # float16 scale + packed nibbles
        SchemeFormat("pq", 3, lambda dim, m: m, uses_codebook=True),  # one byte per subvector or stage
    )
}
SCHEMES = tuple(SCHEME_FORMATS)  # names, in id order
_BY_ID = {f.id: f for f in SCHEME_FORMATS.values()}


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
    def position_bytes(self) -> int:
        return 2 if self.flags & FLAG_POS16 else 1

    @property
    def kv_shape(self) -> tuple[int, int, int, int, int]:
        layers, heads, tokens, dim = self.shape
        return (layers, 2, heads, tokens, dim)


_zstd_contexts = threading.local()


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    """One zstd compressor and decompressor per thread: a context must not be shared by threads."""
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


def short_fingerprint(fp: str) -> str:
    return fp if len(fp) <= 12 else fp[:12] + "…"


def raw_size(scheme: str, shape: tuple[int, int, int, int], pos_bytes: int, pq_m: int) -> int:
    """Bytes of a body before compression: positions, then every K and V vector."""
    layers, heads, tokens, dim = shape
    return layers * heads * tokens * pos_bytes + layers * 2 * heads * tokens * SCHEME_FORMATS[scheme].vector_bytes(dim, pq_m)


def read_header(payload: bytes) -> MemoryHeader:
    """Parse and verify a blob's header: magic, format version, lengths, scheme, checksum.

    Cheap (no decompression, no torch): the service calls it on every Write.
    """
    buf = memoryview(payload)
    n = len(buf)
    if n < MIN_SIZE:
        raise CodecError(f"truncated: {n} bytes is shorter than the {MIN_SIZE}-byte minimum of a memory")
    (magic, version, scheme_id, flags, layers, heads, tokens, dim, cb_version, size, raw, fp_len, p_len) = (
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
    if scheme_id not in _BY_ID:
        raise CodecError(f"unknown scheme id {scheme_id}; known: {SCHEMES}")
    scheme = _BY_ID[scheme_id]
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
    if scheme.uses_codebook:
        if p_len != PQ_PARAMS.size:
            raise CodecError(f"pq parameters are {p_len} bytes, expected {PQ_PARAMS.size}")
        pq_m, digest = PQ_PARAMS.unpack(params)
        if not 1 <= pq_m <= dim:
            raise CodecError(f"pq bytes per vector {pq_m} outside [1, head dim {dim}]")
        if cb_version == 0:
            raise CodecError("pq memory names no codebook version")
    elif p_len or cb_version:
        raise CodecError(f"scheme {scheme.name} takes no parameters or codebook")
    want_raw = raw_size(scheme.name, shape, 2 if flags & FLAG_POS16 else 1, pq_m)
    if raw != want_raw:
        raise CodecError(f"raw size {raw} does not match {want_raw} implied by {scheme.name} shape {shape}")
    if not flags & FLAG_ZSTD and size != raw:
        raise CodecError(f"uncompressed body is {size} bytes, shape implies {raw}")
    if flags & FLAG_ZSTD:  # a frame that declares another size is refused before anything is allocated
        try:
            declared = zstandard.frame_content_size(bytes(buf[off : off + min(size, 18)]))  # a frame header is <= 18 bytes
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd body has no valid frame header: {exc}") from None
        if declared != raw:
            shown = "no size" if declared < 0 else f"{declared} bytes"
            raise CodecError(f"zstd frame declares {shown}, header says {raw}")
    return MemoryHeader(
        FORMAT_VERSION, scheme.name, fingerprint, shape, cb_version, size, stored, flags, raw, pq_m, digest, off
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
            f"memory was computed by model {short_fingerprint(header.fingerprint)}, "
            f"running model is {short_fingerprint(fingerprint)}"
        )
    if codebook_version is not None and header.scheme == "pq" and header.codebook_version != codebook_version:
        raise CodecError(f"pq memory needs codebook version {header.codebook_version}, got {codebook_version}")
    return header


def _fmt(shape) -> str:
    return "(" + ",".join(str(s) for s in shape) + ")"


def pack_blob(scheme: str, shape: tuple[int, int, int, int], fingerprint: str, raw: bytes, *,
              pos16: bool, params: bytes = b"", codebook_version: int = 0) -> bytes:
    """Header + body (zstd-compressed when that makes it smaller) + CRC32 trailer."""
    if max(shape) > 0xFFFF:
        raise CodecError(f"shape {shape} does not fit the format (max 65535 per dimension)")
    fp = fingerprint.encode("ascii")
    if len(fp) > 255:
        raise CodecError("fingerprint longer than 255 bytes")
    body, flags = raw, FLAG_POS16 if pos16 else 0
    packed = _zstd()[0].compress(raw)
    if len(packed) < len(raw):
        body, flags = packed, flags | FLAG_ZSTD
    head = _FIXED.pack(MAGIC, FORMAT_VERSION, SCHEME_FORMATS[scheme].id, flags, *shape, codebook_version,
                       len(body), len(raw), len(fp), len(params))
    out = b"".join((head, fp, params, body))
    return out + _CRC.pack(zlib.crc32(out))


def body_bytes(payload: bytes, header: MemoryHeader) -> bytes:
    """The body after decompression, bounded by the header's raw size."""
    body = memoryview(payload)[header.body_offset : header.body_offset + header.payload_size]
    if not header.compressed:
        return bytes(body)
    try:
        raw = _zstd()[1].decompress(body, max_output_size=header.raw_size)
    except zstandard.ZstdError as exc:
        raise CodecError(f"zstd body does not decompress: {exc}") from None
    if len(raw) != header.raw_size:
        raise CodecError(f"body decompresses to {len(raw)} bytes, header says {header.raw_size}")
    return raw
