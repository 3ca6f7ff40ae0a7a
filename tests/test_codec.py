"""Tests for the memory codec (memory3.sdk.memory.codec) and PQ codebooks (memory3.sdk.memory.pq).

Fidelity data: random Gaussian tensors neither compress nor quantize like real KV, so the round
trips use *structured* KV-like memories (:class:`SyntheticKV`): per (layer, K/V, head) a fixed
low-rank basis with heavy-tailed (Laplace) coefficients, a per-channel bias, a few outlier
channels on the keys (6x gain, as LLM keys have), small noise, and RoPE applied to the keys at
their kept positions. A "bank" is many samples from one generator, as memories of one model are.
Real KV from a trained model is measured in bench/bench_codec.py.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import re
import struct
import zlib

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory3.core.blob import FLAG_ZSTD, SCHEMES, CodecError, MemoryHeader, payload_checksum, read_header, validate_payload
from memory3.core.memory_spec import MemorySpec
from memory3.sdk.memory.codec import decode_memory, encode_memory
from memory3.sdk.memory.pq import CodebookError, PQCodebook, train_codebook
from memory3.sdk.memory.synthetic import SyntheticKV
from memory3.sdk.memory.tensors import ExplicitMemory

torch.set_num_threads(1)

FP = "ab12" * 16
OTHER_FP = "cd34" * 16




LOGIT_STD = 2.0


def cosines(a: ExplicitMemory, b: ExplicitMemory) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-vector cosine of K and of V."""
    c = torch.nn.functional.cosine_similarity(a.kv, b.kv, dim=-1)
    return c[:, 0], c[:, 1]


def attention_rel_error(orig: ExplicitMemory, dec: ExplicitMemory, queries: torch.Tensor) -> torch.Tensor:
    """Relative error of softmax(q K^T / sqrt d) V per (layer, head); queries (layers, heads, Q, d).

    Queries are key-like vectors rescaled per (layer, head) so that the logits against the
    original keys have standard deviation LOGIT_STD, a typical spread for a trained model's
    attention (unscaled synthetic outlier channels give near one-hot softmax, which no real
    layer uses for all queries).
    """
    raw = queries @ orig.keys.transpose(-1, -2) / math.sqrt(queries.shape[-1])
    q = queries * (LOGIT_STD / raw.flatten(2).std(dim=-1))[..., None, None]

    def attend(m):
        scores = q @ m.keys.transpose(-1, -2) / math.sqrt(queries.shape[-1])
        return torch.softmax(scores, -1) @ m.values

    ref, got = attend(orig), attend(dec)
    return (got - ref).flatten(2).norm(dim=-1) / ref.flatten(2).norm(dim=-1)


def spec_for(mem: ExplicitMemory, **kw) -> MemorySpec:
    layers, _, heads, tokens, dim = mem.kv.shape
    return MemorySpec(tuple(range(layers)), heads, dim, tokens, **kw)


# ---- fixtures -----------------------------------------------------------------------------------

SMALL = SyntheticKV(2, 2, 8, 32, seed=1)


@pytest.fixture(scope="module")
def bank():
    gen = SyntheticKV(2, 2, 8, 32, seed=7)
    train = [gen.sample() for _ in range(192)]
    test = [gen.sample() for _ in range(6)]
    queries = torch.stack([gen.sample().keys for _ in range(2)], dim=2).flatten(2, 3)  # (L, H, 16, D)
    return train, test, queries


@pytest.fixture(scope="module")
def codebook(bank):
    return train_codebook(bank[0], bytes_per_vector=8, version=3, kmeans_iters=10)


# ---- round trips ------------------------------------------------------------------------------

# scheme: (min per-vector cosine, min mean cosine, max attention-output relative error, max mean error)
BOUNDS = {
    "fp16": (0.9999, 0.99999, 2e-3, 1e-3),
    "int8": (0.999, 0.9999, 0.03, 0.015),
    "int4": (0.95, 0.98, 0.3, 0.15),
}


