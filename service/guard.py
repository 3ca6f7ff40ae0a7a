"""The call guard: who may hold what, and for how long, decided for every RPC before its servicer runs.

* Authentication first: a call without a valid key is refused before it takes a slot, a database
  connection or any buffer, and its refusal never waits on the client.
* Admission: a cap on calls in flight for the whole server and one per tenant (quota
  ``concurrent_calls``), both RESOURCE_EXHAUSTED with retry pushback, so a tenant at its limit
  leaves the others' slots free.
* Deadlines: a stream waits at most ``stream_idle_seconds`` for its client's next message and for
  the client to take the next response; no call runs longer than ``max_call_seconds``.
* Revocation: streams re-check their key at every message through the key cache, so a revoked
  key ends running calls at once on this replica and within ``key_cache_seconds`` on others.
* Failed admin-key attempts are limited per client address.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time

import grpc

from .auth import Authenticator, Caller, presented_key
from .config import Settings
from .errors import DeadlineExceeded, PermissionDenied, ResourceExhausted, Unauthenticated
from .quotas import QuotaStore

ADMIN_PREFIX = "/memory3.v1.Tenants/"
PUSHBACK_MS = "100"
RECHECK_FLOOR_SECONDS = 0.25  # how often a stream re-verifies its key when the key cache is off


class AdminAttempts:
    """Failed admin-key attempts per client address in a sliding minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._failures: dict[str, collections.deque] = {}

    @staticmethod
    def address(peer: str) -> str:
        return (peer or "").rsplit(":", 1)[0]  # "ipv4:127.0.0.1:5301" -> "ipv4:127.0.0.1"

    def _recent(self, peer: str) -> collections.deque:
        failures = self._failures.setdefault(self.address(peer), collections.deque())
        while failures and time.monotonic() - failures[0] > 60:
            failures.popleft()
        return failures

    def check(self, peer: str) -> None:
        failures = self._recent(peer)
        if len(failures) >= self.per_minute:
            wait = int(60 - (time.monotonic() - failures[0])) + 1
            raise Unauthenticated(f"too many failed admin-key attempts from this address; retry in {wait} s")

    def fail(self, peer: str) -> None:
        if len(self._failures) > 10_000:
            self._failures.clear()
        self._recent(peer).append(time.monotonic())


class CallGuard:
    def __init__(self, settings: Settings, auth: Authenticator, quotas: QuotaStore) -> None:
        self.settings = settings
        self.auth = auth
        self.quotas = quotas
        self.in_flight = 0
        self.by_tenant: collections.Counter[int] = collections.Counter()
        self.admin_attempts = AdminAttempts(settings.admin_failures_per_minute)

    async def identify(self, method: str, metadata, peer: str) -> Caller:
        """The caller, or UNAUTHENTICATED / PERMISSION_DENIED (admin RPCs need the admin key)."""
        admin_rpc = method.startswith(ADMIN_PREFIX)
        if admin_rpc:
            self.admin_attempts.check(peer)
        try:
            caller = await self.auth.identify(presented_key(metadata))
            if admin_rpc and not caller.is_admin:
                raise PermissionDenied("this RPC needs the admin key")
        except (Unauthenticated, PermissionDenied):
            if admin_rpc:
                self.admin_attempts.fail(peer)
            raise
        return caller

    @contextlib.asynccontextmanager
    async def admitted(self, caller: Caller):
        """Hold one server slot and one of the tenant's slots for the call, or RESOURCE_EXHAUSTED."""
        tenant = caller.tenant_id
        # The quota is read first: from the checks below to the increments nothing awaits, so calls
        # arriving together cannot all pass a check before any of them is counted.
        limit = await self.quotas.limit(tenant, "concurrent_calls") if tenant is not None else None
        if self.in_flight >= self.settings.max_in_flight:
            raise ResourceExhausted(
                f"server busy ({self.in_flight} calls in flight); retry after {PUSHBACK_MS} ms"
            )
        if tenant is not None:
            if self.by_tenant[tenant] >= limit:
                raise ResourceExhausted(
                    f"quota 'concurrent_calls' reached: the tenant has {self.by_tenant[tenant]} calls in flight "
                    f"(limit {limit}); retry after {PUSHBACK_MS} ms"
                )
            self.by_tenant[tenant] += 1
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if tenant is not None:
                self.by_tenant[tenant] -= 1
                if not self.by_tenant[tenant]:
                    del self.by_tenant[tenant]

    async def recheck(self, caller: Caller, checked_at: list[float]) -> None:
        """Re-verify a running call's key (through the key cache; at most every few hundred ms)."""
        if caller.is_admin:
            return
        now = time.monotonic()
        if self.auth.tenants.revoked_here(caller.key) or now - checked_at[0] >= max(
            self.settings.key_cache_seconds, RECHECK_FLOOR_SECONDS
        ):
            try:
                await self.auth.identify(caller.key)
            except Unauthenticated:
                raise Unauthenticated("the API key was revoked while the call was running") from None
            checked_at[0] = now

    async def requests(self, raw_iterator, caller: Caller):
        """A request stream with an idle deadline per message and a key check at each message."""
        checked_at = [time.monotonic()]
        iterator = raw_iterator.__aiter__()
        while True:
            try:  # a timeout scope, not wait_for: no task per message
                async with asyncio.timeout(self.settings.stream_idle_seconds):
                    raw = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise DeadlineExceeded(
                    f"no request message for {self.settings.stream_idle_seconds:g} s; the stream was closed "
                    "(setting stream_idle_seconds)"
                ) from None
            await self.recheck(caller, checked_at)
            yield raw

    async def respond(self, context: grpc.aio.ServicerContext, responses, caller: Caller) -> None:
        """Send a response stream; a client that takes no message for the idle deadline is cut off."""
        checked_at = [time.monotonic()]
        first = True
        async with contextlib.aclosing(responses):
            async for response in responses:
                if not first:  # a write that did not wait still lets other calls run between messages
                    await asyncio.sleep(0)
                first = False
                await self.recheck(caller, checked_at)
                try:  # a timeout scope, not wait_for: no task per message
                    async with asyncio.timeout(self.settings.stream_idle_seconds):
                        await context.write(response)
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"the client took no response message for {self.settings.stream_idle_seconds:g} s "
                        "(setting stream_idle_seconds)"
                    ) from None
