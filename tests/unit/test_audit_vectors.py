"""The audit trail's published test vectors (docs/audit-test-vectors.json) hold for this
implementation, and the canonical record encoding is RFC 8785 (JCS) with ASCII escapes:
checked against the ``rfc8785`` package, a JCS implementation that is not ours."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.audit.chain import checkpoint_signature_ok, key_id, record_hash
from authz.audit.events import MAX_SAFE_INT, canonical_bytes
from authz.audit.mac import MacKeyRing, mac_message, verify_entry

ROOT = Path(__file__).resolve().parents[2]
VECTORS: dict[str, Any] = json.loads((ROOT / "docs" / "audit-test-vectors.json").read_text())


def _escape(ch: str) -> str:
    if 0x20 <= ord(ch) <= 0x7E:
        return ch
    units = ch.encode("utf-16-be")
    return "".join(f"\\u{units[i : i + 2].hex()}" for i in range(0, len(units), 2))


def jcs_ascii(doc: dict[str, Any]) -> bytes:
    """JCS text, then every character outside printable ASCII as \\uXXXX (lowercase hex,
    surrogate pairs above U+FFFF): the rule docs/audit.md states, derived independently."""
    return "".join(_escape(ch) for ch in rfc8785.dumps(doc).decode("utf-8")).encode("ascii")


def test_record_vectors_bytes_and_hashes() -> None:
    assert len(VECTORS["records"]) >= 3
    for v in VECTORS["records"]:
        raw = canonical_bytes(v["record"])
        assert raw.decode("ascii") == v["canonical"]
        assert hashlib.sha256(raw).hexdigest() == v["sha256"]
        assert jcs_ascii(v["record"]) == raw
        assert all(0x20 <= b <= 0x7E for b in raw)  # one line of printable ASCII


def test_chain_vectors() -> None:
    prev = "0" * 64
    for v in VECTORS["chain"]:
        line = json.loads(v["archive_line"])
        assert v["prev_hash"] == prev == line["prev_hash"]
        body = {k: x for k, x in line.items() if k != "hash"}
        assert v["hashed_bytes"] == prev + canonical_bytes(body).decode("ascii")
        assert hashlib.sha256(v["hashed_bytes"].encode("ascii")).hexdigest() == v["hash"]
        assert record_hash(prev, line) == v["hash"] == line["hash"]
        assert canonical_bytes(line).decode("ascii") == v["archive_line"]
        prev = v["hash"]


def test_mac_vector() -> None:
    v = VECTORS["mac"]
    key = base64.b64decode(v["key_base64"])
    message = mac_message(v["stream_key"], v["producer"], v["seq"], v["record"].encode())
    assert message.decode("ascii") == v["message"]
    assert v["message"].split("\n")[:4] == ["stepup-audit-v1", v["stream_key"], v["producer"], "7"]
    ring = MacKeyRing({v["kid"]: key}, v["kid"])
    assert ring.mac(v["kid"], message) == v["mac"]
    fields = {k.encode(): x.encode() for k, x in v["entry"].items()} | {b"m": v["mac"].encode()}
    entry = verify_entry(ring, v["stream_key"], fields)
    assert (entry.producer, entry.seq, entry.record) == (v["producer"], 7, v["record"].encode())


def test_checkpoint_vector() -> None:
    v = VECTORS["checkpoint"]
    pub = serialization.load_pem_public_key(v["public_key_pem"].encode())
    assert isinstance(pub, Ed25519PublicKey)
    assert key_id(pub) == v["key_id"]
    line = json.loads(v["line"])
    assert checkpoint_signature_ok(line, {v["key_id"]: pub}) == ""
    unsigned = {k: x for k, x in line.items() if k != "sig"}
    assert canonical_bytes(unsigned).decode("ascii") == v["signed_bytes"]
    pk = Ed25519PrivateKey.from_private_bytes(base64.b64decode(v["ed25519_seed_base64"]))
    # Ed25519 is deterministic: the same key signs the same bytes the same way.
    assert base64.b64encode(pk.sign(v["signed_bytes"].encode())).decode() == v["sig"]


def test_the_vectors_file_is_what_the_generator_writes() -> None:
    from tools.audit_vectors import vectors

    assert vectors() == VECTORS


_TEXT = st.text(max_size=40)  # any code point: controls, DEL, C1, U+2028, astral
_SCALARS = st.none() | st.booleans() | st.integers(-MAX_SAFE_INT, MAX_SAFE_INT) | _TEXT


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z_]{1,16}", fullmatch=True), _SCALARS, max_size=16))
def test_canonical_bytes_are_jcs_with_ascii_escapes(record: dict[str, Any]) -> None:
    assert canonical_bytes(record) == jcs_ascii(record)
