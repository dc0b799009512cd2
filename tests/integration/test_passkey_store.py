"""The credential registry against real Redis: sealing, compare-and-set counters, the
durability check, single-use transaction grants, and the operator CLI (export, import,
list, revoke with its audit record, reseal after a key rotation)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from authz.audit.testing import dev_mac_settings
from authz.core.session import Evidence, Grant, user_key
from authz.store.connections import EmbeddedValkey
from authz.store.credentials import Credential, RedisCredentialStore, TransactionGrant, with_use
from authz.store.crypto import FieldCipher

pytestmark = pytest.mark.integration

ISS = "https://idp.example"


def _cred(n: int, subject: str = "alice", **kw: Any) -> Credential:
    base: dict[str, Any] = dict(
        credential_id=bytes([n]) * 16,
        public_key=b"\xa5\x01\x02" + bytes([n]),
        sign_count=1,
        aaguid="2fc0579f-8113-47ea-b116-bb5a8db9202a",
        issuer=ISS,
        subject=subject,
        rp_id="bank.example",
        created_at=100 + n,
    )
    base.update(kw)
    return Credential(**base)


@pytest.fixture
async def store(redis_url: str, redis_prefix: str) -> Any:
    client = aioredis.Redis.from_url(redis_url)
    yield RedisCredentialStore(
        client,
        prefix=redis_prefix,
        deadline_ms=2000,
        cipher=FieldCipher.generate(),
        max_credentials=3,
    )
    await client.aclose()


async def test_add_list_get_remove_and_limits(store: RedisCredentialStore) -> None:
    uk = user_key(ISS, "alice")
    assert await store.add(uk, _cred(1)) == 1
    assert await store.add(uk, _cred(1)) == -1  # the same credential twice
    assert await store.add(uk, _cred(2)) == 1 and await store.add(uk, _cred(3)) == 1
    assert await store.add(uk, _cred(4)) == -2  # max_credentials
    assert [c.credential_id[0] for c in await store.credentials(uk)] == [1, 2, 3]
    got = await store.get(uk, _cred(2).credential_id)
    assert got is not None and got[0] == _cred(2)
    removed = await store.remove(uk, _cred(2).credential_id)
    assert removed == _cred(2) and await store.remove(uk, _cred(2).credential_id) is None
    assert await store.get(user_key(ISS, "bob"), _cred(1).credential_id) is None


async def test_nothing_readable_in_redis_and_a_moved_record_is_not_evidence(
    store: RedisCredentialStore, redis_url: str
) -> None:
    alice, bob = user_key(ISS, "alice"), user_key(ISS, "bob")
    await store.add(alice, _cred(1))
    raw = aioredis.Redis.from_url(redis_url)
    try:
        values = await raw.hgetall(store.registry_key(alice))
        [(handle, sealed)] = values.items()
        assert b"alice" not in sealed and b"2fc0579f" not in sealed and sealed.startswith(b"v1.")
        # Someone with redis-cli copies alice's key into bob's registry: it does not open.
        await raw.hset(store.registry_key(bob), handle, sealed)
    finally:
        await raw.aclose()
    assert await store.credentials(bob) == []
    assert await store.get(bob, _cred(1).credential_id) is None


async def test_the_counter_moves_only_from_the_value_read(store: RedisCredentialStore) -> None:
    uk = user_key(ISS, "alice")
    await store.add(uk, _cred(1))
    got = await store.get(uk, _cred(1).credential_id)
    assert got is not None
    cred, sealed = got
    a = with_use(cred, sign_count=5, backup_state=False, now=200)
    b = with_use(cred, sign_count=6, backup_state=False, now=201)
    results = await asyncio.gather(store.advance(uk, sealed, a), store.advance(uk, sealed, b))
    assert sorted(results) == [False, True]  # two assertions raced: one wins
    after = await store.get(uk, cred.credential_id)
    assert after is not None and after[0].sign_count in (5, 6)


async def test_a_transaction_grant_is_taken_once(store: RedisCredentialStore) -> None:
    uk, sk, digest = user_key(ISS, "alice"), "ab" * 20, "cd" * 32
    grant = Grant("wire", Evidence("phr", ("hwk",), 1000), expires_at=1100, issued_at=1000)
    await store.put_transaction_grant(uk, sk, TransactionGrant(grant, digest), now=1000)
    assert await store.consume_transaction_grant(uk, sk, "other-level", digest, 1001) is None
    # The wrong-level read consumed it: a transaction grant is burnt by any presentation.
    await store.put_transaction_grant(uk, sk, TransactionGrant(grant, digest), now=1000)
    got = await asyncio.gather(
        *(store.consume_transaction_grant(uk, sk, "wire", digest, 1001) for _ in range(5))
    )
    assert [g is not None for g in got].count(True) == 1
    with pytest.raises(ValueError):
        await store.put_transaction_grant(uk, sk, TransactionGrant(grant, digest), now=1200)


async def test_durability_is_read_from_the_server() -> None:
    """A private Valkey whose settings the test may change (never the shared Redis)."""
    server = EmbeddedValkey()
    url = await asyncio.to_thread(server.start)
    client = aioredis.Redis.from_url(url)
    try:
        s = RedisCredentialStore(
            client, prefix="t:", deadline_ms=2000, cipher=FieldCipher.generate()
        )
        await client.config_set("appendonly", "no")
        await client.config_set("save", "")
        d = await s.durability()
        assert not d.ok and any("no persistence" in p for p in d.problems)
        await client.config_set("save", "3600 1")
        d = await s.durability()
        assert d.rdb and any("RDB snapshots only" in p for p in d.problems)
        await client.config_set("appendonly", "yes")
        await client.config_set("maxmemory-policy", "allkeys-lru")
        d = await s.durability()
        assert d.aof and d.problems == ("maxmemory-policy allkeys-lru may evict credentials",)
        await client.config_set("maxmemory-policy", "volatile-lru")  # only keys with a TTL
        assert (await s.durability()).ok
    finally:
        await client.aclose()
        await asyncio.to_thread(server.stop)


def _settings(tmp: Path, redis_url: str, prefix: str, keys: dict[str, str], active: str) -> Path:
    doc = {
        "policy_file": "policy.yaml",
        "redis": {"url": redis_url, "key_prefix": prefix},
        "oidc": {"issuer": ISS, "client_id": "c", "audience": "a"},
        "crypto": {"keys": keys, "active_kid": active},
        "audit": {"enabled": True, "stream_key": f"{prefix}audit", **dev_mac_settings(tmp)},
    }
    path = tmp / f"settings-{active}.yaml"
    path.write_text(json.dumps(doc))
    return path


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "authz.cli",
        "passkeys",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def _key(tmp: Path, name: str) -> str:
    path = tmp / name
    path.write_bytes(base64.b64encode(os.urandom(32)))
    return str(path)


async def test_operator_cli_export_import_list_revoke_reseal(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    k1 = _key(tmp_path, "k1")
    conf = _settings(tmp_path, redis_url, redis_prefix, {"k1": k1}, "k1")
    cipher = FieldCipher.from_files({"k1": Path(k1)}, "k1")
    client = aioredis.Redis.from_url(redis_url)
    try:
        store = RedisCredentialStore(client, prefix=redis_prefix, deadline_ms=2000, cipher=cipher)
        alice = user_key(ISS, "alice")
        await store.add(alice, _cred(1))
        await store.add(user_key(ISS, "bob"), _cred(2, subject="bob"))
        out_file = tmp_path / "export.jsonl"
        rc, _out, err = await _cli("export", "--config", str(conf), "--out", str(out_file))
        assert rc == 0 and "exported 2" in err and (out_file.stat().st_mode & 0o077) == 0
        rc, out, _ = await _cli("list", "--config", str(conf), "--user", ISS, "alice")
        [row] = [json.loads(x) for x in out.splitlines()]
        assert row["credential_id"] == _cred(1).id_b64 and row["device_bound"]
        # Revoke: the audit record lands in the stream first, then the credential goes.
        rc, out, err = await _cli(
            "revoke",
            "--config",
            str(conf),
            "--user",
            ISS,
            "alice",
            "--credential-id",
            _cred(1).id_b64,
        )
        assert rc == 0, err
        assert await store.credentials(alice) == []
        entries = [json.loads(f[b"r"]) for _, f in await client.xrange(f"{redis_prefix}audit")]
        # The CLI writes as a producer of its own: announced, the record, a clean stop.
        (rec,) = [r for r in entries if not r["type"].startswith("audit.producer")]
        assert rec["type"] == "passkey.removed" and rec["removed_by"] == "operator:operator"
        assert rec["credential_id"] == _cred(1).id_b64
        rc, _out, err = await _cli(
            "revoke",
            "--config",
            str(conf),
            "--user",
            ISS,
            "alice",
            "--credential-id",
            _cred(1).id_b64,
        )
        assert rc == 1 and "no such credential" in err and "Traceback" not in err
        # Import the export back: alice's returns, bob's is already there.
        rc, out, _ = await _cli("import", "--config", str(conf), str(out_file))
        assert rc == 0 and "imported 1 credential(s); 1 already present" in out
        assert await store.credentials(alice) == [_cred(1)]
        # Rotate: k2 active, k1 still in the ring; reseal; then k1 can leave.
        k2 = _key(tmp_path, "k2")
        both = _settings(tmp_path, redis_url, redis_prefix, {"k1": k1, "k2": k2}, "k2")
        rc, out, _ = await _cli("reseal", "--config", str(both))
        assert rc == 0 and "resealed 2" in out
        only_k2 = FieldCipher.from_files({"k2": Path(k2)}, "k2")
        store2 = RedisCredentialStore(client, prefix=redis_prefix, deadline_ms=2000, cipher=only_k2)
        assert await store2.credentials(alice) == [_cred(1)]
        # A broken import line is refused with its line number, no traceback.
        bad = tmp_path / "bad.jsonl"
        bad.write_text(out_file.read_text().splitlines()[0] + '\n{"v": 1}\n')
        rc, _out, err = await _cli("import", "--config", str(conf), str(bad))
        assert rc == 1 and "bad.jsonl:2" in err and "Traceback" not in err
    finally:
        await client.aclose()


async def test_the_cli_refuses_settings_it_cannot_read_the_registry_with(tmp_path: Path) -> None:
    conf = tmp_path / "s.yaml"
    conf.write_text(
        json.dumps(
            {
                "policy_file": "p.yaml",
                "redis": {"url": "redis://127.0.0.1:1"},
                "oidc": {"issuer": ISS, "client_id": "c", "audience": "a"},
            }
        )
    )
    rc, _out, err = await _cli("list", "--config", str(conf))
    assert rc == 1 and "crypto.keys" in err and "Traceback" not in err
