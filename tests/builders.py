"""Builders for tests, over the fakes the package ships (``authz.store.memory``,
``authz.audit.testing``): one place for a clock, identities, ID tokens, step-up states,
settings, the step-up endpoints wired to fakes, the CheckRequest Envoy sends, signed tokens
and waiting on a condition.

    clock = FakeClock(NOW)
    env = stepup_env(tmp_path, clock)         # StepupApp + fakes, ready for a TestClient
    clock.advance(30)                         # time moves only when a test says so

    key = rsa_key("k1")                       # a signing key and its public JWK (key.jwk())
    token = sign(key, token_claims(NOW, acr="pwd"))
    req = check_request("/accounts/1", {"authorization": f"Bearer {token}"})
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import jwt
import pyotp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from envoy.service.auth.v3 import external_auth_pb2

from authz.audit.testing import MemoryAuditor
from authz.check.devices import DeviceCookies, DeviceResolver
from authz.check.tokens import IdToken
from authz.config.policy_file import PolicyHolder
from authz.config.settings import OidcSettings, Settings, StepupSettings
from authz.core.session import Evidence, Identity, session_key
from authz.devidp import ALICE_TOTP_SECRET, BOB_TOTP_SECRET
from authz.errors import OidcError, TokenError
from authz.ops.metrics import Metrics
from authz.stepup.endpoints import StepupApp
from authz.stepup.link import ContextSigner
from authz.store.memory import MemorySessionStore

NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
ISSUER = "https://idp.example.com"
CLIENT_ID = "stepup-authz"
AUDIENCE = "trading-api"

POLICY = """\
levels:
  public:   {public: true}
  standard: {}
  elevated: {acr: [mfa, phr], max_age: 900}
  high:     {acr: [phr], amr_any: [hwk, fido], max_age: 300, bind: [device, ip]}
default_level: standard
routes:
  - {path: /, level: public}
  - {path_prefix: /accounts/, methods: [GET], level: elevated}
  - {path_prefix: /wires/, methods: [POST, PUT], level: high}
"""


class FakeClock:
    """A clock that moves only when told (``advance``): callable like ``time.time``."""

    def __init__(self, now: float = NOW) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def identity(
    subject: str = "alice",
    *,
    issuer: str = ISSUER,
    sid: str = "s1",
    acr: str | None = "pwd",
    amr: tuple[str, ...] = ("pwd",),
    auth_time: int | None = NOW - 600,
    expires_at: int = NOW + 3600,
    issued_at: int = NOW - 600,
) -> Identity:
    """A verified access token's identity (what the token verifier would return)."""
    return Identity(
        issuer, subject, sid, Evidence(acr, amr, auth_time), expires_at, issued_at=issued_at
    )


def id_token(
    subject: str = "alice",
    *,
    issuer: str = ISSUER,
    acr: str | None = "mfa",
    amr: tuple[str, ...] = ("pwd", "otp"),
    auth_time: int | None = NOW,
    sid: str | None = "s1",
    **claims: Any,
) -> IdToken:
    """A verified ID token (what ``verify_id_token`` would return)."""
    body: dict[str, Any] = {"iss": issuer, "sub": subject, "acr": acr, "amr": list(amr)}
    if auth_time is not None:
        body["auth_time"] = auth_time
    body.update(claims)
    return IdToken(issuer, subject, Evidence(acr, amr, auth_time), sid, body)


class FakeTokens:
    """The token verifier the step-up endpoints and the authorizer see: ``access`` maps a
    token string to its identity (anything else is token-invalid); ``next_id_token`` is
    what the next ``verify_id_token`` returns (or raises), and ``nonces`` records the
    nonces it was asked to check."""

    def __init__(self) -> None:
        self.access: dict[str, Identity] = {}
        self.next_id_token: IdToken | Exception = id_token()
        self.nonces: list[str] = []

    async def verify_access_token(self, token: str, now: int) -> Identity:
        found = self.access.get(token)
        if found is None:
            raise TokenError("unknown token")
        return found

    async def verify_id_token(self, token: str, now: int, *, nonce: str) -> IdToken:
        self.nonces.append(nonce)
        if isinstance(self.next_id_token, Exception):
            raise self.next_id_token
        return self.next_id_token