@pytest.mark.parametrize("scheme", ["fp16", "int8", "int4"])
def test_round_trip_within_bounds(scheme, bank):
    _, test, queries = bank
    min_cos, mean_cos, max_err, mean_err = BOUNDS[scheme]
    errs = []
    for mem in test:
        blob = encode_memory(mem, scheme)
        out = decode_memory(blob)
        assert out.fingerprint == mem.fingerprint
        assert torch.equal(out.positions, mem.positions)
        assert out.kv.shape == mem.kv.shape and out.kv.dtype == torch.float32
        ck, cv = cosines(mem, out)
        for c in (ck, cv):
            assert c.min() >= min_cos and c.mean() >= mean_cos, (scheme, c.min(), c.mean())
        errs.append(attention_rel_error(mem, out, queries))
    err = torch.cat(errs)
    assert err.max() <= max_err and err.mean() <= mean_err, (err.max(), err.mean())


def test_pq_round_trip_within_bounds(bank, codebook):
    """PQ at 8 bytes per 32-d vector (16x below fp16) on held-out memories of the bank."""
    _, test, queries = bank
    errs, cks, cvs = [], [], []
    for mem in test:
        blob = encode_memory(mem, "pq", codebook)
        out = decode_memory(blob, codebook=codebook)
        assert torch.equal(out.positions, mem.positions)
        ck, cv = cosines(mem, out)
        cks.append(ck), cvs.append(cv)
        errs.append(attention_rel_error(mem, out, queries))
    ck, cv, err = torch.cat(cks), torch.cat(cvs), torch.cat(errs)
    assert ck.mean() >= 0.95 and cv.mean() >= 0.95, (ck.mean(), cv.mean())
    assert ck.min() >= 0.8 and cv.min() >= 0.8, (ck.min(), cv.min())
    assert err.max() <= 0.4 and err.mean() <= 0.2, (err.max(), err.mean())


@pytest.mark.parametrize("share", ["layer", "kv"])
def test_pq_decode_is_the_opq_definition(share):
    """Decoding equals its definition, x = concat_m(centroid_m[code_m]) @ R^T + mean, with uneven
    subvector sizes (30 = 8 + 8 + 7 + 7) and both codebook sharing modes."""
    layers, heads, tokens, dim, m = 2, 3, 4, 30, 4
    gen = torch.Generator().manual_seed(5)
    groups = layers * 2 if share == "layer" else 2
    rotation = torch.linalg.qr(torch.randn(groups, dim, dim, generator=gen))[0]
    cb = PQCodebook(1, FP, torch.randn(layers, 2, heads, dim, generator=gen), rotation,
                    torch.randn(groups, 256, dim, generator=gen), m, share)
    codes = torch.randint(0, 256, (layers, 2, heads, tokens, m), generator=gen, dtype=torch.uint8)
    bounds = [0, 8, 16, 23, 30]
    expected = torch.empty(layers, 2, heads, tokens, dim)
    for layer, kv, head, token in itertools.product(range(layers), range(2), range(heads), range(tokens)):
        g = layer * 2 + kv if share == "layer" else kv
        y = torch.cat([cb.centroids[g, int(codes[layer, kv, head, token, j]), bounds[j] : bounds[j + 1]] for j in range(m)])
        expected[layer, kv, head, token] = y @ rotation[g].T + cb.mean[layer, kv, head]
    torch.testing.assert_close(cb.decode(codes.numpy()), expected, atol=1e-5, rtol=1e-5)


def test_pq_beats_random_codebook(bank, codebook):
    """Training matters: a codebook of random centroids is far worse on the same memories."""
    _, test, _ = bank
    rand = PQCodebook(9, FP, codebook.mean, codebook.rotation, torch.randn_like(codebook.centroids), 8)
    good = torch.cat([cosines(m, decode_memory(encode_memory(m, "pq", codebook), codebook=codebook))[0] for m in test])
    bad = torch.cat([cosines(m, decode_memory(encode_memory(m, "pq", rand), codebook=rand))[0] for m in test])
    assert good.mean() > bad.mean() + 0.05


