"""The request file of ``stepup-authz policy explain --request FILE``, validated up front.

``authz.explain`` reads a plain dict; this schema makes sure that dict has the shape it
expects, so a wrong file gets one line per problem with its line, column and field
(``req.json:line 9, column 22 (grants.0.expires_at): required field missing``) instead of a
raw Python message (``'expires_at'``, ``invalid literal for int()``). The validated values
(``"900"`` -> ``900``, ``"false"`` -> ``False``) are what explain then sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from authz.config.validation import report
from authz.config.yamlfile import YamlDocument, load_yaml
from authz.errors import ConfigError

_STRICT = ConfigDict(extra="forbid")


class _Claims(BaseModel):
    # A token carries claims explain does not read (aud, exp, scope ...): allowed.
    model_config = ConfigDict(extra="allow")
    iss: str
    sub: str
    sid: str | None = None
    acr: str | None = None
    amr: list[str] = []
    auth_time: int | None = None
    iat: int | None = None
    exp: int | None = None


class _Grant(BaseModel):
    model_config = _STRICT
    level: str
    acr: str | None = None
    amr: list[str] = []
    auth_time: int | None = None
    expires_at: int
    issued_at: int | None = None
    device: str | None = None
    ip: str | None = None


class _Device(BaseModel):
    model_config = _STRICT
    id: str
    source: str = "cookie"
    managed: bool | None = None
    compliant: bool | None = None
    platform: str | None = None


class _LastSeen(BaseModel):
    model_config = _STRICT
    at: int
    ip: str = ""
    lat: float | None = None
    lon: float | None = None


class State(BaseModel):
    model_config = _STRICT
    device_known: bool = True
    ip_known: bool = True
    level_seen: bool = True
    velocity: int = 0
    session_revoked: bool = False
    revoked_before: int | None = None
    last_seen: _LastSeen | None = None


class _Geo(BaseModel):
    model_config = _STRICT
    country: str | None = None
    lat: float | None = None
    lon: float | None = None


class ExplainRequest(BaseModel):
    """The documented fields of the request file (see ``authz.explain``)."""

    model_config = _STRICT
    method: str = "GET"
    scheme: str = "https"
    host: str = ""
    path: str = "/"
    headers: dict[str, str] = {}
    source_ip: str = ""
    context_extensions: dict[str, str] = {}
    claims: _Claims | None = None
    grants: list[_Grant] = []
    device: _Device | None = None
    state: State | None = None
    geo: _Geo | None = None
    now: int | None = None
    leeway: int = 0

    @field_validator("method")
    @classmethod
    def _canonical_method(cls, value: str) -> str:
        # As the service: methods are case-sensitive, "post" is refused, not read as POST.
        if not (value.isascii() and value.isalpha() and value.isupper()):
            raise ValueError(f"methods are case-sensitive: write {value.upper()!r}, not {value!r}")
        return value


def load_request(path: Path) -> dict[str, Any]:
    """Read and validate a request file; raises ConfigError (one line per problem)."""
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=source) from None
    try:
        doc = json.loads(raw, object_pairs_hook=_unique)
    except _DuplicateKey as exc:
        # A second "method" or "path" would silently win: refused, placed by the YAML
        # loader (which refuses the same key) when it can read the file.
        _locator(raw, source, strict=True)
        raise ConfigError(f"duplicate key {exc.key!r}", source=source) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = (
            f"line {exc.lineno}, column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise ConfigError(f"not valid JSON: {reason}", source=source, location=where) from None
    if not isinstance(doc, dict):
        raise ConfigError("the request file must be a JSON object", source=source)
    try:
        req = ExplainRequest.model_validate(doc)
    except ValidationError as exc:
        raise report(exc, ExplainRequest, _locator(raw, source), source=source) from None
    return req.model_dump(exclude_unset=True)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"duplicate key {key!r}")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _locator(raw: bytes, source: str, *, strict: bool = False) -> YamlDocument | None:
    # JSON is (nearly always) YAML: its node tree gives lines and columns for free.
    # ``strict``: a duplicate-key error (file, line, key) is raised, not swallowed.
    try:
        return load_yaml(raw, source)
    except ConfigError as exc:
        if strict and exc.reason.startswith("duplicate key"):
            raise
        return None
