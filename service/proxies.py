"""The Proxies service: a registry of proxy policies (Publish, Get, List), scoped to the tenant.

A proxy reads one LLM's hidden states, so it is only valid for the model it was trained on:
Get refuses (FAILED_PRECONDITION) when the caller's model fingerprint differs from the proxy's.
Weights are safetensors; the service checks the size, the sha256 the client announced, and that
the bytes start with a well-formed safetensors header (it does not parse tensors)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import uuid

from memory3.v1 import proxies_pb2, proxies_pb2_grpc

from .auth import Authenticator
from .bank_store import check_bank_name
from .config import Settings
from .convert import timestamp
from .db import discard_quietly
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted, rpc
from .offload import CpuPool
from .proxy_store import ProxyRecord, ProxyStore
from .quotas import QuotaStore
from .tokens import Tokens
from .trajectories import check_fingerprint


SAFETENSORS_MAX_HEADER = 1024 * 1024  # a proxy's header lists tens of tensors (a few KiB); JSON parsing holds the GIL
UPLOAD_PIECE_BYTES = 4 * 1024 * 1024


def safetensors_header_length(head: bytes) -> int:
    """From the first 8 bytes: the JSON header's length (u64 little-endian), within our bound."""
    header_len = int.from_bytes(head[:8], "little")
    if header_len > SAFETENSORS_MAX_HEADER:
        raise InvalidArgument(f"weights' safetensors header of {header_len} bytes exceeds {SAFETENSORS_MAX_HEADER}")
    return header_len