def test_pq_codes_keys_without_their_position(bank, codebook):
    """With the model's RoPE frequencies, the codebook codes keys rotated back to position 0 (each
    memory's stored positions undo and redo the rotation): same bytes per vector, closer keys,
    values as before. The frequencies travel in the blob (format 2); plain codebooks stay format 1."""
    train, test, _ = bank
    rope_cb = train_codebook(train, bytes_per_vector=8, version=4, kmeans_iters=10,
                             key_rope=SyntheticKV(2, 2, 8, 32, seed=7).inv_freq)
    plain = [cosines(m, decode_memory(encode_memory(m, "pq", codebook), codebook=codebook)) for m in test]
    rope = [cosines(m, decode_memory(encode_memory(m, "pq", rope_cb), codebook=rope_cb)) for m in test]
    plain_k, rope_k = torch.cat([k for k, _ in plain]), torch.cat([k for k, _ in rope])
    plain_v, rope_v = torch.cat([v for _, v in plain]), torch.cat([v for _, v in rope])
    assert rope_k.mean() > plain_k.mean() + 0.01, (rope_k.mean(), plain_k.mean())
    assert float(rope_v.mean()) == pytest.approx(float(plain_v.mean()), abs=0.01)
    blob = rope_cb.to_bytes()
    again = PQCodebook.from_bytes(blob)
    assert torch.equal(again.key_rope, rope_cb.key_rope) and again.digest == rope_cb.digest
    assert blob[4:6] == struct.pack("<H", 2) and codebook.to_bytes()[4:6] == struct.pack("<H", 1)
    with pytest.raises(CodebookError, match="positions are needed"):
        rope_cb.encode(test[0].kv)
    no_rope = bytearray(blob)
    fp_len = blob[struct.calcsize("<4sHIHHHHBB")]
    no_rope[struct.calcsize("<4sHIHHHHBBB") + fp_len : struct.calcsize("<4sHIHHHHBBB") + fp_len + 2] = b"\0\0"
    with pytest.raises(CodebookError, match="format 2 without RoPE"):
        PQCodebook.from_bytes(_refresh_crc(no_rope))


def test_decode_dtype_and_device():
    mem = SMALL.sample()
    out = decode_memory(encode_memory(mem, "int8"), dtype=torch.bfloat16, device="cpu")
    assert out.kv.dtype == torch.bfloat16 and out.positions.dtype == torch.int64


def test_sizes_shrink_by_scheme(bank, codebook):
    mem = bank[1][0]
    sizes = {s: len(encode_memory(mem, s, codebook)) for s in SCHEMES}
    assert sizes["fp16"] > sizes["int8"] > sizes["int4"] > sizes["pq"]
    vectors = mem.kv[..., 0].numel()
    assert sizes["pq"] <= vectors * 8 + mem.positions.numel() + 200


def test_positions_beyond_uint8_and_odd_head_dim():
    kv = torch.randn(1, 2, 2, 3, 7)
    pos = torch.tensor([[[0, 300, 65535], [1, 2, 3]]])
    mem = ExplicitMemory(kv, pos, FP)
    for scheme in ("fp16", "int8", "int4"):
        out = decode_memory(encode_memory(mem, scheme))
        assert torch.equal(out.positions, pos)
        assert torch.nn.functional.cosine_similarity(out.kv, kv, dim=-1).min() > 0.9


def _raw_body(blob: bytes) -> bytes:
    """The body as written before compression."""
    header = read_header(blob)
    body = blob[header.body_offset : header.body_offset + header.payload_size]
    return zstandard.ZstdDecompressor().decompress(body, max_output_size=header.raw_size) if header.compressed else body


