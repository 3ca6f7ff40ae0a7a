"""The PQ codebook blob format: header, checksum, digest, arrays — without torch.

A bank's codebook is uploaded once and named by every PQ memory through its version and an
8-byte digest, so the service must check a codebook's shape and fingerprint, and compute its
digest, without a model or torch. :class:`memory3.sdk.memory.pq.PQCodebook` builds tensors from
what :func:`read_codebook` returns and writes blobs with :func:`pack_codebook`. A codebook is
written in the lowest format that holds it (1: product without RoPE; 2: with the keys' RoPE
frequencies; 3: with the quantizer), so the digests stored memories name never change.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, replace

import numpy as np

CODEBOOK_MAGIC = b"M3PQ"
CODEBOOK_FORMAT_VERSION = 3
CENTROIDS = 256  # centroids per subquantizer: one byte per code
SHARE_MODES = ("layer", "kv")  # one codebook group per layer x K/V, or per K/V
QUANTIZERS = ("product", "residual")  # one byte per subvector, or per residual stage

_HEADER = struct.Struct("<4sHIHHHHBBB")  # magic, fmt, version, layers, heads, head_dim, centroids, M, share, fp_len
_ROPE_LEN = struct.Struct("<H")  # format >= 2, after the fingerprint: number of RoPE frequencies
_QUANTIZER = struct.Struct("<B")  # format 3, after the RoPE length: index into QUANTIZERS
_CRC = struct.Struct("<I")


class CodebookError(ValueError):
    """A codebook blob is corrupt, truncated, or does not fit the memories it is used with."""


@dataclass(frozen=True)
class CodebookHeader:
    format: int
    version: int
    fingerprint: str
    layers: int
    kv_heads: int
    head_dim: int
    subvectors: int  # bytes per vector: subvectors (product) or stages (residual)
    share: str
    quantizer: str
    rope_len: int

    def check_shape(self, layers: int, heads: int, head_dim: int) -> None:
        check_shape(self.version, (self.layers, self.kv_heads, self.head_dim), (layers, heads, head_dim))


def check_shape(version: int, codebook: tuple[int, int, int], memory: tuple[int, int, int]) -> None:
    """A codebook serves memories of its own (layers, kv heads, head dim) only."""
    if codebook != memory:
        raise CodebookError(f"codebook v{version} is for (layers, kv heads, head dim) {codebook}, memory has {memory}")


@dataclass(frozen=True)
class CodebookArrays:
    key_rope: np.ndarray | None  # (rope_len,) float32 or None
    mean: np.ndarray  # (layers, 2, kv heads, head dim)
    rotation: np.ndarray  # (groups, head dim, head dim)
    centroids: np.ndarray  # (groups, stages * 256, head dim)


def codebook_digest(body: bytes) -> bytes:
    """The 8-byte digest memories name: SHA-256 of the blob without its CRC trailer."""
    return hashlib.sha256(body).digest()[:8]


def canonical_format(quantizer: str, rope_len: int) -> int:
    """The lowest format that holds a codebook: the one its digest is computed over."""
    return 3 if quantizer == "residual" else 1 if rope_len == 0 else 2


def canonical_digest(header: CodebookHeader, arrays: CodebookArrays) -> bytes:
    """The digest of a parsed codebook, as its writer computes it (in its canonical format)."""
    return codebook_digest(pack_codebook(replace(header, format=canonical_format(header.quantizer, header.rope_len)), arrays))


def pack_codebook(header: CodebookHeader, arrays: CodebookArrays) -> bytes:
    """The blob body (no CRC trailer): header, fingerprint, format fields, float32 arrays."""
    fp = header.fingerprint.encode("utf-8")
    if len(fp) > 255:
        raise CodebookError("fingerprint longer than 255 bytes")
    fmt = header.format
    head = _HEADER.pack(CODEBOOK_MAGIC, fmt, int(header.version), header.layers, header.kv_heads, header.head_dim,
                        CENTROIDS, header.subvectors, SHARE_MODES.index(header.share), len(fp)) + fp
    if fmt >= 2:
        head += _ROPE_LEN.pack(header.rope_len)
    if fmt >= 3:
        head += _QUANTIZER.pack(QUANTIZERS.index(header.quantizer))
    parts = ((arrays.key_rope,) if arrays.key_rope is not None else ()) + (arrays.mean, arrays.rotation, arrays.centroids)
    return head + b"".join(np.asarray(a).astype("<f4").tobytes() for a in parts)


def with_checksum(body: bytes) -> bytes:
    return body + _CRC.pack(zlib.crc32(body))


def read_codebook(blob: bytes) -> tuple[CodebookHeader, CodebookArrays]:
    """Parse and verify a codebook blob (magic, format, sizes, CRC); every failure is a CodebookError."""
    blob = bytes(blob)
    if len(blob) < _HEADER.size + _CRC.size:
        raise CodebookError(f"truncated codebook: {len(blob)} bytes is shorter than its header")
    (magic, fmt, version, layers, heads, dim, centroids, m, share, fp_len) = _HEADER.unpack_from(blob)
    if magic != CODEBOOK_MAGIC:
        raise CodebookError(f"not a PQ codebook: magic {magic!r}, expected {CODEBOOK_MAGIC!r}")
    if fmt not in range(1, CODEBOOK_FORMAT_VERSION + 1):
        raise CodebookError(f"unsupported codebook format version {fmt} (this build reads 1 to {CODEBOOK_FORMAT_VERSION})")
    if centroids != CENTROIDS or share >= len(SHARE_MODES) or not (layers and heads and dim and 1 <= m <= dim):
        raise CodebookError("corrupt codebook header")
    groups = layers * 2 if SHARE_MODES[share] == "layer" else 2
    rope_len, quantizer = 0, 0
    fields = (_ROPE_LEN.size if fmt >= 2 else 0) + (_QUANTIZER.size if fmt >= 3 else 0)
    if len(blob) < _HEADER.size + fp_len + fields:
        raise CodebookError(f"truncated codebook: {len(blob)} bytes is shorter than its header")
    if fmt >= 2:
        (rope_len,) = _ROPE_LEN.unpack_from(blob, _HEADER.size + fp_len)
        if fmt == 2 and not rope_len:
            raise CodebookError("corrupt codebook header: format 2 without RoPE frequencies")
    if fmt >= 3:
        (quantizer,) = _QUANTIZER.unpack_from(blob, _HEADER.size + fp_len + _ROPE_LEN.size)
        if quantizer >= len(QUANTIZERS):
            raise CodebookError(f"corrupt codebook header: unknown quantizer {quantizer}")
    stages = m if QUANTIZERS[quantizer] == "residual" else 1
    sizes = (rope_len, layers * 2 * heads * dim, groups * dim * dim, groups * stages * CENTROIDS * dim)
    expected = _HEADER.size + fp_len + fields + 4 * sum(sizes) + _CRC.size
    if len(blob) != expected:
        raise CodebookError(f"truncated codebook: header says {expected} bytes, got {len(blob)}")
    (stored,) = _CRC.unpack_from(blob, len(blob) - _CRC.size)
    computed = zlib.crc32(memoryview(blob)[: -_CRC.size])
    if stored != computed:
        raise CodebookError(f"codebook checksum mismatch: stored 0x{stored:08x} computed 0x{computed:08x}")
    if version == 0:
        raise CodebookError("codebook version must be in [1, 2**32), got 0")
    if rope_len > dim // 2:
        raise CodebookError(f"{rope_len} RoPE frequencies for head dim {dim}")
    off = _HEADER.size
    try:
        fingerprint = blob[off : off + fp_len].decode("utf-8")
    except UnicodeDecodeError:
        raise CodebookError("codebook fingerprint is not UTF-8") from None
    off += fp_len + fields
    arrays = []
    for n in sizes:
        arrays.append(np.frombuffer(blob, "<f4", n, off).astype(np.float32))
        off += 4 * n
    header = CodebookHeader(fmt, version, fingerprint, layers, heads, dim, m, SHARE_MODES[share],
                            QUANTIZERS[quantizer], rope_len)
    return header, CodebookArrays(
        arrays[0] if rope_len else None,
        arrays[1].reshape(layers, 2, heads, dim),
        arrays[2].reshape(groups, dim, dim),
        arrays[3].reshape(groups, stages * CENTROIDS, dim),
    )
