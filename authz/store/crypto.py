"""Field encryption and keyed hashes for what the session store keeps in Redis.

Two primitives, both keyed from one keyring (``crypto.keys: {kid: key_file}``, 32 random
bytes per key, raw or base64, from Kubernetes Secret mounts; ``crypto.active_kid`` names
the key new data is written under):

- ``FieldCipher.encrypt`` / ``decrypt``: AES-256-GCM with a random 96-bit nonce. A value
  is the compact string ``v1.<kid>.<base64(nonce || ciphertext || tag)>``. The
  associated data is ``v1.<kid>.`` followed by the value's *context* (the Redis key name,
  plus the hash field and the sub-field where there is one), so a ciphertext moved to
  another key, field or purpose fails its tag exactly like a tampered one (NIST SP 800-38D
  section 5.2.1.2: AAD is authenticated, not encrypted). Every kid in the ring decrypts,
  so data written before a rotation still reads while its kid stays in the ring.
- ``FieldCipher.fingerprint``: HMAC-SHA256 (truncated to 128 bits) for values that are
  compared or looked up by equality: device ids and IPs as hash field names. Deterministic
  by design (that is what makes lookup work), scoped by purpose and user so the same device
  of two users gives two unrelated names.

Each master key is split with HKDF-SHA256 (RFC 5869) into an AES key and an HMAC key with
distinct ``info`` labels, so neither primitive ever uses the other's key.

Rotation. Encryption rotates freely: set a new ``active_kid``, keep the old kid in the ring
until everything written under it has expired (the longest TTL is ``history_ttl_s``).
Fingerprints are tied to one key: after rotating, a device known under the old kid's lookup
key is not found under the new one. Set ``crypto.previous_kid`` to the old kid and lookups
check both fingerprints; a device or IP seen again is re-recorded under the active kid (the
store's scripts move it), so the old kid can leave the ring after ``history_ttl_s``. Without
``previous_kid`` a rotation forgets every user's known devices and IPs: the next request
from each is "unknown", which the policy typically answers with a step-up.

Anything that does not decrypt (unknown kid, failed tag, wrong format) is ``None``: the
store counts it as corrupt and treats it as absent, never as evidence.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from authz.config.settings import CryptoSettings
from authz.errors import ConfigError

log = logging.getLogger("authz.crypto")

FORMAT = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12  # 96 bits: GCM's native IV length (SP 800-38D section 8.2)
FINGERPRINT_BYTES = 16
KID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_ENC_INFO = b"stepup-authz/v1/field-encryption/aes-256-gcm"
_MAC_INFO = b"stepup-authz/v1/lookup/hmac-sha256"
_EPHEMERAL_KID = "ephemeral"
# Development with several worker processes: the supervisor generates one ephemeral key and
# hands it to every worker in this variable, so they read each other's values. Never set in
# production (configure crypto.keys); only read when no keys are configured.
EPHEMERAL_KEY_ENV = "STEPUP_CRYPTO_EPHEMERAL_KEY"


def _derive(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(master)


# Standard base64 through binascii: on the Check path, a few times faster than the
# urlsafe helpers (which translate the alphabet in Python). '.' is not in the alphabet.
def _b64e(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _b64d(text: str) -> bytes:
    return binascii.a2b_base64(text, strict_mode=True)


def parse_key(data: bytes, *, source: str = "key") -> bytes:
    """A 32-byte key from a file's content: the raw bytes, or their base64 (standard or
    URL-safe, padding optional, surrounding whitespace ignored)."""
    if len(data) == KEY_BYTES:
        return data
    try:
        text = data.decode("ascii").strip()
        key = base64.b64decode(
            text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True
        )
    except (UnicodeDecodeError, binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{source}: a key must be {KEY_BYTES} random bytes, raw or base64")
    return key


class FieldCipher:
    """The keyring: AES-256-GCM for values, HMAC-SHA256 for lookup names. Built once at
    startup; every method is cheap and thread-safe."""

    __slots__ = ("_active", "_active_prefix", "_aead", "_mac", "_previous", "ephemeral")

    def __init__(
        self,
        keys: Mapping[str, bytes],
        active_kid: str,
        *,
        previous_kid: str | None = None,
        ephemeral: bool = False,
    ) -> None:
        if not keys:
            raise ValueError("the keyring is empty")
        for kid, key in keys.items():
            if not KID_PATTERN.match(kid):
                raise ValueError(f"key id {kid!r} must match {KID_PATTERN.pattern}")
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {kid!r} must be {KEY_BYTES} bytes")
        if active_kid not in keys:
            raise ValueError(f"active key id {active_kid!r} is not in the keyring")
        if previous_kid is not None and (previous_kid not in keys or previous_kid == active_kid):
            raise ValueError(f"previous key id {previous_kid!r} must be another kid of the ring")
        self._aead = {kid: AESGCM(_derive(key, _ENC_INFO)) for kid, key in keys.items()}
        self._mac = {kid: _derive(key, _MAC_INFO) for kid, key in keys.items()}
        self._active = active_kid
        self._active_prefix = f"{FORMAT}.{active_kid}."
        self._previous = previous_kid
        self.ephemeral = ephemeral

    @classmethod
    def generate(cls, key: bytes | None = None) -> FieldCipher:
        """A one-process key (development, demo, tests): nothing it wrote survives a restart
        or can be read by another replica. ``key``: share one among local workers."""
        return cls({_EPHEMERAL_KID: key or os.urandom(KEY_BYTES)}, _EPHEMERAL_KID, ephemeral=True)

    @classmethod
    def from_files(
        cls, keys: Mapping[str, Path], active_kid: str, *, previous_kid: str | None = None
    ) -> FieldCipher:
        material: dict[str, bytes] = {}
        for kid, path in keys.items():
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read key {kid!r}: {exc.strerror}", location=f"crypto.keys.{kid}"
                ) from exc
            material[kid] = parse_key(data, source=f"crypto.keys.{kid}")
        try:
            return cls(material, active_kid, previous_kid=previous_kid)
        except ValueError as exc:
            raise ConfigError(str(exc), location="crypto") from exc

    @property
    def active_kid(self) -> str:
        return self._active

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._aead)

    # -- encryption ---------------------------------------------------------------------

    def encrypt(self, plaintext: bytes | str, context: str) -> str:
        """Seal ``plaintext`` under the active key, bound to ``context``."""
        data = plaintext.encode() if isinstance(plaintext, str) else plaintext
        nonce = os.urandom(NONCE_BYTES)
        head = self._active_prefix
        sealed = self._aead[self._active].encrypt(nonce, data, (head + context).encode())
        return head + _b64e(nonce + sealed)

    def decrypt(self, token: bytes | str, context: str) -> bytes | None:
        """The plaintext, or None when ``token`` is not a v1 value of a kid in the ring
        sealed for ``context`` (tampered, moved, unknown kid or malformed)."""
        try:
            text = token.decode("ascii") if isinstance(token, bytes) else token
            version, kid, body = text.split(".")
            aead = self._aead.get(kid)
            if version != FORMAT or aead is None:
                return None
            blob = _b64d(body)
            if len(blob) < NONCE_BYTES + 16:
                return None
            aad = f"{FORMAT}.{kid}.{context}".encode()
            return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
        except (ValueError, UnicodeDecodeError, binascii.Error, InvalidTag):
            return None

    def decrypt_text(self, token: bytes | str, context: str) -> str | None:
        raw = self.decrypt(token, context)
        if raw is None:
            return None
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None

    # -- keyed hashes -------------------------------------------------------------------

    def _fp(self, kid: str, purpose: str, scope: str, value: str) -> str:
        msg = f"{purpose}\x00{scope}\x00{value}".encode()
        # 16 bytes -> 22 base64 characters once the "==" padding is dropped.
        return _b64e(hmac.digest(self._mac[kid], msg, "sha256")[:FINGERPRINT_BYTES])[:22]

    def fingerprint(self, purpose: str, scope: str, value: str) -> str:
        """The keyed hash of ``value`` for ``purpose`` (e.g. "device") within ``scope``
        (the user key), under the active kid: stable, and meaningless without the key."""
        return self._fp(self._active, purpose, scope, value)

    def previous_fingerprint(self, purpose: str, scope: str, value: str) -> str | None:
        """The same under ``previous_kid`` (lookups made across a rotation), if set."""
        if self._previous is None:
            return None
        return self._fp(self._previous, purpose, scope, value)


def ephemeral_key_env() -> dict[str, str]:
    """For a supervisor starting local workers without configured keys: the environment
    entry giving them all one ephemeral key (see ``EPHEMERAL_KEY_ENV``)."""
    return {EPHEMERAL_KEY_ENV: _b64e(os.urandom(KEY_BYTES))}


def cipher_from_settings(
    settings: CryptoSettings, env: Mapping[str, str] | None = None
) -> FieldCipher:
    """The configured keyring; without keys an ephemeral one, announced loudly (refused
    earlier, at settings validation, when ``crypto.require`` is set)."""
    if settings.active_kid is None:
        if settings.require:  # also refused by CryptoSettings; kept for direct callers
            raise ConfigError("crypto.require is set but no keys are configured", location="crypto")
        log.warning(
            "NO ENCRYPTION KEY CONFIGURED (crypto.keys): Redis values are encrypted "
            "under a random per-process key. Data does not survive a restart and "
            "replicas cannot read each other's state. Never run production like this; "
            "set crypto.keys, crypto.active_kid and crypto.require: true."
        )
        shared = (os.environ if env is None else env).get(EPHEMERAL_KEY_ENV)
        if shared:
            return FieldCipher.generate(parse_key(shared.encode(), source=EPHEMERAL_KEY_ENV))
        return FieldCipher.generate()
    return FieldCipher.from_files(
        settings.keys, settings.active_kid, previous_kid=settings.previous_kid
    )