def test_int4_decode_is_exactly_nibble_minus_8_times_scale():
    """The compiled dequantizer computes exactly what the format says, for even and odd head dims."""
    for dim in (16, 7):
        mem = ExplicitMemory(torch.randn(2, 2, 3, 4, dim) * 3, torch.zeros(2, 3, 4, dtype=torch.long), FP)
        blob = encode_memory(mem, "int4")
        raw = _raw_body(blob)
        vectors, half = mem.kv[..., 0].numel(), (dim + 1) // 2
        offset = mem.positions.numel()
        scale = torch.frombuffer(bytearray(raw[offset : offset + 2 * vectors]), dtype=torch.float16).float()
        packed = torch.frombuffer(bytearray(raw[offset + 2 * vectors :]), dtype=torch.uint8).reshape(vectors, half)
        nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(vectors, 2 * half)[:, :dim]
        expected = ((nibbles.float() - 8) * scale[:, None]).reshape(mem.kv.shape)
        assert torch.equal(decode_memory(blob).kv, expected)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_non_finite_scale_rejected_even_with_a_valid_checksum(scheme):
    """A writer bug, not corruption: the checksum matches, the decoder must still refuse."""
    mem = SyntheticKV(1, 1, 2, 4, seed=5).sample()
    blob = encode_memory(mem, scheme)
    header = read_header(blob)
    raw = bytearray(_raw_body(blob))
    offset = mem.positions.numel()
    raw[offset + 2 : offset + 4] = struct.pack("<e", float("inf"))  # the second vector's scale
    head = bytearray(blob[: header.body_offset])
    head[20:24] = struct.pack("<I", len(raw))  # payload size; the body is now stored raw
    head[7] &= ~FLAG_ZSTD
    with pytest.raises(CodecError, match="non-finite scale in body"):
        decode_memory(_refresh_crc(head + raw + b"crc!"))


def test_zero_vectors_round_trip_exactly():
    mem = ExplicitMemory(torch.zeros(1, 2, 1, 2, 4), torch.zeros(1, 1, 2, dtype=torch.long), FP)
    for scheme in ("fp16", "int8", "int4"):
        assert torch.equal(decode_memory(encode_memory(mem, scheme)).kv, mem.kv)


