"""Builders for tests, over the fakes the package ships (``authz.store.memory``,
``authz.audit.testing``): one place for a clock, identities, ID tokens, step-up states,
settings and the step-up endpoints wired to fakes.

    clock = FakeClock(NOW)
    env = stepup_env(tmp_path, clock)         # StepupApp + fakes, ready for a TestClient
    clock.advance(30)                         # time moves only when a test says so
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from authz.audit.testing import MemoryAuditor
from authz.check.tokens import IdToken
from authz.config.policy_file import PolicyHolder
from authz.config.settings import OidcSettings, Settings, StepupSettings
from authz.core.session import Evidence, Identity
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

    def link(self, level: str, *, device: str | None = None, ip: str | None = None) -> str:
        """The signed ``ctx`` the Check would put in the step-up link."""
        return self.signer.sign(level=level, device=device, ip=ip, now=int(self.clock()))

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
    )
    return StepupEnv(app, clock, store, tokens, oidc, auditor, metrics, signer, s)


def replace(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace``, for the frozen values above."""
    return dataclasses.replace(obj, **changes)
