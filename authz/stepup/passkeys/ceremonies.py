"""WebAuthn ceremonies: options, and the verification of what the browser sends back.

The cryptography is py_webauthn's (``verify_registration_response``,
``verify_authentication_response``). Before handing a response to it, each check of
WebAuthn Level 3 sections 7.1 / 7.2 whose failure the service must name is made here in the
same order, so a refusal says which one failed: ceremony type, challenge, origin (against
the allowlist), ``rpIdHash`` = SHA-256(RP ID), UP, UV (when the level requires it),
backup flags, and for an assertion the signature counter (section 6.1.1: a counter that
does not grow, when either side is non-zero, means two copies of the key may exist -- it is
refused and reported as a possible clone). Then the library verifies everything again,
with the signature; whatever it still refuses is ``signature-invalid`` /
``attestation-invalid``.

Challenges are 32 random bytes; a transaction-bound one is 16 random bytes followed by the
32-byte request digest, so the authenticator's signature covers the request it approves.
Pure apart from ``os.urandom``: time and state are the caller's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import (
    parse_attestation_object,
    parse_authenticator_data,
    parse_client_data_json,
)
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import (
    InvalidAuthenticationResponse,
    InvalidRegistrationResponse,
)
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from authz.core.encoding import b64u, unb64u
from authz.core.reasons import Reason
from authz.stepup.passkeys.attestation import PasskeyRefused
from authz.store.credentials import Credential

_ALGS = [
    COSEAlgorithmIdentifier.ECDSA_SHA_256,
    COSEAlgorithmIdentifier.EDDSA,
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
]
_UV = {
    "required": UserVerificationRequirement.REQUIRED,
    "preferred": UserVerificationRequirement.PREFERRED,
    "discouraged": UserVerificationRequirement.DISCOURAGED,
}
_TRANSPORTS = {t.value: t for t in AuthenticatorTransport}
MAX_RESPONSE_BYTES = 32 * 1024


@dataclass(frozen=True, slots=True)
class RelyingParty:
    id: str  # the public URL's host (WebAuthn section 5.1.4.1: a registrable suffix)
    name: str
    origins: tuple[str, ...]  # exact origins clientDataJSON.origin may carry

    @property
    def id_hash(self) -> bytes:
        return hashlib.sha256(self.id.encode()).digest()


def new_challenge(transaction_digest: str | None = None) -> bytes:
    if transaction_digest is None:
        return os.urandom(32)
    return os.urandom(16) + bytes.fromhex(transaction_digest)


def challenge_commits_to(challenge: bytes, transaction_digest: str) -> bool:
    return len(challenge) == 48 and challenge[16:] == bytes.fromhex(transaction_digest)


def registration_options(
    rp: RelyingParty,
    *,
    user_handle: bytes,
    user_name: str,
    challenge: bytes,
    user_verification: str,
    attestation: bool,
    exclude: Sequence[Credential],
    timeout_ms: int,
) -> dict[str, Any]:
    """PublicKeyCredentialCreationOptions as JSON (what the page hands to
    ``navigator.credentials.create``). ``attestation``: ask for ``direct`` attestation (the
    level checks the AAGUID or the MDS), else ``none``."""
    opts = generate_registration_options(
        rp_id=rp.id,
        rp_name=rp.name,
        user_id=user_handle,
        user_name=user_name,
        user_display_name=user_name,
        challenge=challenge,
        timeout=timeout_ms,
        attestation=AttestationConveyancePreference.DIRECT
        if attestation
        else AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.DISCOURAGED,
            user_verification=_UV[user_verification],
        ),
        exclude_credentials=[_descriptor(c) for c in exclude],
        supported_pub_key_algs=_ALGS,
    )
    doc: dict[str, Any] = json.loads(options_to_json(opts))
    return doc


def authentication_options(
    rp: RelyingParty,
    *,
    challenge: bytes,
    user_verification: str,
    allow: Sequence[Credential],
    timeout_ms: int,
) -> dict[str, Any]:
    opts = generate_authentication_options(
        rp_id=rp.id,
        challenge=challenge,
        timeout=timeout_ms,
        allow_credentials=[_descriptor(c) for c in allow],
        user_verification=_UV[user_verification],
    )
    doc: dict[str, Any] = json.loads(options_to_json(opts))
    return doc


def _descriptor(c: Credential) -> PublicKeyCredentialDescriptor:
    transports = [_TRANSPORTS[t] for t in c.transports if t in _TRANSPORTS]
    return PublicKeyCredentialDescriptor(id=c.credential_id, transports=transports or None)


@dataclass(frozen=True, slots=True)
class Registered:
    """A verified registration: what becomes a ``Credential``."""

    credential_id: bytes
    public_key: bytes
    sign_count: int
    aaguid: str
    fmt: str
    x5c: tuple[bytes, ...]
    backup_eligible: bool
    backup_state: bool
    user_verified: bool
    transports: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Asserted:
    """A verified assertion."""

    credential_id: bytes
    sign_count: int
    backup_eligible: bool
    backup_state: bool
    user_verified: bool


def _refuse(reason: Reason, detail: str) -> PasskeyRefused:
    return PasskeyRefused(reason, "webauthn", detail)


def _client_data(raw: bytes, rp: RelyingParty, kind: str, challenge: bytes) -> None:
    try:
        cd = parse_client_data_json(raw)
    except Exception as exc:  # the parser raises whatever json/base64 raise
        raise _refuse(Reason.RESPONSE_INVALID, "clientDataJSON is malformed") from exc
    if cd.type != kind:
        raise _refuse(Reason.CEREMONY_TYPE_INVALID, f"expected {kind}, got {cd.type}")
    if cd.challenge != challenge:
        raise _refuse(Reason.CHALLENGE_MISMATCH, "the response answers another challenge")
    if cd.origin not in rp.origins:
        raise _refuse(Reason.ORIGIN_NOT_ALLOWED, f"origin {cd.origin!r} is not allowed")
    if getattr(cd, "cross_origin", False):
        raise _refuse(Reason.ORIGIN_NOT_ALLOWED, "a cross-origin (iframe) ceremony")


def _flags(rp_id_hash: bytes, flags: Any, rp: RelyingParty, require_uv: bool) -> None:
    if rp_id_hash != rp.id_hash:
        raise _refuse(Reason.RP_ID_MISMATCH, f"rpIdHash is not SHA-256 of {rp.id!r}")
    if not flags.up:
        raise _refuse(Reason.USER_NOT_PRESENT, "the authenticator did not test user presence")
    if require_uv and not flags.uv:
        raise _refuse(
            Reason.USER_VERIFICATION_REQUIRED,
            "this level needs user verification (a PIN or biometric on the key)",
        )
    if flags.bs and not flags.be:  # WebAuthn section 6.1: BS implies BE
        raise _refuse(Reason.BACKUP_STATE_INVALID, "backed up but not backup eligible")


def _parse(response: Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(response, str):
        if len(response) > MAX_RESPONSE_BYTES:
            raise _refuse(Reason.RESPONSE_INVALID, "the response is too large")
        try:
            response = json.loads(response)
        except ValueError as exc:
            raise _refuse(Reason.RESPONSE_INVALID, "the response is not JSON") from exc
    if not isinstance(response, Mapping) or not isinstance(response.get("response"), Mapping):
        raise _refuse(Reason.RESPONSE_INVALID, "not a PublicKeyCredential")
    return dict(response)


def _field(doc: Mapping[str, Any], name: str) -> bytes:
    value = doc.get(name)
    if not isinstance(value, str):
        raise _refuse(Reason.RESPONSE_INVALID, f"{name} is missing")
    try:
        return unb64u(value)
    except ValueError as exc:
        raise _refuse(Reason.RESPONSE_INVALID, f"{name} is not base64url") from exc


def verify_registration(
    response: Mapping[str, Any] | str,
    *,
    rp: RelyingParty,
    challenge: bytes,
    require_uv: bool,
) -> Registered:
    doc = _parse(response)
    inner = doc["response"]
    _client_data(_field(inner, "clientDataJSON"), rp, "webauthn.create", challenge)
    try:
        att = parse_attestation_object(_field(inner, "attestationObject"))
    except PasskeyRefused:
        raise
    except Exception as exc:
        raise _refuse(Reason.RESPONSE_INVALID, "attestationObject is malformed") from exc
    _flags(att.auth_data.rp_id_hash, att.auth_data.flags, rp, require_uv)
    try:
        verified = verify_registration_response(
            credential=doc,
            expected_challenge=challenge,
            expected_rp_id=rp.id,
            expected_origin=list(rp.origins),
            require_user_verification=require_uv,
            supported_pub_key_algs=_ALGS,
        )
    except InvalidRegistrationResponse as exc:
        raise PasskeyRefused(Reason.ATTESTATION_INVALID, "webauthn.attestation", str(exc)) from exc
    except Exception as exc:  # a malformed field deep inside the library's parsers
        raise _refuse(Reason.RESPONSE_INVALID, "the registration response is malformed") from exc
    transports = inner.get("transports")
    flags = att.auth_data.flags
    return Registered(
        credential_id=verified.credential_id,
        public_key=verified.credential_public_key,
        sign_count=verified.sign_count,
        aaguid=verified.aaguid.lower(),
        fmt=str(getattr(verified.fmt, "value", verified.fmt)),
        x5c=tuple(att.att_stmt.x5c or ()),
        backup_eligible=bool(flags.be),
        backup_state=bool(flags.bs),
        user_verified=verified.user_verified,
        transports=tuple(
            t for t in (transports if isinstance(transports, list) else []) if t in _TRANSPORTS
        ),
    )


def credential_id_of(response: Mapping[str, Any] | str) -> bytes:
    """The credential an assertion claims to come from (which record to verify it with)."""
    doc = _parse(response)
    raw = _field(doc, "rawId")
    if b64u(raw) != doc.get("id"):
        raise _refuse(Reason.RESPONSE_INVALID, "id and rawId differ")
    return raw


def verify_assertion(
    response: Mapping[str, Any] | str,
    *,
    rp: RelyingParty,
    challenge: bytes,
    credential: Credential,
    require_uv: bool,
) -> Asserted:
    doc = _parse(response)
    inner = doc["response"]
    _client_data(_field(inner, "clientDataJSON"), rp, "webauthn.get", challenge)
    try:
        auth = parse_authenticator_data(_field(inner, "authenticatorData"))
    except PasskeyRefused:
        raise
    except Exception as exc:
        raise _refuse(Reason.RESPONSE_INVALID, "authenticatorData is malformed") from exc
    _flags(auth.rp_id_hash, auth.flags, rp, require_uv)
    if bool(auth.flags.be) != credential.backup_eligible:
        # BE is fixed when the credential is created (WebAuthn section 6.1.3).
        raise _refuse(Reason.BACKUP_STATE_INVALID, "backup eligibility changed since enrolment")
    stored, got = credential.sign_count, auth.sign_count
    if (got > 0 or stored > 0) and got <= stored:
        raise PasskeyRefused(
            Reason.COUNTER_REGRESSION,
            "webauthn.sign_count",
            f"signature counter {got} after {stored}: the key may have been cloned",
        )
    try:
        verified = verify_authentication_response(
            credential=doc,
            expected_challenge=challenge,
            expected_rp_id=rp.id,
            expected_origin=list(rp.origins),
            credential_public_key=credential.public_key,
            credential_current_sign_count=credential.sign_count,
            require_user_verification=require_uv,
        )
    except InvalidAuthenticationResponse as exc:
        raise PasskeyRefused(Reason.SIGNATURE_INVALID, "webauthn.signature", str(exc)) from exc
    except Exception as exc:
        raise _refuse(Reason.RESPONSE_INVALID, "the assertion is malformed") from exc
    if verified.credential_id != credential.credential_id:
        raise _refuse(Reason.CREDENTIAL_UNKNOWN, "the assertion names another credential")
    return Asserted(
        credential_id=verified.credential_id,
        sign_count=verified.new_sign_count,
        backup_eligible=bool(auth.flags.be),
        backup_state=bool(auth.flags.bs),
        user_verified=verified.user_verified,
    )


def amr_for(*, device_bound: bool, user_verified: bool) -> tuple[str, ...]:
    """RFC 8176 methods a passkey assertion proves: ``hwk`` (a key bound to one device) or
    ``swk`` (a synced, software-held key); ``user`` (the presence test every assertion
    passes); with user verification also ``pin`` (the PIN or biometric that unlocked the
    key: the authenticator does not say which) and ``mfa`` (possession plus that)."""
    amr = ["hwk" if device_bound else "swk", "user"]
    if user_verified:
        amr += ["pin", "mfa"]
    return tuple(amr)