def test_encode_rejects_bad_input(codebook):
    mem = SMALL.sample()
    with pytest.raises(CodecError, match="unknown scheme 'int3'"):
        encode_memory(mem, "int3")
    with pytest.raises(CodecError, match="pq scheme needs a codebook"):
        encode_memory(mem, "pq")
    bad = ExplicitMemory(mem.kv.clone(), mem.positions, FP)
    bad.kv[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(CodecError, match="NaN or Inf"):
        encode_memory(bad, "int8")
    other = ExplicitMemory(mem.kv, mem.positions, OTHER_FP)
    with pytest.raises(CodecError, match="codebook v3 was trained for model ab12ab12ab12…"):
        encode_memory(other, "pq", codebook)
    wrong_shape = ExplicitMemory(torch.randn(2, 2, 2, 8, 16), mem.positions, FP)
    with pytest.raises(CodecError, match=r"codebook v3 is for \(layers, kv heads, head dim\) \(2, 2, 32\)"):
        encode_memory(wrong_shape, "pq", codebook)


# ---- header and validation ------------------------------------------------------------------


def test_header_fields(codebook, bank):
    mem = bank[1][0]
    blob = encode_memory(mem, "pq", codebook)
    h = read_header(blob)
    assert isinstance(h, MemoryHeader)
    assert (h.version, h.scheme, h.fingerprint, h.shape) == (1, "pq", FP, (2, 2, 8, 32))
    assert h.codebook_version == 3 and h.codebook_digest == codebook.digest and h.pq_bytes_per_vector == 8
    assert h.checksum == zlib.crc32(blob[:-4]) == struct.unpack("<I", blob[-4:])[0]
    assert h.body_offset + h.payload_size + 4 == len(blob)
    h8 = read_header(encode_memory(mem, "int8"))
    assert (h8.scheme, h8.codebook_version, h8.compressed) == ("int8", 0, True)


def test_validate_payload_accepts_matching_and_rejects_mismatch(codebook, bank):
    mem = bank[1][0]
    spec = spec_for(mem)
    blob = encode_memory(mem, "pq", codebook)
    assert validate_payload(blob, spec, FP, codebook_version=3).scheme == "pq"
    bigger = MemorySpec((0, 1, 2), 2, 32, 8)
    with pytest.raises(CodecError, match=re.escape("shape (2,2,8,32) does not match bank spec (3,2,8,32)")):
        validate_payload(blob, bigger)
    with pytest.raises(CodecError, match="memory was computed by model ab12ab12ab12…, running model is cd34cd34cd34…"):
        validate_payload(blob, spec, OTHER_FP)
    with pytest.raises(CodecError, match="pq memory needs codebook version 3, got 2"):
        validate_payload(blob, spec, codebook_version=2)


def test_pq_decode_needs_the_right_codebook(codebook, bank):
    mem = bank[1][0]
    blob = encode_memory(mem, "pq", codebook)
    with pytest.raises(CodecError, match="pq memory needs codebook version 3, got none"):
        decode_memory(blob)
    v2 = PQCodebook(2, FP, codebook.mean, codebook.rotation, codebook.centroids, 8)
    with pytest.raises(CodecError, match="pq memory needs codebook version 3, got 2"):
        decode_memory(blob, codebook=v2)
    impostor = PQCodebook(3, FP, codebook.mean, codebook.rotation, codebook.centroids + 1, 8)
    with pytest.raises(CodecError, match="pq memory needs codebook version 3 with digest"):
        decode_memory(blob, codebook=impostor)


def test_residual_quantizer_is_greedy_stagewise_and_closer_than_product(bank, codebook):
    """The residual quantizer at the same 8 bytes per 32-d vector: codes are what a slow greedy
    loop picks (each stage the centroid nearest to what the stages before left), decoding is the
    sum of the chosen centroids plus the mean, and held-out memories come back closer than with
    the product quantizer (by about 12 % on this synthetic KV; 37 % on the reference model's, see
    bench/bench_codec_qa.py). Its blob (format 3) round-trips and names its quantizer."""
    train, test, _ = bank
    rq = train_codebook(train, bytes_per_vector=8, version=5, kmeans_iters=10, quantizer="residual")
    assert rq.residual and rq.centroids.shape == (4, 8 * 256, 32)
    mem = test[0]
    codes = torch.from_numpy(rq.encode(mem.kv))
    stages = rq.centroids.reshape(4, 8, 256, 32)
    for layer, slot, head, token in itertools.product(range(2), range(2), range(2), range(0, 8, 3)):
        group = layer * 2 + slot
        left = mem.kv[layer, slot, head, token] - rq.mean[layer, slot, head]
        total = torch.zeros(32)
        for stage in range(8):
            pick = int(((left[None] - stages[group, stage]) ** 2).sum(-1).argmin())
            assert int(codes[layer, slot, head, token, stage]) == pick
            left, total = left - stages[group, stage, pick], total + stages[group, stage, pick]
        decoded = rq.decode(codes)[layer, slot, head, token]
        torch.testing.assert_close(decoded, total + rq.mean[layer, slot, head], atol=1e-5, rtol=1e-5)
    blob = rq.to_bytes()
    again = PQCodebook.from_bytes(blob)
    assert blob[4:6] == struct.pack("<H", 3) and again.quantizer == "residual" and again.digest == rq.digest
    errs = {}  # squared error over the memories' energy; on the reference model's real KV the gap is wider
    for name, cb in (("product", codebook), ("residual", again)):
        outs = [decode_memory(encode_memory(m, "pq", cb), codebook=cb) for m in test]
        errs[name] = sum(float(((out.kv - m.kv) ** 2).sum() / (m.kv**2).sum()) for m, out in zip(test, outs))
    assert errs["residual"] < 0.95 * errs["product"], errs
    bad = bytearray(blob)
    bad[struct.calcsize("<4sHIHHHHBBB") + len(FP) + 2] = 7  # the quantizer byte
    with pytest.raises(CodebookError, match="unknown quantizer 7"):
        PQCodebook.from_bytes(_refresh_crc(bad))
    with pytest.raises(ValueError, match="quantizer must be one of"):
        train_codebook(train, bytes_per_vector=8, quantizer="lattice")


def test_codebook_blob_round_trip_and_corruption(codebook, bank):
    blob = codebook.to_bytes()
    again = PQCodebook.from_bytes(blob)
    assert again.version == 3 and again.fingerprint == FP and again.digest == codebook.digest
    mem = bank[1][0]
    assert torch.equal(
        decode_memory(encode_memory(mem, "pq", codebook), codebook=again).kv,
        decode_memory(encode_memory(mem, "pq", codebook), codebook=codebook).kv,
    )
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10
    with pytest.raises(CodebookError, match="codebook checksum mismatch: stored 0x"):
        PQCodebook.from_bytes(bytes(flipped))
    with pytest.raises(CodebookError, match="truncated codebook"):
        PQCodebook.from_bytes(blob[:-10])
    with pytest.raises(CodebookError, match="not a PQ codebook"):
        PQCodebook.from_bytes(b"XXXX" + blob[4:])


# ---- property-based rejection -----------------------------------------------------------------

PAYLOADS = {s: encode_memory(SyntheticKV(1, 2, 4, 16, seed=3).sample(), s) for s in ("fp16", "int8", "int4")}
CHECKSUM_OR_FRAMING = re.compile(
    r"checksum mismatch: stored 0x[0-9a-f]{8} computed 0x[0-9a-f]{8}|^truncated: |trailing bytes|not a memory3 memory"
    r"|unsupported memory format version"
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(PAYLOADS)), st.data())
def test_any_byte_flip_is_rejected(scheme, data):
    blob = bytearray(PAYLOADS[scheme])
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CodecError) as exc:
        decode_memory(bytes(blob))
    assert CHECKSUM_OR_FRAMING.search(str(exc.value)), str(exc.value)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(PAYLOADS)), st.data())
