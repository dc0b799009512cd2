"""FieldCipher: AES-256-GCM values bound to their context, the keyring and rotation, keyed
hashes, key files and the ``crypto`` settings block."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import pytest

from authz.config.settings import CryptoSettings
from authz.errors import ConfigError
from authz.store.crypto import (
    FieldCipher,
    cipher_from_settings,
    ephemeral_key_env,
    parse_key,
)

A, B = os.urandom(32), os.urandom(32)
CTX = "stepup:u:{uk}:g:sk:high"


def ring(active: str = "a", previous: str | None = None) -> FieldCipher:
    return FieldCipher({"a": A, "b": B}, active, previous_kid=previous)


def test_round_trip_and_format() -> None:
    c = ring()
    token = c.encrypt(b"secret payload", CTX)
    version, kid, body = token.split(".")
    assert (version, kid) == ("v1", "a")
    assert b"secret" not in base64.b64decode(body)
    assert c.decrypt(token, CTX) == b"secret payload"
    assert c.decrypt(token.encode(), CTX) == b"secret payload"  # as Redis returns it
    assert c.decrypt_text(c.encrypt("é", CTX), CTX) == "é"
    assert c.decrypt(c.encrypt(b"", CTX), CTX) == b""


def test_random_nonces() -> None:
    c = ring()
    tokens = {c.encrypt(b"same", CTX) for _ in range(50)}
    assert len(tokens) == 50  # equal plaintexts are not linkable by their ciphertexts


def test_aad_binds_the_value_to_its_key_and_field() -> None:
    c = ring()
    token = c.encrypt(b"198.51.100.7", "P:u:{x}:ss#sk1#ip")
    assert c.decrypt(token, "P:u:{x}:ss#sk1#ip") == b"198.51.100.7"
    for moved in ("P:u:{x}:ss#sk1#device", "P:u:{x}:ss#sk2#ip", "P:u:{y}:ss#sk1#ip", ""):
        assert c.decrypt(token, moved) is None


@pytest.mark.parametrize("position", [0, 5, -1])
def test_tampering_fails(position: int) -> None:
    c = ring()
    token = c.encrypt(b"grant", CTX)
    head, body = token.rsplit(".", 1)
    blob = bytearray(base64.b64decode(body))
    blob[position] ^= 1
    forged = head + "." + base64.b64encode(bytes(blob)).decode()
    assert c.decrypt(forged, CTX) is None


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "v1.a",
        "v1.a.",
        "v1.a.!!!!",
        "v2.a.AAAA",
        "v1.a.AAAA",
        "v1.a.b.c",
        '{"v":1}',
        "v1.a." + "A" * 40,
    ],
)
def test_malformed_values_are_none(token: str) -> None:
    assert ring().decrypt(token, CTX) is None
    assert ring().decrypt(b"\xff\xfe" + token.encode(), CTX) is None


def test_unknown_kid_fails() -> None:
    token = ring().encrypt(b"x", CTX)
    assert FieldCipher({"b": B}, "b").decrypt(token, CTX) is None
    # Same key bytes under another kid: the kid is authenticated too.
    relabelled = "v1.b." + token.split(".", 2)[2]
    assert FieldCipher({"a": A, "b": A}, "b").decrypt(relabelled, CTX) is None


def test_rotation_old_kid_still_reads() -> None:
    before = FieldCipher({"a": A}, "a")
    old = before.encrypt(b"written under a", CTX)
    after = ring(active="b")
    new = after.encrypt(b"written under b", CTX)
    assert new.startswith("v1.b.")
    assert after.decrypt(old, CTX) == b"written under a"
    assert after.decrypt(new, CTX) == b"written under b"
    # Once a is retired from the ring, its data is corrupt (never evidence).
    assert FieldCipher({"b": B}, "b").decrypt(old, CTX) is None


def test_fingerprint_stable_scoped_and_key_dependent() -> None:
    c = ring()
    fp = c.fingerprint("device", "user1", "cookie:abc")
    assert fp == ring().fingerprint("device", "user1", "cookie:abc")  # stable across processes
    assert len(fp) == 22 and "cookie" not in fp
    others = {
        c.fingerprint("device", "user2", "cookie:abc"),  # another user: unlinkable
        c.fingerprint("ip", "user1", "cookie:abc"),  # another purpose
        c.fingerprint("device", "user1", "cookie:abd"),
        ring(active="b").fingerprint("device", "user1", "cookie:abc"),  # another key
    }
    assert fp not in others and len(others) == 4
    # It depends on the key bytes, not on the kid's name.
    assert FieldCipher({"z": A}, "z").fingerprint("device", "user1", "cookie:abc") == fp
    assert c.previous_fingerprint("device", "user1", "cookie:abc") is None


def test_previous_fingerprint_is_the_old_active_one() -> None:
    old = FieldCipher({"a": A}, "a")
    rotated = ring(active="b", previous="a")
    assert rotated.previous_fingerprint("ip", "u", "192.0.2.1") == old.fingerprint(
        "ip", "u", "192.0.2.1"
    )
    assert rotated.fingerprint("ip", "u", "192.0.2.1") != old.fingerprint("ip", "u", "192.0.2.1")


def test_encryption_and_lookup_keys_are_separate() -> None:
    # Both come from the same master key through HKDF with different labels: a fingerprint
    # reveals nothing usable as the AES key and vice versa (spot check: they differ).
    c = ring()
    assert c._mac["a"] != A
    assert len(c._mac["a"]) == 32


def test_keyring_validation() -> None:
    with pytest.raises(ValueError, match="empty"):
        FieldCipher({}, "a")
    with pytest.raises(ValueError, match="not in the keyring"):
        FieldCipher({"a": A}, "b")
    with pytest.raises(ValueError, match="32 bytes"):
        FieldCipher({"a": A[:16]}, "a")
    with pytest.raises(ValueError, match="must match"):
        FieldCipher({"a.b": A}, "a.b")  # a dot would break the value format
    with pytest.raises(ValueError, match="previous"):
        FieldCipher({"a": A}, "a", previous_kid="a")


def test_parse_key_raw_and_base64() -> None:
    assert parse_key(A) == A
    assert parse_key(base64.b64encode(A) + b"\n") == A
    assert parse_key(base64.urlsafe_b64encode(A).rstrip(b"=")) == A
    for bad in (b"", b"short", base64.b64encode(A[:16]), b"\x00" * 33, b"not base64 at all!!"):
        with pytest.raises(ConfigError):
            parse_key(bad)


def test_from_files(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(base64.b64encode(A) + b"\n")
    (tmp_path / "b").write_bytes(B)
    c = FieldCipher.from_files({"a": tmp_path / "a", "b": tmp_path / "b"}, "b", previous_kid="a")
    assert (c.active_kid, c.kids, c.ephemeral) == ("b", ("a", "b"), False)
    assert c.decrypt(FieldCipher({"a": A}, "a").encrypt(b"x", CTX), CTX) == b"x"
    with pytest.raises(ConfigError, match="cannot read"):
        FieldCipher.from_files({"a": tmp_path / "missing"}, "a")


def test_settings_block(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "k1").write_bytes(A)
    s = CryptoSettings(keys={"k1": tmp_path / "k1"}, active_kid="k1", require=True)
    assert cipher_from_settings(s).active_kid == "k1"
    with pytest.raises(ValueError, match="require"):
        CryptoSettings(require=True)
    with pytest.raises(ValueError, match="active_kid"):
        CryptoSettings(keys={"k1": tmp_path / "k1"})
    with pytest.raises(ValueError, match=r"not in crypto\.keys"):
        CryptoSettings(keys={"k1": tmp_path / "k1"}, active_kid="k2")
    with pytest.raises(ValueError, match="previous_kid"):
        CryptoSettings(keys={"k1": tmp_path / "k1"}, active_kid="k1", previous_kid="k1")
    with pytest.raises(ValueError, match="key ids"):
        CryptoSettings(keys={"k.1": tmp_path / "k1"}, active_kid="k.1")
    with caplog.at_level(logging.WARNING, logger="authz.crypto"):
        dev = cipher_from_settings(CryptoSettings())
    assert dev.ephemeral and "NO ENCRYPTION KEY" in caplog.text


def test_workers_can_share_one_ephemeral_key() -> None:
    env = ephemeral_key_env()
    one, two = (cipher_from_settings(CryptoSettings(), env) for _ in range(2))
    assert one.ephemeral and two.decrypt(one.encrypt(b"x", CTX), CTX) == b"x"
    alone = cipher_from_settings(CryptoSettings(), {})
    assert alone.decrypt(one.encrypt(b"x", CTX), CTX) is None
    with pytest.raises(ConfigError):
        cipher_from_settings(CryptoSettings(), {"STEPUP_CRYPTO_EPHEMERAL_KEY": "short"})


def test_settings_file_resolves_key_paths(tmp_path: Path) -> None:
    from authz.config.settings import load_settings

    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "2025-06").write_bytes(A)
    (tmp_path / "settings.yaml").write_text(
        "policy_file: policy.yaml\n"
        "oidc: {issuer: 'https://idp.example', client_id: c, audience: a}\n"
        "crypto: {keys: {'2025-06': keys/2025-06}, active_kid: '2025-06', require: true}\n"
    )
    s = load_settings(tmp_path / "settings.yaml", env={})
    assert s.crypto.keys == {"2025-06": tmp_path / "keys" / "2025-06"}
    assert cipher_from_settings(s.crypto).active_kid == "2025-06"
    (tmp_path / "settings.yaml").write_text(
        "policy_file: policy.yaml\n"
        "oidc: {issuer: 'https://idp.example', client_id: c, audience: a}\n"
        "crypto: {require: true}\n"
    )
    with pytest.raises(ConfigError, match="require"):
        load_settings(tmp_path / "settings.yaml", env={})
