"""The client's transport: one gRPC channel, its retry policy, deadlines, and stream helpers.

Unary calls that are idempotent retry on UNAVAILABLE (and on RESOURCE_EXHAUSTED when the server
sends ``grpc-retry-pushback-ms``) through gRPC's own retry policy. Client streams (Write, Log,
Publish) are re-sent whole by :meth:`Transport.retry_stream`: the service makes each one atomic and
idempotent, so a repeat either finds the first attempt committed or commits it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc

from memory3.v1 import banks_pb2_grpc, memories_pb2_grpc, proxies_pb2_grpc, tenants_pb2_grpc, trajectories_pb2_grpc

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 1024 * 1024  # memories, codebooks and proxies travel in chunks of this size

_RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],  # the latter only helps when the server is busy
}
_IDEMPOTENT = {
    "memory3.v1.Banks": ["CreateBank", "GetBank", "ListBanks", "GetCodebook"],
    "memory3.v1.Memories": ["Retrieve", "RetrieveBatch", "Fetch", "Delete", "Stats"],
    "memory3.v1.Trajectories": ["AttachReward", "Read", "Count"],
    "memory3.v1.Proxies": ["Get", "List"],
}
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {"name": [{"service": s, "method": m} for s, ms in _IDEMPOTENT.items() for m in ms], "retryPolicy": _RETRY_POLICY}
        ]
    }
)


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", SERVICE_CONFIG),
    ]


def _lost_in_transit(err: grpc.aio.AioRpcError) -> bool:
    """A stream whose connection broke while this client was sending (the server crashed, say):
    gRPC's core reports it as INTERNAL "Internal error from Core" — not an answer of the server,
    which never sent one, so an idempotent stream is re-sent like after UNAVAILABLE."""
    return err.code() == grpc.StatusCode.INTERNAL and "from Core" in (err.details() or "")


def pushback_seconds(err: grpc.aio.AioRpcError) -> float | None:
    """The server's retry advice for a busy refusal (RESOURCE_EXHAUSTED + grpc-retry-pushback-ms)."""
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-retry-pushback-ms":
            return int(value) / 1000
    return None


def channel_credentials(tls: bool = False, ca_file: str | Path | None = None) -> grpc.ChannelCredentials | None:
    """TLS credentials when ``tls`` or a CA file is given (the CA file: a server certificate the
    system does not trust, e.g. self-signed); None for plain gRPC."""
    if not tls and not ca_file:
        return None
    return grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes() if ca_file else None)


def open_channel(target: str, tls: bool = False, ca_file: str | Path | None = None) -> grpc.aio.Channel:
    credentials = channel_credentials(tls, ca_file)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=channel_options())
    return grpc.aio.secure_channel(target, credentials, options=channel_options())


class Transport:
    """A channel to one service with the caller's key; the stubs of every service on it."""

    def __init__(
        self,
        target: str,
        api_key: str,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        write_retries: int = 5,
        timeout: float | None = 60.0,
        tls: bool = False,
        ca_file: str | Path | None = None,
    ) -> None:
        self.target = target
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self.chunk_bytes = chunk_bytes
        self.write_retries = write_retries
        self.timeout = timeout
        self.channel = open_channel(target, tls, ca_file)
        self.banks = banks_pb2_grpc.BanksStub(self.channel)
        self.memories = memories_pb2_grpc.MemoriesStub(self.channel)
        self.tenants = tenants_pb2_grpc.TenantsStub(self.channel)
        self.trajectories = trajectories_pb2_grpc.TrajectoriesStub(self.channel)
        self.proxies = proxies_pb2_grpc.ProxiesStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _call(self, **extra):
        return {"metadata": self._metadata, "timeout": self.timeout, **extra}

    async def client_stream(self, method, messages: Iterable):
        """Send ``messages`` on one client-streaming call and return its answer."""
        call = method(**self._call())
        try:
            for message in messages:
                await call.write(message)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the server ended the call early (e.g. refused a message): its status says why
        return await call

    async def retry_stream(self, make_call: Callable[[], Awaitable]):
        """Run an idempotent stream call, re-sending it whole on UNAVAILABLE or a busy refusal."""
        for attempt in range(self.write_retries + 1):
            try:
                return await make_call()
            except grpc.aio.AioRpcError as err:
                pushback = pushback_seconds(err)
                retryable = err.code() == grpc.StatusCode.UNAVAILABLE or pushback is not None or _lost_in_transit(err)
                if not retryable or attempt == self.write_retries:
                    raise
                await asyncio.sleep(pushback if pushback is not None else min(0.1 * 2**attempt, 2.0))
        raise AssertionError("unreachable")
