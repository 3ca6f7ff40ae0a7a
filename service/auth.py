"""Who is calling: the ``authorization`` metadata (``Bearer <key>``) names either the admin (key
from configuration) or a tenant (key issued by the Tenants service).

The call guard identifies every caller once, before the call takes any resource, and keeps the
result in a context variable for the servicers: :meth:`Authenticator.tenant` and
:meth:`Authenticator.require_admin` read it (or identify the caller themselves when no guard ran)."""

from __future__ import annotations

import contextvars
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc

from .config import ADMIN_KEY_FILE
from .errors import PermissionDenied, Unauthenticated
from .tenant_store import TenantStore

MIN_ADMIN_KEY_CHARS = 32


@dataclass(frozen=True)
class Caller:
    key: str
    tenant_id: int | None  # None: the admin

    @property
    def is_admin(self) -> bool:
        return self.tenant_id is None


caller_var: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def presented_key(metadata) -> str:
    """The key of ``authorization: Bearer <key>``; UNAUTHENTICATED when absent or malformed."""
    for name, value in metadata or ():
        if name == "authorization":
            scheme, _, key = str(value).strip().partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise Unauthenticated("the 'authorization' metadata must be 'Bearer <key>'")
            return key.strip()
    raise Unauthenticated("missing API key: send it in the 'authorization' metadata")


class Authenticator:
    def __init__(self, tenants: TenantStore, admin_key: str | None) -> None:
        self.tenants = tenants
        self.admin_key = admin_key

    def _is_admin(self, key: str) -> bool:
        return bool(self.admin_key) and hmac.compare_digest(key.encode(), self.admin_key.encode())

    async def identify(self, key: str) -> Caller:
        """The admin or the tenant the key belongs to; UNAUTHENTICATED for unknown or revoked keys."""
        if self._is_admin(key):
            return Caller(key, None)
        return Caller(key, await self.tenants.tenant_for_key(key))

    async def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        caller = caller_var.get()
        if caller is None:
            caller = await self.identify(presented_key(context.invocation_metadata()))
        return caller

    async def tenant(self, context: grpc.aio.ServicerContext) -> int:
        """The caller's tenant id; the admin key has no tenant and is refused here."""
        caller = await self.caller(context)
        if caller.is_admin:
            raise PermissionDenied("the admin key manages tenants; use a tenant's API key for data")
        return caller.tenant_id

    async def require_admin(self, context: grpc.aio.ServicerContext) -> None:
        if not (await self.caller(context)).is_admin:
            raise PermissionDenied("this RPC needs the admin key")




def check_admin_key_strength(key: str) -> None:
    """A configured admin key must be long enough not to be guessed (the generated one is 51 characters)."""
    if len(key) < MIN_ADMIN_KEY_CHARS or len(set(key)) < 10:
        raise ValueError(
            f"the admin key must be at least {MIN_ADMIN_KEY_CHARS} characters with at least 10 distinct ones "
            "(generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )


def resolve_admin_key(configured: str | None, data_dir: Path) -> tuple[str, Path | None]:
    """The configured admin key or, when none is configured, the one kept in ``data_dir``
    (created on first start, readable only by its owner) so a fresh install can make tenants."""
    if configured:
        check_admin_key_strength(configured)
        return configured, None
    path = Path(data_dir).expanduser() / ADMIN_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text("m3admin_" + secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip(), path
