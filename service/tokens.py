"""Page tokens and cursors: opaque to clients, bound to the tenant that received them.

A ListBanks or ListProxies page token and a trajectory Read cursor carry where the next page
starts (a bank name, a proxy's name and version, an episode's sequence number shared by all
tenants). Sent as they are, they would show one tenant how busy the others are and accept any
string. Here each is encrypted and authenticated (Fernet: AES-CBC + HMAC) together with the
tenant's id and the kind of token, under a key derived from the admin key, so every replica
issues and accepts the same tokens and a restart keeps them valid. A forged, altered, foreign
(another tenant's) or other-kind token is INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken

from .errors import InvalidArgument


class Tokens:
    def __init__(self, secret: str) -> None:
        key = hashlib.sha256(b"memory3 page tokens\0" + secret.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, tenant_id: int, kind: str, value: str) -> str:
        """An opaque token for ``value`` (empty stays empty: no next page)."""
        if not value:
            return ""
        return self._fernet.encrypt(f"{tenant_id}\0{kind}\0{value}".encode()).decode()

    def open(self, tenant_id: int, kind: str, token: str, field: str) -> str:
        """The value sealed in ``token`` for this tenant and kind ("" for no token)."""
        if not token:
            return ""
        try:
            tenant, sealed_kind, value = self._fernet.decrypt(token.encode()).decode().split("\0", 2)
        except (InvalidToken, ValueError, UnicodeError):
            raise InvalidArgument(f"{field} is not one this service issued (pass the last reply's back unchanged)") from None
        if tenant != str(tenant_id) or sealed_kind != kind:
            raise InvalidArgument(f"{field} was issued for another listing (pass the last reply's back unchanged)")
        return value