def check_safetensors(head: bytes, total: int) -> None:
    """The safetensors layout: u64 little-endian header length, then a JSON object header.
    ``head`` holds at least the first 8 + header-length bytes of a file of ``total`` bytes."""
    if total < 8:
        raise InvalidArgument("weights are not a safetensors file: shorter than its 8-byte header length")
    header_len = safetensors_header_length(head)
    if header_len > total - 8:
        raise InvalidArgument("weights are not a safetensors file: header length exceeds the file")
    try:
        header = json.loads(bytes(head[8 : 8 + header_len]))
    except (UnicodeDecodeError, ValueError):
        raise InvalidArgument("weights are not a safetensors file: header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidArgument("weights are not a safetensors file: header is not a JSON object")


def info_to_proto(record: ProxyRecord) -> proxies_pb2.ProxyInfo:
    return proxies_pb2.ProxyInfo(
        name=record.name, version=record.version, model_fingerprint=record.model_fingerprint,
        parent_version=record.parent_version, metrics=record.metrics, config_json=record.config_json,
        weights_size=record.weights_size, weights_sha256=record.weights_sha256,
        created_at=timestamp(record.created_at),
    )


def record_from_info(info: proxies_pb2.ProxyInfo, max_bytes: int) -> ProxyRecord:
    _check_name(info.name)
    check_fingerprint(info.model_fingerprint, f"proxy {info.name!r}")
    if info.parent_version < 0:
        raise InvalidArgument("parent_version must not be negative")
    if info.weights_size == 0:
        raise InvalidArgument("weights_size is required (the size of the whole safetensors file)")
    if info.weights_size > max_bytes:
        raise ResourceExhausted(f"proxy weights of {info.weights_size} bytes exceed the limit of {max_bytes}")
    if len(info.weights_sha256) != 32:
        raise InvalidArgument("weights_sha256 must be the 32-byte sha256 of the weights")
    metrics = dict(info.metrics)
    for name, value in metrics.items():
        if not name or not math.isfinite(value):
            raise InvalidArgument(f"metric {name!r} must be named and finite, got {value}")
    config_json = info.config_json or "{}"
    try:
        config = json.loads(config_json)
    except ValueError:
        raise InvalidArgument("config_json is not valid JSON") from None
    if not isinstance(config, dict):
        raise InvalidArgument("config_json must be a JSON object")
    return ProxyRecord(
        info.name, 0, info.model_fingerprint, info.parent_version, metrics, config_json,
        info.weights_size, bytes(info.weights_sha256),
    )


def _check_name(name: str) -> None:
    """Proxy names follow the bank-name rule (letters, digits, '_', '.', '-')."""
    try:
        check_bank_name(name)
    except InvalidArgument:
        raise InvalidArgument("proxy name must be 1-128 characters of letters, digits, '_', '.', '-'") from None


class ProxiesServicer(proxies_pb2_grpc.ProxiesServicer):
    def __init__(
        self, settings: Settings, auth: Authenticator, store: ProxyStore, quotas: QuotaStore, cpu: CpuPool,
        tokens: Tokens,
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.quotas = quotas
        self.cpu = cpu
        self.auth = auth
        self.store = store

    @rpc
    async def Publish(self, request_iterator, context):
        """Weights are hashed as they arrive and staged in the database a few MiB at a time; only
        the safetensors header (bounded) is kept to be checked, so a call holds little memory."""
        tenant_id = await self.auth.tenant(context)
        await self.quotas.check_storage(tenant_id)
        record: ProxyRecord | None = None
        upload_id, pieces, received = uuid.uuid4(), 0, 0
        digest, head, pending = hashlib.sha256(), bytearray(), bytearray()
        try:
            async for message in request_iterator:
                kind = message.WhichOneof("item")
                if record is None:
                    if kind != "info":
                        raise InvalidArgument("the first Publish message must carry the proxy's info")
                    record = record_from_info(message.info, self.settings.max_proxy_bytes)
                    await self.quotas.check_storage(tenant_id, record.weights_size)
                elif kind == "info":
                    raise InvalidArgument("one Publish stream publishes one proxy")
                chunk = message.weights_chunk
                received += len(chunk)
                if received > record.weights_size:
                    raise InvalidArgument(f"more weight bytes than weights_size ({record.weights_size})")
                await self.cpu.run(digest.update, chunk)
                if len(head) < 8 or len(head) < 8 + safetensors_header_length(head):
                    head += chunk[: 8 + SAFETENSORS_MAX_HEADER - len(head)]
                pending += chunk
                if len(pending) >= UPLOAD_PIECE_BYTES:
                    await self.store.stage_chunk(upload_id, pieces, bytes(pending))
                    pieces, pending = pieces + 1, bytearray()
            if record is None:
                raise InvalidArgument("empty Publish stream")
            if received != record.weights_size:
                raise InvalidArgument(f"weights_size says {record.weights_size} bytes, stream carried {received}")
            if digest.digest() != record.weights_sha256:
                raise InvalidArgument("weights do not match weights_sha256 (corrupted in transit?)")
            await self.cpu.run(check_safetensors, bytes(head), received)
            if pending:
                await self.store.stage_chunk(upload_id, pieces, bytes(pending))
                pieces += 1
            stored, _ = await self.store.publish(tenant_id, record, upload_id)
        except BaseException:
            if pieces:
                await asyncio.shield(discard_quietly(self.store.discard_upload(upload_id), "Publish"))
            raise
        return info_to_proto(stored)

    @rpc
    async def Get(self, request, context):
        tenant_id = await self.auth.tenant(context)
        _check_name(request.name)
        check_fingerprint(request.model_fingerprint, "Get")
        if request.version < 0:
            raise InvalidArgument("version must not be negative (0: the latest)")
        record = await self.store.get(tenant_id, request.name, request.version)
        if record.model_fingerprint != request.model_fingerprint:
            raise FailedPrecondition(
                f"proxy {record.name!r} version {record.version} was trained for model {record.model_fingerprint!r},"
                f" not {request.model_fingerprint!r}"
            )
        chunk = self.settings.chunk_bytes
        first = await self.store.weights_chunk(tenant_id, record, 0, chunk) if request.include_weights else b""
        yield proxies_pb2.ProxyFrame(info=info_to_proto(record), weights_chunk=first)
        if request.include_weights:
            for offset in range(chunk, record.weights_size, chunk):
                piece = await self.store.weights_chunk(tenant_id, record, offset, chunk)
                yield proxies_pb2.ProxyFrame(weights_chunk=piece)

    @rpc
    async def List(self, request, context):
        tenant_id = await self.auth.tenant(context)
        if request.name:
            _check_name(request.name)
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        kind = f"proxies:{request.name}"  # a token continues the listing it came from, same name filter
        after = self.tokens.open(tenant_id, kind, request.page_token, "page_token")
        records, token = await self.store.list(tenant_id, request.name, request.page_size, after)
        return proxies_pb2.ListProxiesResponse(proxies=[info_to_proto(r) for r in records],
                                               next_page_token=self.tokens.seal(tenant_id, kind, token))
