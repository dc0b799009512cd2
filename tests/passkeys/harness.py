"""A real aiohttp app serving the passkey endpoints on loopback, over real Redis, with the
real token verifier (keys made here), the real policy loader, the real session store and
(optionally) the real audit stream sink. Chromium reaches it as http://localhost:PORT,
which is a secure context, so WebAuthn works; the RP ID is ``localhost``.

Time is a ``Clock`` the test moves: nothing here sleeps.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry

from authz.audit.metrics import AuditMetrics
from authz.audit.service import build_auditor
from authz.audit.testing import dev_mac_settings
from authz.check.jwks import StaticKeySource
from authz.check.tokens import TokenVerifier
from authz.config.policy_file import PolicyHolder
from authz.config.settings import Settings, load_settings
from authz.core.session import session_key, user_key
from authz.ops.metrics import Metrics
from authz.stepup.link import ContextSigner
from authz.stepup.passkeys.attestation import Mds
from authz.stepup.passkeys.handlers import PasskeyRoutes, add_routes, build_passkey_routes
from authz.stepup.passkeys.links import LinkSigner
from authz.store.credentials import RedisCredentialStore
from authz.store.crypto import cipher_from_settings
from authz.store.sessions import RedisSessionStore
from tests.builders import FakeClock, Key, ec_key, jwks, sign, token_claims

ISS = "https://idp.test.example"
AUD = "trading-api"
CHROMIUM_AAGUID = "01020304-0506-0708-0102-030405060708"  # Chromium's virtual authenticator

POLICY = """
levels:
  public: {public: true}
  standard: {}
  elevated:
    title: Account access
    acr: [mfa, phr]
    max_age: 900
    factors: [idp, passkey]
  high:
    title: Wire transfer authority
    acr: [phr]
    amr_any: [hwk]
    max_age: 300
    factors: [passkey]
    user_verification: required
    authenticators: {device_bound: true}
  pinned:
    title: Admin console
    acr: [phr]
    max_age: 300
    factors: [passkey]
    authenticators: {aaguids: [%(pinned)s]}
  wire:
    title: Wire approval
    acr: [phr]
    amr_any: [hwk]
    max_age: 300
    factors: [passkey]
    authenticators: {device_bound: true}
    transaction_bound: {fields: [amount, payee.name], require_body: true, ttl_s: 120}
routes:
  - {path_prefix: /accounts/, level: elevated, title: Client accounts}
  - {path_prefix: /wires/, methods: [POST], level: wire, title: Send a wire}
  - {path_prefix: /wires/, level: high, title: Wire transfers}
  - {path_prefix: /admin/, level: pinned, title: Administration}
