"""Configuration of the development OIDC provider: clients, users, lifetimes, signing key.

Everything here is for development, demos and tests only. The built-in users and their TOTP
secrets below are published in the source on purpose; they protect nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import jwt
import pyotp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from authz.config.yamlfile import load_yaml
from authz.devidp.misbehave import Misbehaviour
from authz.errors import ConfigError

#: DEV CREDENTIALS, published on purpose. ``python -m authz.devidp totp --user alice`` prints
#: the current code; any authenticator app accepts the secret too.
ALICE_TOTP_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"  # noqa: S105 -- published dev secret
BOB_TOTP_SECRET = "KRUGKIDROVUWG2ZAMJZG653OEBTG66BA"  # noqa: S105 -- published dev secret


@dataclass(frozen=True)
class DevUser:
    """A development user. ``totp_secret`` is base32 (RFC 4648), as authenticator apps expect."""

    password: str
    totp_secret: str
    name: str = ""
    email: str = ""


@dataclass(frozen=True)
class DevClient:
    """A registered relying party. Redirect URIs are compared exactly (OAuth 2.1, RFC 9700)."""

    secret: str
    redirect_uris: tuple[str, ...]
    # OIDC Back-Channel Logout 1.0 and RP-Initiated Logout 1.0 (authz.devidp.logout).
    backchannel_logout_uri: str | None = None
    post_logout_redirect_uris: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        extra = (self.backchannel_logout_uri,) if self.backchannel_logout_uri else ()
        for uri in (*self.redirect_uris, *extra, *self.post_logout_redirect_uris):
            parts = urlsplit(uri)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
                raise ConfigError(f"URI must be absolute http(s), no fragment: {uri!r}")


def default_users() -> dict[str, DevUser]:
    """The built-in DEV users: ``alice``/``alice-password`` and ``bob``/``bob-password``."""
    return {
        "alice": DevUser("alice-password", ALICE_TOTP_SECRET, "Alice Example", "alice@example.com"),
        "bob": DevUser("bob-password", BOB_TOTP_SECRET, "Bob Example", "bob@example.com"),
    }


@dataclass(frozen=True)
class DevIdpConfig:
    """Everything the provider needs, validated once at construction.

    ``clock`` returns seconds since the epoch; tests inject it to move time (codes, max_age,
    token lifetimes and TOTP all read it). ``signing_key_path`` names an RSA private key PEM;
    without it a fresh RSA-2048 key is generated when the app is created.
    """

    issuer: str
    clients: Mapping[str, DevClient] = field(default_factory=dict)
    users: Mapping[str, DevUser] = field(default_factory=default_users)
    access_token_audience: str = "stepup-demo"  # noqa: S105 -- an audience, not a secret
    token_ttl_s: int = 3600
    code_ttl_s: int = 60
    login_ttl_s: int = 600
    session_ttl_s: int = 8 * 3600
    max_login_attempts: int = 5
    clock: Callable[[], float] = time.time
    signing_key_path: Path | None = None
    # TEST-ONLY (authz.devidp.misbehave): what to get wrong, and whether tests may change
    # it at run time with PUT /_test/misbehave.
    misbehave: Misbehaviour = field(default_factory=Misbehaviour)
    test_knobs: bool = False

    def __post_init__(self) -> None:
        parts = urlsplit(self.issuer)
        # OIDC Discovery 1.0 section 3: issuer is an https URL without query or fragment
        # (http is tolerated here because this provider only ever runs on loopback).
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"issuer must be an absolute http(s) URL: {self.issuer!r}")
        if parts.query or parts.fragment:
            raise ConfigError(f"issuer must have no query or fragment: {self.issuer!r}")
        for name in ("token_ttl_s", "code_ttl_s", "login_ttl_s", "session_ttl_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.max_login_attempts < 1:
            raise ConfigError("max_login_attempts must be at least 1")
        # Freeze the mappings too, so a running app cannot be reconfigured behind its back.
        object.__setattr__(self, "clients", MappingProxyType(dict(self.clients)))
        object.__setattr__(self, "users", MappingProxyType(dict(self.users)))

    def endpoint(self, path: str) -> str:
        return self.issuer.rstrip("/") + path

    @property
    def issuer_path(self) -> str:
        """The issuer's path: where the provider's routes and its cookie live."""
        return urlsplit(self.issuer).path.rstrip("/") or "/"


@dataclass(frozen=True)
class SigningKey:
    """The RSA key tokens are signed with, and its public JWK. ``kid`` is the RFC 7638
    thumbprint, so it is stable for a given key (the same PEM gives the same kid)."""

    private_key: rsa.RSAPrivateKey
    kid: str
    public_jwk: Mapping[str, Any]

    @classmethod
    def load_or_generate(cls, path: Path | None) -> SigningKey:
        if path is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(loaded, rsa.RSAPrivateKey):
                raise ConfigError("signing key must be an RSA private key", source=str(path))
            key = loaded
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
        # RFC 7638 section 3: required members only, lexicographic order, no whitespace.
        canonical = json.dumps(
            {"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"), sort_keys=True
        )
        digest = hashlib.sha256(canonical.encode()).digest()
        kid = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        public = {"kty": "RSA", "n": jwk["n"], "e": jwk["e"], "kid": kid, "alg": "RS256"}
        public["use"] = "sig"
        return cls(key, kid, MappingProxyType(public))


def load_file(path: Path) -> tuple[dict[str, DevUser], dict[str, DevClient]]:
    """Read extra users and clients from YAML::

    users:
      carol: {password: carol-password, totp_secret: BASE32..., name: Carol, email: c@x}
    clients:
      other-app: {secret: s3cret, redirect_uris: [http://127.0.0.1:8081/cb]}
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(path)) from exc
    doc = load_yaml(raw, str(path)).doc or {}  # the one loader: a repeated user is refused
    if not isinstance(doc, dict):
        raise ConfigError("top level must be a mapping", source=str(path))
    users: dict[str, DevUser] = {}
    clients: dict[str, DevClient] = {}
    try:
        for name, spec in (doc.get("users") or {}).items():
            users[str(name)] = DevUser(
                password=str(spec["password"]),
                totp_secret=str(spec["totp_secret"]),
                name=str(spec.get("name", "")),
                email=str(spec.get("email", "")),
            )
        for client_id, spec in (doc.get("clients") or {}).items():
            clients[str(client_id)] = DevClient(
                secret=str(spec["secret"]),
                redirect_uris=tuple(str(u) for u in spec["redirect_uris"]),
                backchannel_logout_uri=(
                    str(spec["backchannel_logout_uri"])
                    if spec.get("backchannel_logout_uri")
                    else None
                ),
                post_logout_redirect_uris=tuple(
                    str(u) for u in spec.get("post_logout_redirect_uris") or ()
                ),
            )
    except (AttributeError, KeyError, TypeError) as exc:
        raise ConfigError(f"bad users/clients entry: {exc!r}", source=str(path)) from exc
    for name, user in users.items():
        try:
            pyotp.TOTP(user.totp_secret).byte_secret()
        except ValueError as exc:
            raise ConfigError(
                f"user {name}: totp_secret is not base32 of at least 112 bits", source=str(path)
            ) from exc
    return users, clients
