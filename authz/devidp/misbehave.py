"""TEST-ONLY knobs that make the development IdP misbehave, for the adversarial suite.

An honest IdP is the easy case; the step-up callback must also refuse a provider that
returns a weaker ``acr``, no ``auth_time``, a stale or future one, another ``iss``, another
subject, or an ID token replayed from an earlier round trip. Every knob is off by default.

They are set at start (``serve --misbehave '{"acr": "pwd"}'``) or, when the provider was
started with ``--test-knobs``, at run time with ``PUT /_test/misbehave`` (a JSON object of
knobs; ``{}`` restores honest behaviour). Neither exists outside this development provider:
the stepup-authz service never imports this package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from authz.errors import ConfigError


@dataclass
class Misbehaviour:
    """What the provider does wrong. Mutable on purpose: tests switch it between cases."""

    acr: str | None = None  # the `acr` claimed in every token, whatever the user did
    amr: list[str] | None = None  # likewise `amr`
    drop_auth_time: bool = False  # omit `auth_time`
    auth_time_offset_s: int = 0  # added to `auth_time` (negative: older, positive: future)
    token_iss: str | None = None  # `iss` claim of the tokens
    response_iss: str | None = None  # RFC 9207 `iss` parameter of the authorization response
    id_token_sub: str | None = None  # `sub` of the ID token (someone else signed in)
    id_token_aud: str | None = None  # `aud` of the ID token
    nonce: str | None = None  # `nonce` of the ID token instead of the requested one
    replay_id_token: bool = False  # answer with the ID token minted for the previous code

    @property
    def active(self) -> bool:
        return self != Misbehaviour()

    def claims(self, claims: dict[str, Any]) -> dict[str, Any]:
        """The claims common to both tokens, altered as configured."""
        out = dict(claims)
        if self.acr is not None:
            out["acr"] = self.acr
        if self.amr is not None:
            out["amr"] = list(self.amr)
        if "auth_time" in out:
            out["auth_time"] = int(out["auth_time"]) + self.auth_time_offset_s
        if self.drop_auth_time:
            out.pop("auth_time", None)
        if self.token_iss is not None:
            out["iss"] = self.token_iss
        return out

    def id_claims(self, claims: dict[str, Any]) -> dict[str, Any]:
        out = dict(claims)
        if self.id_token_sub is not None:
            out["sub"] = self.id_token_sub
        if self.id_token_aud is not None:
            out["aud"] = self.id_token_aud
        if self.nonce is not None:
            out["nonce"] = self.nonce
        return out


def parse(raw: str | dict[str, Any] | None) -> Misbehaviour:
    """Knobs from a JSON object (or an already parsed one); unknown names are refused."""
    if raw is None or raw == "":
        return Misbehaviour()
    try:
        doc = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError as exc:
        raise ConfigError(f"misbehave: not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError("misbehave: a JSON object of knobs is expected")
    known = {f.name for f in fields(Misbehaviour)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(
            f"misbehave: unknown knob(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    try:
        knobs = Misbehaviour(**doc)
    except TypeError as exc:
        raise ConfigError(f"misbehave: {exc}") from exc
    if not isinstance(knobs.auth_time_offset_s, int) or isinstance(knobs.auth_time_offset_s, bool):
        raise ConfigError("misbehave: auth_time_offset_s must be an integer")
    return knobs