default_level: standard
"""


class Clock(FakeClock):
    def __init__(self, now: float = 1_900_000_000.0) -> None:
        super().__init__(now)


@dataclass
class Stack:
    url: str
    port: int
    clock: Clock
    routes: PasskeyRoutes
    credentials: RedisCredentialStore
    sessions: RedisSessionStore
    links: LinkSigner
    signer: ContextSigner
    metrics: Metrics
    key: Key
    audit_stream: str | None
    settings: Settings
    redis: aioredis.Redis
    settings_file: Path
    subject: str = "alice"
    sid: str = "s1"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uk(self) -> str:
        return user_key(ISS, self.subject)

    @property
    def sk(self) -> str:
        return session_key(ISS, self.subject, self.sid)

    def token(self, *, acr: str = "mfa", age_s: int = 0, subject: str | None = None) -> str:
        now = int(self.clock())
        claims = token_claims(
            now,
            iss=ISS,
            sub=subject or self.subject,
            aud=AUD,
            iat=now,
            exp=now + 3600,
            sid=self.sid,
            acr=acr,
            amr=["pwd", "otp"] if acr == "mfa" else ["pwd"],
            auth_time=now - age_s,
        )
        return sign(self.key, claims)

    def stepup_url(self, level: str, rd: str = "/done", tx: str | None = None) -> str:
        ctx = self.signer.sign(
            level=level, session_key=self.sk, device=None, ip=None, now=int(self.clock())
        )
        url = f"{self.url}/_stepup/passkey?level={level}&rd={rd}&ctx={ctx}"
        return url + (f"&tx={tx}" if tx else "")


def settings_for(
    tmp: Path, port: int, policy_file: Path, redis_url: str, prefix: str, **passkeys: Any
) -> tuple[Settings, Path]:
    """The settings, also written to ``tmp/settings.yaml`` (JSON is YAML) for the CLI, with
    a real key file so the CLI reads what the app sealed."""
    key_file = tmp / "crypto.key"
    key_file.write_bytes(base64.b64encode(os.urandom(32)))
    doc = {
        "policy_file": str(policy_file),
        "redis": {"url": redis_url, "key_prefix": prefix, "deadline_ms": 2000},
        "oidc": {"issuer": ISS, "client_id": "stepup-authz", "audience": AUD},
        "stepup": {"public_url": f"http://localhost:{port}", "cookie_secure": False},
        "crypto": {"keys": {"k1": str(key_file)}, "active_kid": "k1"},
        "audit": {"enabled": True, "stream_key": f"{prefix}audit", **dev_mac_settings(tmp)},
        "passkeys": {"enabled": True, "enrol_level": "elevated", **passkeys},
    }
    path = tmp / "settings.yaml"
    path.write_text(json.dumps(doc))
    return load_settings(path), path


async def _done(request: web.Request) -> web.Response:
    return web.Response(text="<h1>done</h1>", content_type="text/html")


def _write_policy(tmp: Path, pinned_aaguid: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    policy_file = tmp / "policy.yaml"
    policy_file.write_text(POLICY % {"pinned": pinned_aaguid})
    return policy_file


@asynccontextmanager
async def passkey_stack(
    tmp: Path,
    redis_url: str,
    prefix: str,
    *,
    pinned_aaguid: str = CHROMIUM_AAGUID,
    audit: bool = False,
    mds: Mds | None = None,
    **passkeys: Any,
) -> AsyncIterator[Stack]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    policy_file = _write_policy(tmp, pinned_aaguid)
    settings, settings_file = settings_for(tmp, port, policy_file, redis_url, prefix, **passkeys)
    clock = Clock()
    key = ec_key("k1")
    tokens = TokenVerifier(settings.oidc, StaticKeySource(jwks(key)))
    client = aioredis.Redis.from_url(redis_url)
    cipher = cipher_from_settings(settings.crypto)
    sessions = RedisSessionStore(client, prefix=prefix, deadline_ms=2000, cipher=cipher)
    metrics = Metrics(CollectorRegistry())
    signer = ContextSigner(b"c" * 32, max_age_s=300)
    auditor = None
    stream = None
    if audit:
        stream = settings.audit.stream_key
        auditor = build_auditor(settings, client, None, AuditMetrics(CollectorRegistry()), [])
        assert auditor is not None
    # The service's own factory: the same parts app.py will hand it.
    routes = build_passkey_routes(
        settings,
        policy=PolicyHolder(policy_file),
        tokens=tokens,
        client=client,
        sessions=sessions,
        metrics=metrics,
        auditor=auditor,
        signer=signer,
        clock=clock,
    )
    if mds is not None:
        routes.mds = mds
    creds = routes.store
    links = routes.links
    app = web.Application(client_max_size=64 * 1024)
    add_routes(app, routes)
    app.router.add_get("/done", _done)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        raise
    await routes.startup()
    try:
        yield Stack(
            url=f"http://localhost:{port}",
            port=port,
            clock=clock,
            routes=routes,
            credentials=creds,
            sessions=sessions,
            links=links,
            signer=signer,
            metrics=metrics,
            key=key,
            audit_stream=stream,
            settings=settings,
            redis=client,
            settings_file=settings_file,
        )
    finally:
        await runner.cleanup()
        if auditor is not None:
            await auditor.aclose()
        await client.aclose()


def b64u(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def new_prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"