def test_any_truncation_is_rejected(scheme, data):
    blob = PAYLOADS[scheme]
    n = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(CodecError, match=r"^truncated: "):
        read_header(blob[:n])


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(PAYLOADS)), st.binary(min_size=1, max_size=64))
def test_trailing_bytes_rejected(scheme, extra):
    with pytest.raises(CodecError, match="trailing bytes after the checksum"):
        decode_memory(PAYLOADS[scheme] + extra)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(sorted(PAYLOADS)),
    st.integers(1, 4), st.integers(1, 4), st.sampled_from([2, 4, 8]), st.sampled_from([8, 16, 32]),
)
def test_wrong_spec_rejected(scheme, layers, heads, tokens, dim):
    spec = MemorySpec(tuple(range(layers)), heads, dim, tokens)
    if (layers, heads, tokens, dim) == (1, 2, 4, 16):
        assert validate_payload(PAYLOADS[scheme], spec).shape == (1, 2, 4, 16)
        return
    with pytest.raises(CodecError, match=re.escape(f"shape (1,2,4,16) does not match bank spec ({layers},{heads},{tokens},{dim})")):
        validate_payload(PAYLOADS[scheme], spec)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(PAYLOADS)), st.text("0123456789abcdef", min_size=1, max_size=64))
def test_wrong_fingerprint_rejected(scheme, fp):
    spec = MemorySpec((0,), 2, 16, 4)
    if fp == FP:
        return
    with pytest.raises(CodecError, match="memory was computed by model ab12ab12ab12…, running model is "):
        validate_payload(PAYLOADS[scheme], spec, fp)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 2**32 - 1))
def test_wrong_codebook_version_rejected(codebook, bank, version):
    blob = encode_memory(bank[1][0], "pq", codebook)
    other = PQCodebook(version, FP, codebook.mean, codebook.rotation, codebook.centroids, 8)
    if version == 3:
        assert decode_memory(blob, codebook=other).kv.shape == bank[1][0].kv.shape
        return
    with pytest.raises(CodecError, match=f"pq memory needs codebook version 3, got {version}$"):
        decode_memory(blob, codebook=other)
    with pytest.raises(CodecError, match=f"pq memory needs codebook version 3, got {version}$"):
        validate_payload(blob, spec_for(bank[1][0]), codebook_version=version)


# ---- decoder fuzz ------------------------------------------------------------------------------

