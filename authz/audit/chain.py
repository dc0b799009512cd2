"""The archive's tamper evidence: a SHA-256 hash chain and Ed25519-signed checkpoints.

Archive line kinds (one canonical JSON object per line, see ``events.canonical_bytes``):

- ``{"kind":"event", "seq":N, "stream_id":"<redis id>", "prev_hash":H(N-1), "hash":H(N),
  ...event fields...}`` where ``H(N) = SHA-256(ascii(prev_hash) || canonical(record
  without "hash"))`` and ``H(0) = GENESIS`` (64 zeros). ``seq`` starts at 1 and never skips.
- ``{"kind":"checkpoint", "segment":"<file name>", "seq":N, "hash":H(N), "ts_ms":T,
  "key_id":K, "sig":"<base64 Ed25519 signature>"}``: a signature over the canonical bytes of
  the object without ``sig``, covering the record just before it. Checkpoints are not part
  of the chain; verify requires each closed segment to end with one, so a rewritten chain
  (SHA-256 is keyless) or a cut-off segment cannot pass without the private key.

The key id is the first 16 hex digits of SHA-256 over the raw 32-byte public key, so a
public key file names itself and rotated keys can sit side by side.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from authz.audit.events import canonical_bytes

GENESIS = "0" * 64


def record_hash(prev_hash: str, body: Mapping[str, Any]) -> str:
    """H = SHA-256(prev_hash as ASCII hex || canonical bytes of the record without "hash")."""
    h = hashlib.sha256(prev_hash.encode("ascii"))
    h.update(canonical_bytes({k: v for k, v in body.items() if k != "hash"}))
    return h.hexdigest()


def chain_record(
    event_record: Mapping[str, Any], *, seq: int, stream_id: str, prev_hash: str
) -> dict[str, Any]:
    """The archived form of one event record: chain fields added, hash computed."""
    rec: dict[str, Any] = dict(event_record)
    rec.update(kind="event", seq=seq, stream_id=stream_id, prev_hash=prev_hash)
    rec["hash"] = record_hash(prev_hash, rec)
    return rec


def chain_line(
    event_record: Mapping[str, Any], *, seq: int, stream_id: str, prev_hash: str
) -> tuple[bytes, str]:
    """``(canonical_bytes(chain_record(...)), its hash)`` with one encoding, not two: the
    record is encoded without ``hash`` (the bytes the hash covers) and the hash is then
    spliced in at its sorted place. The archive writes one of these per record.

    The splice is exact for a flat object of scalars: inside a canonical JSON string every
    ``"`` is escaped, so ``,"<key>":`` occurs only where that member begins."""
    body: dict[str, Any] = dict(event_record)
    body.pop("hash", None)
    body.update(kind="event", seq=seq, stream_id=stream_id, prev_hash=prev_hash)
    raw = canonical_bytes(body)
    digest = hashlib.sha256(prev_hash.encode("ascii") + raw).hexdigest()
    member = b'"hash":"' + digest.encode("ascii") + b'"'
    after = min(k for k in body if k > "hash")  # "kind" at the latest
    if any(k < "hash" for k in body):
        at = raw.index(b"," + encode_basestring_ascii(after).encode("ascii") + b":")
        line = raw[:at] + b"," + member + raw[at:]
    else:  # "hash" is the first key
        line = b"{" + member + b"," + raw[1:]
    return line, digest


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    private_key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def generate(cls) -> SigningKey:
        pk = Ed25519PrivateKey.generate()
        return cls(pk, key_id(pk.public_key()))

    @classmethod
    def from_pem_file(cls, path: Path) -> SigningKey:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return cls(key, key_id(key.public_key()))

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def checkpoint(
        self,
        *,
        segment: str,
        seq: int,
        hash_: str,
        ts_ms: int,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A signed checkpoint. ``extra``: ``next_segment`` (the seal of a segment names the
        one after it) and ``producers`` (the exporter's sequence account, restored from
        here after a restart); the signature covers them too."""
        body: dict[str, Any] = dict(extra or {})
        body.update(
            kind="checkpoint",
            segment=segment,
            seq=seq,
            hash=hash_,
            ts_ms=ts_ms,
            key_id=self.key_id,
        )
        sig = self.private_key.sign(canonical_bytes(body))
        body["sig"] = base64.b64encode(sig).decode("ascii")
        return body


def load_public_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Public keys by key id, from PEM files (a public key, or a private key's public half).
    Raises ValueError naming the file for anything that is not an Ed25519 key (OSError
    when a file cannot be read)."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
        data = path.read_bytes()
        pub: object
        try:
            if b"PRIVATE KEY" in data:
                pub = serialization.load_pem_private_key(data, password=None).public_key()
            else:
                pub = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ValueError(f"{path}: not a PEM key ({exc})") from exc
        if not isinstance(pub, Ed25519PublicKey):
            raise ValueError(f"{path}: not an Ed25519 key")
        keys[key_id(pub)] = pub
    return keys


def checkpoint_signature_ok(cp: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str:
    """ "" when the signature verifies, else why not."""
    pub = keys.get(str(cp.get("key_id")))
    if pub is None:
        return f"unknown key id {cp.get('key_id')!r}"
    try:
        sig = base64.b64decode(str(cp.get("sig", "")), validate=True)
        pub.verify(sig, canonical_bytes({k: v for k, v in cp.items() if k != "sig"}))
    except (InvalidSignature, ValueError):
        return "bad signature"
    return ""