@dataclass
class FakeOidc:
    """The relying party: records every authorization request; ``exchange_code`` returns
    ``token_response`` (or raises ``exchange_error``) and records the verifier it got."""

    authorize_endpoint: str = f"{ISSUER}/authorize"
    requests: list[dict[str, Any]] = field(default_factory=list)
    token_response: dict[str, Any] = field(
        default_factory=lambda: {"id_token": "id-token", "access_token": "access-token"}
    )
    exchange_error: OidcError | None = None
    exchanged: list[tuple[str, str]] = field(default_factory=list)
    requires_iss: bool = False  # the IdP's RFC 9207 advertisement

    def authorize_url(self, **params: Any) -> str:
        self.requests.append(params)
        shown = {k: v for k, v in params.items() if v not in (None, (), False)}
        return f"{self.authorize_endpoint}?{urlencode(shown, doseq=True)}"

    async def exchange_code(self, code: str, verifier: str) -> dict[str, Any]:
        self.exchanged.append((code, verifier))
        if self.exchange_error is not None:
            raise self.exchange_error
        return dict(self.token_response)


LINK_KEY = b"k" * 32


def settings(tmp_path: Path, **stepup: Any) -> Settings:
    policy = tmp_path / "policy.yaml"
    if not policy.exists():
        policy.write_text(POLICY)
    return Settings(
        policy_file=policy,
        oidc=OidcSettings(issuer=ISSUER, client_id=CLIENT_ID, audience=AUDIENCE),
        stepup=StepupSettings(public_url="https://trading.example.com", **stepup),
    )


@dataclass
class StepupEnv:
    """The step-up endpoints wired to fakes, and the fakes (to arrange and to inspect)."""

    app: StepupApp
    clock: FakeClock
    store: MemorySessionStore
    tokens: FakeTokens
    oidc: FakeOidc
    auditor: MemoryAuditor
    metrics: Metrics
    signer: ContextSigner
    settings: Settings
    devices: DeviceResolver

    def link(
        self,
        level: str,
        *,
        device: str | None = None,
        ip: str | None = None,
        subject: str = "alice",
        sid: str = "s1",
        nonce: str | None = None,
    ) -> str:
        """The signed ``ctx`` the Check would put in the step-up link of that session."""
        return self.signer.sign(
            level=level,
            session_key=session_key(ISSUER, subject, sid),
            device=device,
            ip=ip,
            now=int(self.clock()),
            nonce=nonce,
        )

    def completions(self, level: str, result: str, factor: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "stepup_authz_stepup_completions_total",
            {"level": level, "result": result, "factor": factor},
        )
        return value or 0.0


def stepup_env(tmp_path: Path, clock: FakeClock | None = None, **stepup: Any) -> StepupEnv:
    clock = clock or FakeClock()
    s = settings(tmp_path, **stepup)
    store = MemorySessionStore(clock)
    tokens, oidc, auditor, metrics = FakeTokens(), FakeOidc(), MemoryAuditor(), Metrics()
    signer = ContextSigner(LINK_KEY, s.stepup.state_ttl_s)
    devices = DeviceResolver(cookies=DeviceCookies(signer.derived_key(), "__Host-stepup-device"))
    app = StepupApp(
        settings=s,
        policy=PolicyHolder(s.policy_file),
        tokens=tokens,
        store=store,
        oidc=oidc,
        metrics=metrics,
        clock=clock,
        auditor=auditor,
        signer=signer,
        devices=devices,
    )
    return StepupEnv(app, clock, store, tokens, oidc, auditor, metrics, signer, s, devices)


