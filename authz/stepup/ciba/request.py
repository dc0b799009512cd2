"""What a push step-up is made of: the API client's start request (read strictly), the level
and action it names, the binding message, and the record kept while it runs.

The client names *what* it wants to do (a level, or the challenge's ``acr_values`` and
``max_age``; the method and path it was refused) and nothing about *who*: the user comes
only from its verified token, so a field such as ``login_hint`` or ``sub`` is refused, not
ignored.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from authz.core.attributes import canonicalize_path
from authz.core.policy import Level, Policy
from authz.core.reasons import Reason
from authz.errors import RequestError

FIELDS = frozenset({"level", "acr_values", "max_age", "method", "path", "requested_expiry"})
_METHOD = re.compile(r"[A-Z]{1,16}")
_ACR = re.compile(r"[!-~]{1,256}")  # acr values are printable tokens (RFC 9470: space-separated)
REQUEST_ID = re.compile(r"[A-Za-z0-9_-]{32}")
# What oidc-provider accepts in a binding message by default, and what every authentication
# device can show: letters, digits and - . _ + / ! ? #; no spaces.
_BINDING_CHAR = re.compile(r"[A-Za-z0-9._+/!?#-]")
# The code shown on both devices (CIBA Core 1.0 section 7.1: "a random value of reasonable
# entropy"): no vowels (no words), no 0/O, 1/I look-alikes. 28^4 ~ 600k.
_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ23456789"
CODE_LENGTH = 4


class StartError(ValueError):
    """The start request cannot be honoured; ``reason`` is the slug the client gets."""

    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class StartRequest:
    """The client's start request, as read: one way of naming the level, and the action."""

    method: str
    path: str  # canonical, without the query
    level: str | None = None
    acr_values: tuple[str, ...] | None = None
    max_age: int | None = None
    requested_expiry: int | None = None