_FUZZ_MEM = SyntheticKV(1, 1, 2, 4, seed=5).sample()
_FUZZ_CODEBOOK = train_codebook([SyntheticKV(1, 1, 2, 4, seed=5).sample() for _ in range(4)], 2, 1, kmeans_iters=1)
# A memory of repeated values compresses, so these seeds carry zstd bodies: mutations then reach
# the decompressor (corrupt frames, frames whose declared size lies) behind a valid CRC.
_FUZZ_FLAT = ExplicitMemory(torch.full_like(_FUZZ_MEM.kv, 0.5), _FUZZ_MEM.positions, _FUZZ_MEM.fingerprint)
_FUZZ_SEEDS = [encode_memory(m, s, _FUZZ_CODEBOOK) for m in (_FUZZ_MEM, _FUZZ_FLAT) for s in SCHEMES]


def test_fuzz_seeds_include_compressed_bodies():
    flags = [read_header(seed).flags & FLAG_ZSTD for seed in _FUZZ_SEEDS]
    assert any(flags) and not all(flags)


def _refresh_crc(blob: bytearray) -> bytes:
    blob = blob[:-4] if len(blob) >= 4 else blob
    return bytes(blob) + struct.pack("<I", zlib.crc32(bytes(blob)))


@settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    st.sampled_from(range(len(_FUZZ_SEEDS))),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.one_of(st.none(), st.integers(0, 10_000)),
    st.booleans(),
)
def test_decoder_fuzz(seed_idx, edits, cut, fix_crc):
    """Mutated payloads (byte edits, truncation; with the CRC recomputed half the time so the
    checks behind it are reached) either raise CodecError or decode to well-formed finite tensors."""
    blob = bytearray(_FUZZ_SEEDS[seed_idx])
    for pos, val in edits:
        blob[pos % len(blob)] = val
    if cut is not None:
        blob = blob[: cut % (len(blob) + 1)]
    payload = _refresh_crc(blob) if fix_crc else bytes(blob)
    try:
        mem = decode_memory(payload, codebook=_FUZZ_CODEBOOK)
    except CodecError:
        return
    h = read_header(payload)
    assert tuple(mem.kv.shape) == h.kv_shape
    assert torch.isfinite(mem.kv).all()
    assert mem.positions.dtype == torch.int64 and (mem.positions >= 0).all()


def test_concurrent_encode_and_decode_from_many_threads():
    """The codec is used from several threads at once (the supply's decode worker, writers, the
    server's validation): every thread must get exactly what a lone thread gets."""
    gen = SyntheticKV(4, 2, 8, 32, seed=3)
    memories = [gen.sample() for _ in range(8)]
    expected = {(i, s): decode_memory(encode_memory(m, s)).kv for i, m in enumerate(memories) for s in ("int8", "int4")}

    def work(i: int) -> bool:
        ok = True
        for _ in range(40):
            for scheme in ("int8", "int4"):
                ok &= torch.equal(decode_memory(encode_memory(memories[i], scheme)).kv, expected[(i, scheme)])
        return ok

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(8)))


# ---- every header check, reached behind a valid CRC ---------------------------------------------

