"""Who is calling: the ``authorization`` metadata (``Bearer <key>``) names either
the admin (key from configuration) or a tenant (key issued by the Tenants service)."""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

import grpc

from .errors import PermissionDenied, Unauthenticated
from .tenant_store import TenantStore


def _presented_key(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            scheme, _, key = value.strip().partition(" ")
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

    async def tenant(self, context: grpc.aio.ServicerContext) -> int:
        """The caller's tenant id; the admin key has no tenant and is refused here."""
        key = _presented_key(context)
        if self._is_admin(key):
            raise PermissionDenied("the admin key manages tenants; use a tenant's API key for data")
        return await self.tenants.tenant_for_key(key)

    async def require_admin(self, context: grpc.aio.ServicerContext) -> None:
        key = _presented_key(context)
        if self._is_admin(key):
            return
        await self.tenants.tenant_for_key(key)  # unknown keys stay UNAUTHENTICATED
        raise PermissionDenied("this RPC needs the admin key")


ADMIN_KEY_FILE = "admin.key"


def resolve_admin_key(configured: str | None, data_dir: Path) -> tuple[str, Path | None]:
    """The configured admin key or, when none is configured, the one kept in ``data_dir``
    (created on first start, readable only by its owner) so a fresh install can make tenants."""
    if configured:
        return configured, None
    path = Path(data_dir).expanduser() / ADMIN_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text("m3admin_" + secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip(), path
