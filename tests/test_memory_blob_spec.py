"""docs/memory-blob.md is precise enough to write an encoder from: blobs built here from the page
alone (struct, NumPy, zstandard — no memory3 code) are accepted by the service, come back with the
CRC the page defines, and decode (with the SDK) to exactly the values put in."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import zstandard

from memory3.sdk.client import BankInfo, Client, MemorySpec, Reference
from memory3.sdk.memory.codec import decode_memory

FINGERPRINT = "ab" * 8
L, H, T, D = 2, 2, 3, 4
SCHEME_IDS = {"fp16": 0, "int8": 1}


def build_blob(scheme: str, positions: np.ndarray, kv: np.ndarray, compress: bool) -> bytes:
    """Straight from docs/memory-blob.md: header, positions, per-scheme K/V, optional zstd, CRC32."""
    raw = positions.astype("u1").tobytes()
    if scheme == "fp16":
        raw += kv.astype("<f2").tobytes()
    else:  # int8: every vector's float16 scale first, then the int8 values
        scale = (np.abs(kv).max(axis=-1) / 127).astype("<f2")
        q = np.rint(kv / scale.astype(np.float32)[..., None]).astype("i1")
        raw += scale.tobytes() + q.tobytes()
    body, flags = raw, 0
    if compress:
        body, flags = zstandard.ZstdCompressor(level=3).compress(raw), 0x01
    fingerprint = FINGERPRINT.encode("ascii")
    header = struct.pack("<4sHBBHHHHIIIBB", b"M3KV", 1, SCHEME_IDS[scheme], flags, L, H, T, D, 0,
                         len(body), len(raw), len(fingerprint), 0)
    blob = header + fingerprint + body
    return blob + struct.pack("<I", zlib.crc32(blob))


@pytest.mark.parametrize("scheme, compress", [("fp16", False), ("fp16", True), ("int8", False)])
def test_a_blob_built_from_the_format_page_round_trips(server, tenant, scheme, compress):
    rng = np.random.default_rng(1)
    positions = np.stack([rng.permutation(16)[:T] for _ in range(L * H)]).reshape(L, H, T)
    kv = rng.normal(size=(L, 2, H, T, D)).astype(np.float32)
    if compress:
        kv[:] = 0.5  # repeated values: zstd makes it smaller, so the compressed form is the natural one
    blob = build_blob(scheme, positions, kv, compress)
    with Client(server.target, tenant.api_key) as client:
        client.create_bank(BankInfo(f"spec-{scheme}", FINGERPRINT, MemorySpec(tuple(range(L)), H, D, T, 16, scheme),
                                    "client", 2, "l2"))
        client.write(f"spec-{scheme}", [Reference("r", "t", embedding=[1.0, 0.0], memory=blob)])
        [stored] = client.fetch(f"spec-{scheme}", ["r"])
    assert stored.memory == blob and stored.memory_crc32 == zlib.crc32(blob[:-4])
    memory = decode_memory(stored.memory)
    assert memory.fingerprint == FINGERPRINT
    assert np.array_equal(memory.positions.numpy(), positions)
    tolerance = 1e-3 if scheme == "fp16" else np.abs(kv).max() / 127
    np.testing.assert_allclose(memory.kv.numpy(), kv, atol=tolerance)
