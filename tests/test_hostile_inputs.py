"""Inputs a careless or hostile client sends that once got an undeliberate answer (issues 19, 22):
each now gets a deliberate status naming the problem, and nothing changes."""

from __future__ import annotations

import struct
import zlib

import grpc
import numpy as np
import pytest
import zstandard

from helpers import expect_status
from memory3.core.blob import CodecError, read_header
from memory3.core.codebook_format import CodebookError, read_codebook
from memory3.sdk.client import BankInfo, Client, MemorySpec, Reference
from memory3.v1 import banks_pb2, banks_pb2_grpc, memories_pb2, memories_pb2_grpc

SPEC = MemorySpec((0,), 1, 4, 2)
FINGERPRINT = "f" * 16


def _bank(client: Client, name: str, dim: int = 8) -> None:
    client.create_bank(BankInfo(name, FINGERPRINT, SPEC, "client", dim, "l2"))


def test_names_with_a_trailing_newline_are_refused(server, tenant):
    with Client(server.target, tenant.api_key) as client:
        _bank(client, "kb")
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "bank name"):
            _bank(client, "kb\n")
        assert [b.name for b in client.list_banks()] == ["kb"]


def test_top_k_up_to_the_stated_limit_is_answered(server, tenant):
    rng = np.random.default_rng(0)
    with Client(server.target, tenant.api_key) as client:
        _bank(client, "many")
        client.write_many("many", (Reference(f"r{i}", "t", embedding=rng.normal(size=8).tolist()) for i in range(1100)),
                          batch_size=256)
        hits = client.retrieve("many", vector=rng.normal(size=8).tolist(), top_k=1024)
        assert len(hits) == 1024 and len({h.external_id for h in hits}) == 1024
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))  # best first, beyond ef_search too


def test_nul_in_an_external_id_or_a_filter_is_invalid_argument(server, tenant):
    with Client(server.target, tenant.api_key) as client:
        _bank(client, "nul")
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "external_id"):
            client.write("nul", [Reference("a\x00b", "t", embedding=[1.0] * 8)])
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "filter"):
            client.retrieve("nul", vector=[1.0] * 8, top_k=1, filter={"k\x00": "v"})
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "filter"):
            client.retrieve("nul", vector=[1.0] * 8, top_k=1, filter={"k": "v\x00"})
        assert client.stats("nul").references == 0


def test_a_key_without_the_bearer_scheme_is_unauthenticated(server, tenant):
    with grpc.insecure_channel(server.target) as channel:
        stub = banks_pb2_grpc.BanksStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListBanks(banks_pb2.ListBanksRequest(), metadata=(("authorization", tenant.api_key),), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "Bearer <key>" in info.value.details()
        reply = stub.ListBanks(banks_pb2.ListBanksRequest(), timeout=10,
                               metadata=(("authorization", f"bearer {tenant.api_key}"),))
        assert isinstance(reply, banks_pb2.ListBanksResponse)


@pytest.mark.parametrize("request_id", ["x] [evil] ERROR memory3.service.auth [admin", "r" * 129, ""])
def test_a_forged_or_oversized_request_id_is_replaced(server, tenant, request_id):
    with grpc.insecure_channel(server.target) as channel:
        stub = memories_pb2_grpc.MemoriesStub(channel)
        call = stub.Stats.with_call
        with pytest.raises(grpc.RpcError) as info:
            call(memories_pb2.StatsRequest(bank="absent"), timeout=10,
                 metadata=(("authorization", f"Bearer {tenant.api_key}"), ("x-request-id", request_id)))
        echoed = dict(info.value.trailing_metadata() or ())["x-request-id"]
        assert echoed != request_id and len(echoed) == 16 and echoed.isalnum()


def _blob_with_zstd_body(declared_raw: int, body: bytes) -> bytes:
    """A memory blob (fp16, shape 1x1x1x2, no positions beyond one byte) whose header says
    ``declared_raw`` raw bytes and whose body is ``body``; the CRC is valid."""
    fixed = struct.Struct("<4sHBBHHHHIIIBB")
    fp = b"f" * 16
    head = fixed.pack(b"M3KV", 1, 0, 0x01, 1, 1, 1, 2, 0, len(body), declared_raw, len(fp), 0)
    out = head + fp + body
    return out + struct.pack("<I", zlib.crc32(out))


def test_a_zstd_frame_that_declares_another_size_is_refused_before_decompressing():
    raw_size = 1 + 2 * 2 * 2  # one position byte + K and V of head dim 2 in fp16
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * (512 * 1024 * 1024 // 64))  # declares 8 MiB
    with pytest.raises(CodecError, match="zstd frame declares"):
        read_header(_blob_with_zstd_body(raw_size, bomb))
    honest = zstandard.ZstdCompressor().compress(b"\x00" * raw_size)
    assert read_header(_blob_with_zstd_body(raw_size, honest)).raw_size == raw_size
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00" * raw_size)
    with pytest.raises(CodecError, match="declares no size"):
        read_header(_blob_with_zstd_body(raw_size, unsized))


def test_the_server_refuses_a_decompression_bomb_on_write(server, tenant):
    """16 KB on the wire that would make every reader allocate 512 MiB: refused at Write."""
    raw_size = 1 + 2 * 2 * 2
    bomb = _blob_with_zstd_body(raw_size, zstandard.ZstdCompressor().compress(b"\x00" * (512 * 1024 * 1024)))
    assert len(bomb) < 32_768
    with Client(server.target, tenant.api_key) as client:
        client.create_bank(BankInfo("bombs", "f" * 16, MemorySpec((0,), 1, 2, 1), "client", 8, "l2"))
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "zstd frame declares"):
            client.write("bombs", [Reference("b", "t", embedding=[1.0] * 8, memory=bomb)])
        assert client.stats("bombs").references == 0


def test_a_codebook_whose_fingerprint_is_not_utf8_is_a_codebook_error(server, tenant):
    from memory3.core.codebook_format import _CRC, _HEADER

    dim, layers, heads, m = 4, 1, 1, 2
    fp = b"\xff\xfe" + b"f" * 14
    head = _HEADER.pack(b"M3PQ", 1, 1, layers, heads, dim, 256, m, 0, len(fp)) + fp
    arrays = np.zeros(layers * 2 * heads * dim + 2 * dim * dim + 2 * 256 * dim, "<f4").tobytes()
    blob = head + arrays
    blob += _CRC.pack(zlib.crc32(blob))
    with pytest.raises(CodebookError, match="UTF-8"):
        read_codebook(blob)
    with Client(server.target, tenant.api_key) as client:
        _bank(client, "cb")
        with expect_status(grpc.StatusCode.INVALID_ARGUMENT, "UTF-8"):
            client.put_codebook("cb", blob)
