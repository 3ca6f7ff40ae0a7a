"""The tenant store's key handling, against the session's real PostgreSQL, beside the end-to-end
isolation tests: what a key is made of, what is stored of it, and how revocation is remembered.

Written against the survivors of the mutation run on ``service/tenant_store.py`` (docs/mutation.md):
the secret's length (a shorter secret is a weaker key), the label's bound, the revoke answer the
admin RPC returns, ``revoked_here`` — the check that ends a running stream whose key this
process revoked — which must name exactly the revoked key and forget none of the keys revoked
before it, the notice that tells other processes, and a key cache that holds more than one key.
"""

from __future__ import annotations

import hashlib
import secrets

import psycopg
import pytest

from conftest import make_settings
from memory3.service.db import create_engine_for
from memory3.service.embedded_pg import libpq_url
from memory3.service.errors import NotFound, Unauthenticated
from memory3.service.tenant_store import KEY_PATTERN, TenantStore


@pytest.fixture
async def store(database_url, server):  # the server fixture migrated the database
    settings = make_settings(database_url)
    engine = create_engine_for(settings.database_url, settings)
    yield TenantStore(engine, key_cache_seconds=60.0)
    await engine.dispose()


async def test_an_issued_key_is_a_256_bit_secret_of_which_only_the_hash_is_stored(store, database_url):
    name = "ts-" + secrets.token_hex(4)
    await store.create(name)
    key_id, key = await store.issue_key(name, label="x" * 300)
    key_part, secret = KEY_PATTERN.fullmatch(key).groups()
    assert key_part == key_id and len(bytes.fromhex(key_id)) == 8
    assert len(secret) == 43  # token_urlsafe(32): 32 random bytes, base64url without padding
    with psycopg.connect(libpq_url(database_url)) as conn:
        stored_hash, label = conn.execute("SELECT secret_hash, label FROM api_keys WHERE key_id = %s",
                                          (key_id,)).fetchone()
    assert bytes(stored_hash) == hashlib.sha256(secret.encode()).digest()
    assert label == "x" * 200  # labels are bounded, not refused
    assert await store.tenant_for_key(key) > 0


async def test_revoked_here_names_exactly_the_revoked_keys(store):
    name = "ts-" + secrets.token_hex(4)
    await store.create(name)
    issued = [await store.issue_key(name) for _ in range(3)]
    assert not any(store.revoked_here(key) for _, key in issued)
    assert await store.revoke_key(issued[0][0]) is True  # the admin RPC answers revoked=true with it
    assert await store.revoke_key(issued[1][0]) is True
    assert [store.revoked_here(key) for _, key in issued] == [True, True, False]
    with pytest.raises(NotFound):  # a second revoke of the same key
        await store.revoke_key(issued[0][0])
    for _, key in issued[:2]:
        with pytest.raises(Unauthenticated):
            await store.tenant_for_key(key)
    assert await store.tenant_for_key(issued[2][1]) > 0


async def test_a_revoke_tells_every_other_process_and_a_failed_one_tells_none(store, database_url):
    """Other service processes learn of a revocation from the notice its transaction sends
    (service/invalidation.py); a revoke of an unknown key sends nothing."""
    from memory3.service.invalidation import CHANNEL

    name = "ts-" + secrets.token_hex(4)
    await store.create(name)
    key_id, _ = await store.issue_key(name)
    async with await psycopg.AsyncConnection.connect(libpq_url(database_url), autocommit=True) as listener:
        await listener.execute(f"LISTEN {CHANNEL}")
        with pytest.raises(NotFound):
            await store.revoke_key("0" * 16)
        await store.revoke_key(key_id)
        heard = [n.payload async for n in listener.notifies(timeout=2.0)]
    assert [p for p in heard if p.startswith("key:")] == [f"key:{key_id}"]


async def test_the_key_cache_holds_every_recent_key(store, database_url):
    """Verified keys are cached for key_cache_seconds each, not only the last one: two keys
    revoked straight in the database (as another process's revocation whose notice was missed)
    both still resolve from the cache."""
    name = "ts-" + secrets.token_hex(4)
    await store.create(name)
    issued = [await store.issue_key(name) for _ in range(3)]
    tenant = [await store.tenant_for_key(key) for _, key in issued]
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = ANY(%s)", ([k for k, _ in issued],))
    assert [await store.tenant_for_key(key) for _, key in issued] == tenant
    store.forget_all()
    with pytest.raises(Unauthenticated):
        await store.tenant_for_key(issued[0][1])
