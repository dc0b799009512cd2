"""The one-time state between ``/_stepup/start`` (or ``/login``) and ``/_stepup/callback``.

Stored sealed in Redis under a hash of a random state id (``authz.store.sessions``), bound
to the browser by the state cookie, consumed once (GETDEL). This module is its typed form:
``StepupState.to_json`` is what is stored, ``from_json`` reads it back and refuses anything
that is not exactly what ``to_json`` writes (a value the store could not authenticate never
reaches here, but a refused shape is still a "state-invalid", never a guess).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class StateKind(StrEnum):
    LOGIN = "login"  # a first sign-in: the callback sets the token cookie
    STEPUP = "stepup"  # a step-up for a signed-in session: the callback records a grant


@dataclass(frozen=True, slots=True)
class StepupState:
    kind: StateKind
    return_path: str  # same-origin relative path, already checked (safe_return_path)
    nonce: str
    verifier: str  # the PKCE code verifier (RFC 7636)
    issued_at: int  # when the challenge was issued: the proof's auth_time must not precede it
    # step-up only: which level, for which user and session, bound to which device / IP
    level: str | None = None
    issuer: str | None = None
    subject: str | None = None
    user_key: str | None = None
    session_key: str | None = None
    device: str | None = None
    ip: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": self.kind.value,
            "rd": self.return_path,
            "nonce": self.nonce,
            "verifier": self.verifier,
            "iat": self.issued_at,
        }
        for key, value in (
            ("level", self.level),
            ("iss", self.issuer),
            ("sub", self.subject),
            ("uk", self.user_key),
            ("sk", self.session_key),
            ("device", self.device),
            ("ip", self.ip),
        ):
            if value is not None:
                doc[key] = value
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> StepupState | None:
        """The state ``doc`` holds, or None when it is not one this module wrote."""
        try:
            kind = StateKind(str(doc.get("kind")))
        except ValueError:
            return None
        strings = {k: doc.get(k) for k in ("rd", "nonce", "verifier")}
        optional = {k: doc.get(k) for k in ("level", "iss", "sub", "uk", "sk", "device", "ip")}
        iat = doc.get("iat")
        if (
            not all(isinstance(v, str) and v for v in strings.values())
            or not all(v is None or isinstance(v, str) for v in optional.values())
            or type(iat) is not int
        ):
            return None
        if kind is StateKind.STEPUP and not all(
            optional[k] for k in ("level", "iss", "sub", "uk", "sk")
        ):
            return None  # a step-up must name the level and the session it is for
        return cls(
            kind=kind,
            return_path=strings["rd"],  # type: ignore[arg-type]
            nonce=strings["nonce"],  # type: ignore[arg-type]
            verifier=strings["verifier"],  # type: ignore[arg-type]
            issued_at=iat,
            level=optional["level"],
            issuer=optional["iss"],
            subject=optional["sub"],
            user_key=optional["uk"],
            session_key=optional["sk"],
            device=optional["device"],
            ip=optional["ip"],
        )