def replace(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace``, for the frozen values above."""
    return dataclasses.replace(obj, **changes)


# -- the CheckRequest Envoy sends -------------------------------------------------------------


def check_request(
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    *,
    method: str = "GET",
    host: str = "app.test",
    scheme: str = "https",
    ip: str = "10.0.0.5",
    context: Mapping[str, str] | None = None,
) -> external_auth_pb2.CheckRequest:
    """An ext_authz v3 CheckRequest for one HTTP request: request line, headers, the client
    address Envoy computed (``ip``: in ``x-stepup-peer-address``, as the rendered config's
    header_mutation sets it, and as the connection's peer) and the route's
    ``context_extensions``. An empty string leaves a field unset, as Envoy does when it has
    no value; a ``headers`` entry for the peer header wins."""
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.scheme = method, path, host, scheme
    if ip:
        http.headers["x-stepup-peer-address"] = ip
    http.headers.update(headers or {})
    req.attributes.source.address.socket_address.address = ip
    req.attributes.context_extensions.update(context or {})
    return req


def response_header(resp: external_auth_pb2.CheckResponse, name: str) -> str | None:
    """A header the CheckResponse sets (on the upstream request when allowed, on the
    client's answer when denied)."""
    allowed = resp.HasField("ok_response")
    headers = resp.ok_response.headers if allowed else resp.denied_response.headers
    return next((str(h.header.value) for h in headers if h.header.key == name), None)


# -- signed tokens ----------------------------------------------------------------------------

DROP: Any = object()  # a claim or header member to leave out


def b64(raw: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def public_jwk(private: Any, alg: str = "RS256", **members: Any) -> dict[str, Any]:
    """The public half of ``private`` as a JWK, with ``members`` (kid, use, alg ...) added."""
    jwk: dict[str, Any] = json.loads(jwt.get_algorithm_by_name(alg).to_jwk(private.public_key()))
    jwk.update(members)
    return jwk


def public_pem(private: Any) -> bytes:
    return bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@dataclass(frozen=True)
class Key:
    """A token signing key: its ``kid``, the private key and the algorithm it signs with."""

    kid: str
    private: Any
    alg: str

    def jwk(self) -> dict[str, Any]:
        """As an IdP publishes it in its JWKS."""
        return {
            **public_jwk(self.private, self.alg),
            "kid": self.kid,
            "use": "sig",
            "alg": self.alg,
        }

    def public_pem(self) -> bytes:
        return public_pem(self.private)


def rsa_key(kid: str = "rsa-1", alg: str = "RS256", *, bits: int = 2048) -> Key:
    return Key(kid, rsa.generate_private_key(public_exponent=65537, key_size=bits), alg)


def ec_key(kid: str = "ec-1", alg: str = "ES256") -> Key:
    return Key(kid, ec.generate_private_key(ec.SECP256R1()), alg)


def jwks(*keys: Key) -> dict[str, Any]:
    """A JWKS document publishing ``keys``."""
    return {"keys": [k.jwk() for k in keys]}


def token_claims(now: int = NOW, **over: Any) -> dict[str, Any]:
    """An access token's claims as the IdP issues them: alice, session s1, an mfa sign-in
    20 s before ``now``, valid for 5 minutes. ``over`` changes or adds claims; DROP leaves
    one out."""
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "sid": "s1",
        "iat": now - 10,
        "exp": now + 300,
        "acr": "mfa",
        "amr": ["pwd", "otp"],
        "auth_time": now - 20,
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not DROP}


def sign(key: Key, payload: Mapping[str, Any] | bytes, **header: Any) -> str:
    """A compact JWS over ``payload`` (claims, or the exact payload bytes) signed with
    ``key``. The header is ``{"alg": key.alg, "typ": "JWT", "kid": key.kid}`` with the
    members of ``header`` changed or added, and those set to DROP left out.

    Signed by hand: pyjwt's encoder refuses some of what the attacks need (``kid: 0``,
    ``iss: 1``), and this way the header is exactly what the test wrote."""
    if "alg" in header:
        raise ValueError("the header's alg is the key's: use Key(kid, private, alg)")
    h = {"alg": key.alg, "typ": "JWT", "kid": key.kid, **header}
    h = {k: v for k, v in h.items() if v is not DROP}
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(json.dumps(h).encode())}.{b64(body)}"
    signature = jwt.get_algorithm_by_name(key.alg).sign(signing_input.encode(), key.private)
    return f"{signing_input}.{b64(signature)}"


# -- tokens from the dev IdP ------------------------------------------------------------------

TOTP_SECRETS = {"alice": ALICE_TOTP_SECRET, "bob": BOB_TOTP_SECRET}
DEV_CLIENT_SECRET = "dev-secret"


async def password_grant(
    idp_url: str,
    user: str = "alice",
    *,
    otp: bool = False,
    now: float | None = None,
    client_id: str = CLIENT_ID,
    client_secret: str = DEV_CLIENT_SECRET,
    **form: str,
) -> dict[str, Any]:
    """The dev IdP's token response for ``user`` (its password grant, made for tests):
    with ``otp`` a TOTP code too (an mfa sign-in), computed at ``now`` when the IdP runs
    on an injected clock. ``form`` adds fields (``sid``, ``acr_values``)."""
    data = {"grant_type": "password", "username": user, "password": f"{user}-password", **form}
    if otp:
        totp = pyotp.TOTP(TOTP_SECRETS[user])
        data["otp"] = totp.now() if now is None else totp.at(now)
    basic = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{idp_url}/token", data=data, headers={"Authorization": f"Basic {basic}"}) as r,
    ):
        assert r.status == 200, await r.text()
        doc: dict[str, Any] = await r.json()
    return doc


async def password_token(idp_url: str, user: str = "alice", **kw: Any) -> str:
    """The access token of ``password_grant``."""
    return str((await password_grant(idp_url, user, **kw))["access_token"])


async def idp_sign_in(
    session: aiohttp.ClientSession,
    authorize_url: str,
    user: str = "alice",
    *,
    now: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> str:
    """Answer the dev IdP's sign-in form at ``authorize_url`` as a browser does: password
    and a TOTP code (for ``now`` when the IdP runs on an injected clock). Returns where
    the IdP redirects: the client's callback URL with the code and state."""
    async with session.get(authorize_url, headers=headers, allow_redirects=False) as resp:
        page = await resp.text()
    found = re.search(r'name="request_id" value="([^"]+)"', page)
    assert found is not None, page
    totp = pyotp.TOTP(TOTP_SECRETS[user])
    form = {
        "request_id": found.group(1),
        "username": user,
        "password": f"{user}-password",
        "otp": totp.now() if now is None else totp.at(now),
    }
    async with session.post(
        authorize_url.split("?")[0], data=form, headers=headers, allow_redirects=False
    ) as resp:
        assert resp.status == 302, await resp.text()
        return str(resp.headers["Location"])


# -- waiting on a condition -------------------------------------------------------------------
#
# For what a test cannot be told by an event: a real process (a subprocess writing files, a
# server coming up) or a real component's own timer. The timeout is generous: it only turns
# a hang into a failure with a message; nothing is asserted about how long it took.

WAIT_TIMEOUT_S = 10.0


def wait_until(
    condition: Callable[[], object],
    what: str,
    *,
    timeout_s: float = WAIT_TIMEOUT_S,
    every_s: float = 0.02,
) -> None:
    """Return once ``condition()`` is true; AssertionError naming ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


async def async_wait_until(
    condition: Callable[[], object] | Callable[[], Awaitable[object]],
    what: str,
    *,
    timeout_s: float = WAIT_TIMEOUT_S,
    every_s: float = 0.02,
) -> None:
    """``wait_until`` on the event loop; ``condition`` may be a coroutine function."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                result = condition()
                if isinstance(result, Awaitable):
                    result = await result
                if result:
                    return
                await asyncio.sleep(every_s)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}") from None