def _blob(*, magic=b"M3KV", version=1, scheme=0, flags=0, shape=(1, 1, 1, 4), cb_version=0, fp=b"ab" * 8,
          params=b"", body=None, raw=None, size=None, pos_bytes=1, pq_m=0) -> bytes:
    """A blob laid out as docs/memory-blob.md says, any field overridable, the CRC always valid."""
    layers, heads, tokens, dim = shape
    vectors = layers * 2 * heads * tokens
    per_vector = {0: 2 * dim, 1: 2 + dim, 2: 2 + (dim + 1) // 2, 3: pq_m}.get(scheme, 2 * dim)
    want = layers * heads * tokens * pos_bytes + vectors * per_vector
    body = bytes(want) if body is None else body
    header = struct.pack("<4sHBBHHHHIIIBB", magic, version, scheme, flags, *shape, cb_version,
                         len(body) if size is None else size, want if raw is None else raw, len(fp), len(params))
    blob = header + fp + params + body
    return blob + struct.pack("<I", zlib.crc32(blob))


PQ_PARAMS = bytes([4]) + b"d" * 8  # bytes per vector 4 (= head dim 4), 8-byte digest


@pytest.mark.parametrize("blob, message", [
    (_blob(magic=b"M3KX"), "not a memory3 memory"),
    (_blob(magic=b"M3KA"), "not a memory3 memory"),
    (_blob(version=2), "unsupported memory format version 2"),
    (_blob(version=0), "unsupported memory format version 0"),
    (_blob(shape=(1, 1, 0, 4)), "empty shape"),
    (_blob(scheme=3, params=PQ_PARAMS, pq_m=4, cb_version=0), "names no codebook version"),
    (_blob(scheme=3, params=bytes([0]) + b"d" * 8, pq_m=0, cb_version=1), "pq bytes per vector 0"),
    (_blob(scheme=3, params=bytes([5]) + b"d" * 8, pq_m=5, cb_version=1), "pq bytes per vector 5"),
    (_blob(scheme=3, params=b"d" * 5, pq_m=4, cb_version=1), "pq parameters are 5 bytes"),
    (_blob(scheme=3, params=PQ_PARAMS + b"x", pq_m=4, cb_version=1), "pq parameters are 10 bytes"),
    (_blob(fp="é".encode() * 4), "fingerprint is not ASCII"),
    (_blob(body=bytes(18)), "uncompressed body is 18 bytes, shape implies 17"),  # 1 position + K, V of 4 halves
    (_blob(raw=16), "raw size 16 does not match 17"),
    (_blob(raw=18), "raw size 18 does not match 17"),
    (_blob() + b"xyz", "3 trailing bytes after the checksum"),
    (_blob(flags=0x04), "unknown flags 0x04"),
    (_blob(scheme=7), "unknown scheme id 7"),
    (_blob(cb_version=3), "takes no parameters or codebook"),
    (_blob()[:-5] + _blob()[-4:], "truncated: header says 17 payload bytes, got 16"),
    (_blob()[:46] + _blob()[-4:], "truncated: header says 17 payload bytes, got 0"),
    (_blob(fp=b"", body=b""), "uncompressed body is 0 bytes, shape implies 17"),  # exactly the 34-byte minimum
    (_blob(flags=0x02, pos_bytes=2, body=bytes(19)), "uncompressed body is 19 bytes, shape implies 18"),
    (_blob(flags=0x01, body=b"\x00" * 17), "zstd body has no valid frame header"),
])
def test_each_header_check_refuses_with_its_reason(blob, message):
    with pytest.raises(CodecError) as info:
        read_header(blob)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("blob", [
    _blob(scheme=3, params=PQ_PARAMS, pq_m=4, cb_version=1),           # pq with bytes per vector = head dim
    _blob(flags=0x02, pos_bytes=2),                                      # uint16 positions, uncompressed
    _blob(shape=(1, 1, 1, 1), body=bytes(1 + 4)),                        # the smallest blob: 34 + fingerprint + body
])
def test_blobs_at_the_edges_of_the_header_checks_are_accepted(blob):
    header = read_header(blob)
    assert header.checksum == zlib.crc32(blob[:-4]) == payload_checksum(blob)


def test_payload_checksum_is_zero_below_the_minimum_size():
    smallest = _blob(fp=b"", body=b"")  # 34 bytes: the minimum
    assert payload_checksum(smallest) == zlib.crc32(smallest[:-4]) != 0
    assert payload_checksum(smallest[:-1]) == 0 and payload_checksum(b"") == 0


@pytest.mark.parametrize("asked", [2, 4])
def test_a_pq_memory_read_with_another_codebook_version_is_refused(asked):
    blob = _blob(scheme=3, params=PQ_PARAMS, pq_m=4, cb_version=3)
    spec = MemorySpec((0,), 1, 4, 1, 16, "pq")
    assert validate_payload(blob, spec, codebook_version=3).codebook_version == 3
    with pytest.raises(CodecError, match=f"pq memory needs codebook version 3, got {asked}"):
        validate_payload(blob, spec, codebook_version=asked)