def _positive_int(doc: Mapping[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if type(value) is not int or value < 1:
        raise StartError(Reason.BAD_REQUEST, f"`{name}` must be a positive integer")
    return value


def read_start(doc: object) -> StartRequest:
    """A ``StartRequest`` from the JSON body; StartError for anything else."""
    if not isinstance(doc, dict):
        raise StartError(Reason.BAD_REQUEST, "the body must be a JSON object")
    unknown = sorted(set(doc) - FIELDS)
    if unknown:
        # login_hint, sub, user ...: who is asked comes from the token, never from here.
        raise StartError(Reason.BAD_REQUEST, f"unknown field(s): {', '.join(unknown)}")
    method, raw_path = doc.get("method"), doc.get("path")
    if not isinstance(method, str) or not _METHOD.fullmatch(method):
        raise StartError(Reason.BAD_REQUEST, "`method` must name an HTTP method (GET, POST ...)")
    if not isinstance(raw_path, str) or len(raw_path) > 2048:
        raise StartError(Reason.BAD_PATH, "`path` must be the request's path")
    try:
        path, _ = canonicalize_path(raw_path)  # the query never goes anywhere
    except RequestError as exc:
        raise StartError(Reason.BAD_PATH, str(exc)) from None
    level, acr = doc.get("level"), doc.get("acr_values")
    if (level is None) == (acr is None):
        raise StartError(Reason.BAD_REQUEST, "give `level`, or the challenge's `acr_values`")
    if level is not None and (not isinstance(level, str) or not level or len(level) > 64):
        raise StartError(Reason.BAD_REQUEST, "`level` must be a level name")
    acr_values = None
    if acr is not None:
        values = acr.split() if isinstance(acr, str) else None
        if not values or not all(_ACR.fullmatch(v) for v in values):
            raise StartError(Reason.BAD_REQUEST, "`acr_values` must be the challenge's value")
        acr_values = tuple(sorted(set(values)))
    max_age = _positive_int(doc, "max_age")
    if max_age is not None and level is not None:
        raise StartError(Reason.BAD_REQUEST, "`max_age` goes with `acr_values`, not `level`")
    return StartRequest(
        method=method,
        path=path,
        level=level,
        acr_values=acr_values,
        max_age=max_age,
        requested_expiry=_positive_int(doc, "requested_expiry"),
    )


def pick_level(policy: Policy, start: StartRequest) -> Level:
    """The level the client names: by name, or the one level whose acr values (and
    ``max_age``, when given) are the challenge's. It must be one a push can satisfy."""
    if start.level is not None:
        level = policy.by_name.get(start.level)
        if level is None:
            raise StartError(Reason.LEVEL_UNKNOWN, f"no level {start.level!r}")
    else:
        wanted = start.acr_values or ()
        found = [
            lv
            for lv in policy.levels
            if tuple(sorted(lv.acr)) == wanted
            and (start.max_age is None or lv.max_age == start.max_age)
        ]
        if not found:
            raise StartError(Reason.LEVEL_UNKNOWN, "no level asks for these acr_values")
        if len(found) > 1:
            names = ", ".join(lv.name for lv in found)
            raise StartError(Reason.BAD_REQUEST, f"several levels match ({names}): name one")
        level = found[0]
    if level.public or not level.needs_evidence:
        raise StartError(Reason.LEVEL_NOT_GRANTABLE, f"{level.name} asks for no step-up")
    if not level.offers("idp"):
        raise StartError(Reason.CIBA_NOT_OFFERED, f"{level.name} takes only {level.factors}")
    if level.transaction is not None:
        # Transaction-bound grants are single-use, for one request the user saw: a push
        # approving "a level" cannot carry that binding.
        raise StartError(Reason.CIBA_NOT_OFFERED, f"{level.name} is bound to one transaction")
    return level


def check_action(policy: Policy, level: Level, host: str, method: str, path: str) -> None:
    """The action named must be one that needs a step-up ``level`` covers: the message on the
    user's phone then names something this grant is for, not a harmless page standing in
    for a wire transfer. (Grants are per level, as in the browser flow: the action names
    the request, it does not limit the grant.)"""
    route = policy.route_for(host, method, path)
    needs = route.level if route is not None else policy.default_level
    if needs.public or not needs.needs_evidence or needs.rank > level.rank:
        raise StartError(
            Reason.ACTION_NOT_COVERED,
            f"{method} {path} is at level {needs.name}, not one {level.name} steps up to",
        )


def new_code() -> str:
    return "".join(secrets.choice(_CODE_ALPHABET) for _ in range(CODE_LENGTH))


def binding_message(code: str, method: str, path: str, max_chars: int) -> str:
    """``CODE-METHOD/path``, within ``max_chars`` of the plain set every device can show.

    Characters outside it become ``_``. A path too long is cut after a whole segment and
    marked ``...``, never mid-segment: ``/wires/12`` must not stand for ``/wires/1234``.
    """
    head = f"{code}-{method}"
    safe = "".join(c if _BINDING_CHAR.fullmatch(c) else "_" for c in path)
    if len(head) + len(safe) <= max_chars:
        return head + safe
    budget = max_chars - len(head) - 3
    kept = ""
    for segment in safe.split("/")[1:]:
        if len(kept) + 1 + len(segment) > budget:
            break
        kept += "/" + segment
    return f"{head}{kept}/..."[:max_chars]


class Status(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    FAILED = "failed"


_STRINGS = ("auth_req_id", "level", "iss", "sub", "uk", "sk", "route", "binding")
_INTS = ("iat", "exp", "interval", "next")


@dataclass(frozen=True, slots=True)
class CibaRequest:
    """One push step-up, as stored (sealed) while it runs and for a while after.

    ``issued_at``: when the service sent the request; the approval's ``auth_time`` must not
    precede it. ``device`` / ``ip``: what the starting client presented; the grant is bound
    to them (the approval happens on another device, the grant is for this client).
    """

    auth_req_id: str
    level: str
    issuer: str
    subject: str
    user_key: str
    session_key: str
    route: str  # "METHOD host /path": what the client said it wants to do
    binding_message: str
    issued_at: int
    expires_at: int
    interval: int
    next_poll_at: int
    device: str | None = None
    ip: str | None = None
    status: Status = Status.PENDING
    reason: str | None = None
    failures: int = 0  # transient poll failures in a row (the back-off)
    grant_expires_at: int | None = None

    @property
    def ended(self) -> bool:
        return self.status is not Status.PENDING

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "auth_req_id": self.auth_req_id,
            "level": self.level,
            "iss": self.issuer,
            "sub": self.subject,
            "uk": self.user_key,
            "sk": self.session_key,
            "route": self.route,
            "binding": self.binding_message,
            "iat": self.issued_at,
            "exp": self.expires_at,
            "interval": self.interval,
            "next": self.next_poll_at,
            "status": self.status.value,
            "failures": self.failures,
        }
        for key, value in (
            ("device", self.device),
            ("ip", self.ip),
            ("reason", self.reason),
            ("grant_exp", self.grant_expires_at),
        ):
            if value is not None:
                doc[key] = value
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> CibaRequest | None:
        """The record ``doc`` holds, or None when it is not exactly what ``to_json`` writes."""
        try:
            status = Status(str(doc.get("status")))
        except ValueError:
            return None
        strings = {k: doc.get(k) for k in _STRINGS}
        ints = {k: doc.get(k) for k in (*_INTS, "failures")}
        optional = {k: doc.get(k) for k in ("device", "ip", "reason")}
        grant_exp = doc.get("grant_exp")
        if (
            not all(isinstance(v, str) and v for v in strings.values())
            or not all(type(v) is int for v in ints.values())
            or not all(v is None or isinstance(v, str) for v in optional.values())
            or not (grant_exp is None or type(grant_exp) is int)
        ):
            return None
        return cls(
            auth_req_id=strings["auth_req_id"],  # type: ignore[arg-type]
            level=strings["level"],  # type: ignore[arg-type]
            issuer=strings["iss"],  # type: ignore[arg-type]
            subject=strings["sub"],  # type: ignore[arg-type]
            user_key=strings["uk"],  # type: ignore[arg-type]
            session_key=strings["sk"],  # type: ignore[arg-type]
            route=strings["route"],  # type: ignore[arg-type]
            binding_message=strings["binding"],  # type: ignore[arg-type]
            issued_at=ints["iat"],  # type: ignore[arg-type]
            expires_at=ints["exp"],  # type: ignore[arg-type]
            interval=ints["interval"],  # type: ignore[arg-type]
            next_poll_at=ints["next"],  # type: ignore[arg-type]
            device=optional["device"],
            ip=optional["ip"],
            status=status,
            reason=optional["reason"],
            failures=ints["failures"],  # type: ignore[arg-type]
            grant_expires_at=grant_exp,
        )
