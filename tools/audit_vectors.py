"""Write docs/audit-test-vectors.json: records -> canonical bytes -> hashes, the chain, a
stream entry's MAC and a signed checkpoint, from fixed inputs (fixed keys: Ed25519 and
HMAC are deterministic), so another implementation can be checked byte for byte.

    .venv/bin/python tools/audit_vectors.py > docs/audit-test-vectors.json

tests/unit/test_audit_vectors.py recomputes every value from the file's inputs; run this
only when the format changes on purpose (and bump the record version).
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from authz.audit.chain import GENESIS, SigningKey, chain_record, key_id
from authz.audit.events import canonical_bytes
from authz.audit.mac import MacKeyRing, mac_message

# Inputs: records as a JSON file holds them (any key order, text as UTF-8). The last ones
# are the edge cases: every escape class the encoding has.
RECORDS: list[dict[str, Any]] = [
    {
        "v": 1,
        "type": "access.allowed",
        "event_id": "01JD0000000000000000000000",
        "ts_ms": 1733011200000,
        "decision_id": "0123456789abcdef0123456789abcdef",
        "user": "https://idp.example.com|u-12345",
        "session": "a" * 40,
        "device": None,
        "client_ip": "10.1.2.3",
        "route": "GET trading.example.com /accounts/123",
        "level": "elevated",
        "outcome": "allow",
        "reason": "allowed",
        "factor": "otp",
        "policy_version": "2024-12-01",
        "acr": "mfa",
        "amr": "pwd otp",
        "auth_time": 1733011100,
        "evidence_source": "grant",
        "grant_level": "elevated",
        "grant_issued_at": 1733011110,
        "grant_expires_at": 1733012000,
    },
    {
        "type": "stepup.failed",
        "v": 1,
        "ts_ms": 1733011201000,
        "event_id": "01JD0000000000000000000001",
        "user": None,
        "outcome": "failure",
        "reason": "state-replayed",
        "idp_error": None,
        "flag": True,
        "count": -3,
        "big": 9007199254740991,
    },
    {
        "v": 1,
        "type": "access.denied",
        "ts_ms": 1733011202000,
        "route": 'GET h /a"b\\c/\u00e9/\u2028/\U0001f600',
        "device": "tab\there\nnew\rline\x00nul\x1besc\x7fdel\x85nel\x08bs\x0cff",
        "z": "",
        "A": "upper sorts before lower",
    },
]

MAC_KEY = bytes(range(32))
MAC_KID = "k2024"
STREAM_KEY = "stepup:audit"
PRODUCER = "pod-7f9c:1:0a1b2c3d"
SIGNING_SEED = bytes(range(100, 132))


def rfc8785_ascii(record: dict[str, Any]) -> bytes:
    """RFC 8785 (JCS) text with every character outside printable ASCII (and DEL) written
    as a \\uXXXX escape (UTF-16 surrogate pairs above U+FFFF), lowercase hex: the archive's
    canonical form, derived from a JCS implementation."""
    import rfc8785

    text = rfc8785.dumps(record).decode("utf-8")
    out = []
    for ch in text:
        o = ord(ch)
        if 0x20 <= o <= 0x7E:
            out.append(ch)
        elif o > 0xFFFF:
            o -= 0x10000
            out.append(f"\\u{0xD800 + (o >> 10):04x}\\u{0xDC00 + (o & 0x3FF):04x}")
        else:
            out.append(f"\\u{o:04x}")
    return "".join(out).encode("ascii")


def vectors() -> dict[str, Any]:
    records = []
    for rec in RECORDS:
        raw = canonical_bytes(rec)
        assert raw == rfc8785_ascii(rec)
        records.append(
            {
                "record": rec,
                "canonical": raw.decode("ascii"),
                "sha256": hashlib.sha256(raw).hexdigest(),
            }
        )
    chain = []
    prev = GENESIS
    for i, rec in enumerate(RECORDS[:2], start=1):
        line = chain_record(rec, seq=i, stream_id=f"1733011200000-{i - 1}", prev_hash=prev)
        body = {k: v for k, v in line.items() if k != "hash"}
        chain.append(
            {
                "prev_hash": prev,
                "hashed_bytes": prev + canonical_bytes(body).decode("ascii"),
                "hash": line["hash"],
                "archive_line": canonical_bytes(line).decode("ascii"),
            }
        )
        prev = line["hash"]
    ring = MacKeyRing({MAC_KID: MAC_KEY}, MAC_KID)
    record = canonical_bytes(RECORDS[0])
    message = mac_message(STREAM_KEY, PRODUCER, 7, record)
    mac = {
        "key_base64": base64.b64encode(MAC_KEY).decode("ascii"),
        "kid": MAC_KID,
        "stream_key": STREAM_KEY,
        "producer": PRODUCER,
        "seq": 7,
        "record": record.decode("ascii"),
        "message": message.decode("ascii"),
        "mac": ring.mac(MAC_KID, message),
        "entry": {"r": record.decode("ascii"), "p": PRODUCER, "n": "7", "k": MAC_KID},
    }
    pk = Ed25519PrivateKey.from_private_bytes(SIGNING_SEED)
    key = SigningKey(pk, key_id(pk.public_key()))
    cp = key.checkpoint(
        segment="audit-0000000000000001-20241201T000000Z.jsonl",
        seq=2,
        hash_=prev,
        ts_ms=1733011203000,
        extra={"next_segment": "audit-0000000000000003-20241201T010000Z.jsonl"},
    )
    unsigned = {k: v for k, v in cp.items() if k != "sig"}
    checkpoint = {
        "ed25519_seed_base64": base64.b64encode(SIGNING_SEED).decode("ascii"),
        "public_key_pem": key.public_pem().decode("ascii"),
        "key_id": key.key_id,
        "signed_bytes": canonical_bytes(unsigned).decode("ascii"),
        "sig": cp["sig"],
        "line": canonical_bytes(cp).decode("ascii"),
    }
    return {
        "about": "stepup-authz audit trail test vectors; docs/audit.md explains each part",
        "records": records,
        "chain": chain,
        "mac": mac,
        "checkpoint": checkpoint,
    }


if __name__ == "__main__":
    json.dump(vectors(), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
