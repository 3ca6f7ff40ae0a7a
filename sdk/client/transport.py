"""The client's transport: one gRPC channel, its retry policy, deadlines, and stream helpers.

Unary calls that are idempotent retry on UNAVAILABLE (and on RESOURCE_EXHAUSTED when the server
sends ``grpc-retry-pushback-ms``) through gRPC's own retry policy. Client streams (Write, Log,
Publish) are re-sent whole by :meth:`Transport.retry_stream`: the service makes each one atomic and
idempotent, so a repeat either finds the first attempt committed or commits it.

Any number of service processes: given several addresses ("host1:50051,host2:50051" or a list)
or a ``dns:///name:port`` target (every address of the name), the channel balances calls over
them with gRPC's round_robin policy (:func:`channel_target`); a process that goes away fails only
the calls it was serving, and their retries (above) go to the others. One plain ``host:port``
keeps gRPC's default (pick_first): it reconnects lazily, so a restarted server is found by the
next call rather than after a reconnection backoff.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
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
    "memory3.v1.Memories": ["Retrieve", "RetrieveBatch", "Fetch", "Delete", "Stats", "Scroll"],
    "memory3.v1.Trajectories": ["AttachReward", "Read", "Count", "Export"],
    "memory3.v1.Proxies": ["Get", "List"],
}
_METHOD_CONFIG = [
    {"name": [{"service": s, "method": m} for s, ms in _IDEMPOTENT.items() for m in ms], "retryPolicy": _RETRY_POLICY}
]
SERVICE_CONFIG = json.dumps({"methodConfig": _METHOD_CONFIG})
# Several service processes: every address in turn; a process that went away is retried for
# reconnection every 0.1 s doubling to 2 s (gRPC's default starts at 1 s and grows to 120 s).
BALANCED_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": _METHOD_CONFIG})
_BALANCED_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000)]


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES, balanced: bool = False) -> list[tuple[str, object]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", BALANCED_SERVICE_CONFIG if balanced else SERVICE_CONFIG),
        *(_BALANCED_OPTIONS if balanced else ()),
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


def _host_port(address: str) -> tuple[str, str]:
    host, colon, port = address.strip().rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f"service address {address.strip()!r} is not host:port")
    return host.strip("[]"), port


def channel_target(target: str | Sequence[str]) -> tuple[str, str | None]:
    """The gRPC target for one address or several, and the host name TLS must verify when the
    target names none (else None).

    One address (``host:port``, ``dns:///name:port``, any gRPC target) is used as it is (a
    ``dns:`` target's addresses are balanced and re-resolved when one goes away). Several
    (``"h1:p1,h2:p2"`` or a list of ``host:port``) become one ``ipv4:``/``ipv6:`` target; names
    among them are resolved now (to have them re-resolved later, give one ``dns:///`` name instead).
    """
    addresses = [a.strip() for a in (target.split(",") if isinstance(target, str) else target) if a.strip()]
    if not addresses:
        raise ValueError("no service address given")
    if len(addresses) == 1:
        return addresses[0], None
    resolved: list[tuple[int, str, str]] = []
    names = []
    for address in addresses:
        host, port = _host_port(address)
        try:
            ip = ipaddress.ip_address(host)
            resolved.append((ip.version, str(ip), port))
            continue
        except ValueError:
            names.append(host)
        found = {(info[0], info[4][0]) for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)}
        ipv4 = sorted(a for family, a in found if family == socket.AF_INET)
        picked = [(4, a) for a in ipv4] or sorted((6, a) for family, a in found if family == socket.AF_INET6)
        resolved += [(version, a, port) for version, a in picked]
    versions = {version for version, _, _ in resolved}
    if len(versions) != 1:
        raise ValueError(f"service addresses {addresses} mix IPv4 and IPv6; list addresses of one family")
    if versions == {4}:
        joined = ",".join(f"{ip}:{port}" for _, ip, port in dict.fromkeys(resolved))
        return f"ipv4:{joined}", (names[0] if names else None)
    joined = ",".join(f"[{ip}]:{port}" for _, ip, port in dict.fromkeys(resolved))
    return f"ipv6:{joined}", (names[0] if names else None)


def open_channel(target: str | Sequence[str], tls: bool = False, ca_file: str | Path | None = None) -> grpc.aio.Channel:
    """A channel to one service address or several (:func:`channel_target`), balanced round robin."""
    target, tls_name = channel_target(target)
    balanced = target.startswith(("ipv4:", "ipv6:", "dns:")) and ("," in target or target.startswith("dns:"))
    options = channel_options(balanced=balanced)
    credentials = channel_credentials(tls, ca_file)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    options += [("grpc.ssl_target_name_override", tls_name)] if tls_name else []
    return grpc.aio.secure_channel(target, credentials, options=options)


class Transport:
    """A channel to one service with the caller's key; the stubs of every service on it."""

    def __init__(
        self,
        target: str | Sequence[str],
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
