"""Token verification and key sources: the attacks RFC 8725 lists, the clock edges, JWKS I/O.

JwksKeySource runs against a real aiohttp server on 127.0.0.1 (port 0).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry

from authz.check.jwks import KeySet
from authz.check.tokens import (
    MAX_TOKEN_BYTES,
    FileKeySource,
    JwksKeySource,
    KeySource,
    StaticKeySource,
    TokenVerifier,
    discover_jwks_url,
    key_source_from_settings,
)
from authz.config.settings import OidcSettings
from authz.errors import KeysUnavailable, TokenError
from authz.ops.metrics import Metrics
from tests import builders
from tests.builders import (
    DROP,
    FakeClock,
    Key,
    async_wait_until,
    b64,
    ec_key,
    jwks,
    rsa_key,
    token_claims,
)

ISS = "https://idp.example.com/realms/firm"
AUD = "trading-api"
CLIENT = "stepup-authz"
NOW = 1_700_000_000


# -- keys and tokens -------------------------------------------------------------------------

RSA_KEY = rsa_key("rsa-1")
RSA_KEY2 = rsa_key("rsa-2")
EC_KEY = ec_key("ec-1")
EVIL_KEY = rsa_key("rsa-1")  # same kid as the real key
_RSA, _EVIL = RSA_KEY.private, EVIL_KEY.private

# This suite's IdP: its own issuer, session "s-1", and the client as azp.
claims = partial(token_claims, NOW, iss=ISS, sid="s-1", azp=CLIENT)


def sign(key: Key, payload: dict[str, Any] | None = None, **header: Any) -> str:
    """``builders.sign`` with this suite's claims when none are given."""
    return builders.sign(key, claims() if payload is None else payload, **header)


def forge(header: dict[str, Any], payload: dict[str, Any], sig: bytes = b"x") -> str:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(sig)])


def settings(**over: Any) -> OidcSettings:
    base: dict[str, Any] = {"issuer": ISS, "client_id": CLIENT, "audience": AUD}
    base.update(over)
    return OidcSettings(**base)


class CountingSource:
    """Wraps a key source and counts refresh() calls."""

    def __init__(self, inner: KeySource) -> None:
        self.inner = inner
        self.refreshes = 0

    def get(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        return self.inner.get(kid, alg)

    async def refresh(self) -> bool:
        self.refreshes += 1
        return await self.inner.refresh()

    def retry_after(self, kid: str | None = None) -> float | None:
        return self.inner.retry_after(kid)

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def ready(self) -> bool:
        return self.inner.ready


def verifier(*keys: Key, **over: Any) -> TokenVerifier:
    return TokenVerifier(settings(**over), StaticKeySource(jwks(*(keys or (RSA_KEY, EC_KEY)))))


async def invalid(
    v: TokenVerifier,
    token: str,
    now: int = NOW,
    reason: str = "token-invalid",
    match: str | None = None,
) -> TokenError:
    with pytest.raises(TokenError, match=match) as ei:
        await v.verify_access_token(token, now)
    assert ei.value.reason == reason
    assert not token or token not in str(ei.value)
    return ei.value


# -- the happy paths -------------------------------------------------------------------------


@pytest.mark.parametrize("key", [RSA_KEY, EC_KEY], ids=["RS256", "ES256"])
async def test_valid_token(key: Key) -> None:
    ident = await verifier().verify_access_token(sign(key), NOW)
    assert (ident.issuer, ident.subject, ident.session_id) == (ISS, "alice", "s-1")
    assert ident.evidence.acr == "mfa"
    assert ident.evidence.amr == ("pwd", "otp")
    assert ident.evidence.auth_time == NOW - 20
    assert ident.expires_at == NOW + 300
    assert ident.client_id == CLIENT


async def test_client_id_claim_preferred_and_optional_evidence() -> None:
    tok = sign(RSA_KEY, claims(client_id="svc", acr=DROP, amr=DROP, auth_time=DROP))
    ident = await verifier().verify_access_token(tok, NOW)
    assert ident.client_id == "svc"
    assert (ident.evidence.acr, ident.evidence.amr, ident.evidence.auth_time) == (None, (), None)


async def test_token_without_kid_uses_the_only_fitting_key() -> None:
    v = verifier(RSA_KEY)
    assert (await v.verify_access_token(sign(RSA_KEY, kid=DROP), NOW)).subject == "alice"
    # with two RSA keys a kid-less token is ambiguous -> refused
    await invalid(verifier(RSA_KEY, RSA_KEY2), sign(RSA_KEY, kid=DROP))


# -- algorithm and header attacks ------------------------------------------------------------


async def test_alg_none_refused() -> None:
    unsigned = jwt.encode(claims(), "", algorithm="none", headers={"kid": "rsa-1"})
    assert unsigned.endswith(".")
    await invalid(verifier(), unsigned, match="compact")
    await invalid(verifier(), forge({"alg": "none", "kid": "rsa-1"}, claims()), match="alg")
    await invalid(verifier(), forge({"alg": "None", "kid": "rsa-1"}, claims()), match="alg")


async def test_hs256_with_the_rsa_public_key_as_secret_refused() -> None:
    header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
    body = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    mac = hmac.new(RSA_KEY.public_pem(), body.encode(), hashlib.sha256).digest()
    await invalid(verifier(), f"{body}.{b64(mac)}", match="alg")
    # even when a careless config lists it, HS* is never used
    with pytest.raises(ValueError, match="asymmetric"):
        settings(algorithms=("RS256", "HS256"))


async def test_alg_not_in_allowlist() -> None:
    rs384 = Key("rsa-1", _RSA, "RS384")
    await invalid(verifier(RSA_KEY), sign(rs384), match="alg")
    # allowed in config, but the key declares alg=RS256: the key's own alg must agree
    await invalid(verifier(RSA_KEY, algorithms=("RS256", "RS384")), sign(rs384))
    # ES256 header with an RSA key id: kty does not fit
    await invalid(verifier(RSA_KEY), sign(EC_KEY, kid="rsa-1"))


async def test_embedded_jwk_and_jku_are_ignored(idp: Idp) -> None:
    evil_jwk = EVIL_KEY.jwk()
    v = verifier(RSA_KEY)
    # attacker key, its public JWK embedded, same kid as the real key
    await invalid(v, sign(EVIL_KEY, jwk=evil_jwk), match="signature")
    # no kid at all: the only configured key is used, never the embedded one
    await invalid(v, sign(EVIL_KEY, jwk=evil_jwk, kid=DROP), match="signature")
    # jku/x5u pointing at a server that does serve the attacker's key: never fetched
    evil = Key("evil", _EVIL, "RS256")
    idp.doc = jwks(evil)
    url = idp.base + "/jwks"
    await invalid(v, sign(evil, jku=url, x5u=url, x5c=["AAAA"]))
    assert idp.hits == 0


async def test_crit_header_refused() -> None:
    await invalid(verifier(), sign(RSA_KEY, crit=["exp"], exp=1), match="crit")


async def test_huge_kid_refused_without_lookup() -> None:
    src = CountingSource(StaticKeySource(jwks(RSA_KEY)))
    v = TokenVerifier(settings(), src)
    await invalid(v, sign(RSA_KEY, kid="k" * 257), match="kid")
    assert src.refreshes == 0


async def test_unknown_kid_refreshes_once_then_refuses() -> None:
    src = CountingSource(StaticKeySource(jwks(RSA_KEY)))
    v = TokenVerifier(settings(), src)
    await invalid(v, sign(RSA_KEY, kid="nope"), match="kid")
    assert src.refreshes == 1


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a.b",
        "a.b.c.d.e",
        "not a token",
        "!!!.e30.sig",
        "e30.e30.",
        "eyJ.e30.c2ln",
        b64(b"[1]") + ".e30.c2ln",
        b64(b'{"alg":"RS256","alg":"none"}') + ".e30.c2ln",
    ],
)
async def test_malformed(token: str) -> None:
    await invalid(verifier(), token)


async def test_oversized_token_refused_before_parsing() -> None:
    tok = sign(RSA_KEY, claims(pad="x" * MAX_TOKEN_BYTES))
    assert len(tok) > MAX_TOKEN_BYTES
    await invalid(verifier(), tok, match="large")


async def test_signature_tampering() -> None:
    tok = sign(RSA_KEY)
    h, _, s = tok.split(".")
    other = b64(json.dumps(claims(sub="mallory")).encode())
    await invalid(verifier(), f"{h}.{other}.{s}", match="signature")


async def test_short_rsa_key_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point
    weak = Key("weak", small, "RS256")
    await invalid(verifier(weak), sign(weak))


# -- claims ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "iss", [ISS + "/", ISS + "x", ISS[:-1], "https://idp.example.com", ISS.upper(), None, 1]
)
async def test_iss_must_match_exactly(iss: Any) -> None:
    await invalid(
        verifier(), sign(RSA_KEY, claims(iss=iss if iss is not None else DROP)), match="iss"
    )


@pytest.mark.parametrize("aud", ["other", AUD + "x", [], ["other"], [AUD, 1], {"a": AUD}, DROP])
async def test_aud_mismatch(aud: Any) -> None:
    await invalid(verifier(), sign(RSA_KEY, claims(aud=aud)), match="aud")


async def test_list_aud_containing_ours() -> None:
    ident = await verifier().verify_access_token(sign(RSA_KEY, claims(aud=["x", AUD])), NOW)
    assert ident.subject == "alice"


@pytest.mark.parametrize("sub", ["", 7, DROP])
async def test_sub_required(sub: Any) -> None:
    await invalid(verifier(), sign(RSA_KEY, claims(sub=sub)), match="sub")


@pytest.mark.parametrize(
    ("leeway", "now", "ok"),
    [
        (0, NOW + 299, True),
        (0, NOW + 300, False),
        (30, NOW + 299, True),
        (30, NOW + 300, True),
        (30, NOW + 329, True),
        (30, NOW + 330, False),
    ],
)
async def test_exp_boundary(leeway: int, now: int, ok: bool) -> None:
    v = verifier(leeway_s=leeway, token_cache_size=0)
    tok = sign(RSA_KEY)
    if ok:
        assert (await v.verify_access_token(tok, now)).expires_at == NOW + 300
    else:
        await invalid(v, tok, now, reason="token-expired")


@pytest.mark.parametrize("bad", [None, "1", 1.5, True, float(NOW + 300)])
async def test_time_claims_must_be_integers(bad: Any) -> None:
    for name in ("exp", "iat"):
        await invalid(
            verifier(),
            sign(RSA_KEY, claims(**{name: bad if bad is not None else DROP})),
            match=name,
        )
    if bad is not None:
        await invalid(verifier(), sign(RSA_KEY, claims(nbf=bad)), match="nbf")


async def test_nbf_and_iat_in_the_future() -> None:
    v = verifier(leeway_s=30)
    await invalid(v, sign(RSA_KEY, claims(nbf=NOW + 31)), match="nbf")
    assert await v.verify_access_token(sign(RSA_KEY, claims(nbf=NOW + 30)), NOW)
    await invalid(v, sign(RSA_KEY, claims(iat=NOW + 31)), match="iat")
    assert await v.verify_access_token(sign(RSA_KEY, claims(iat=NOW + 30)), NOW)


@pytest.mark.parametrize(
    ("typ", "ok"),
    [
        ("at+jwt", True),
        ("AT+JWT", True),
        ("application/at+jwt", True),
        ("Application/At+JWT", True),
        ("JWT", False),
        (None, False),
        ("xat+jwt", False),
    ],
)
async def test_typ(typ: str | None, ok: bool) -> None:
    v = verifier(token_typ="at+jwt")
    tok = sign(RSA_KEY, typ=DROP if typ is None else typ)
    if ok:
        assert await v.verify_access_token(tok, NOW)
    else:
        await invalid(v, tok, match="typ")


async def test_typ_not_checked_when_unset() -> None:
    assert await verifier().verify_access_token(sign(RSA_KEY, typ="whatever"), NOW)


async def test_without_sid_each_token_is_its_own_session() -> None:
    """The review's widening: with `sid_fallback_claim: sub` by default, one step-up
    elevated every token of the user on every device. Now, without `sid`, the session is
    the token: two tokens of one user are two sessions."""
    one = sign(RSA_KEY, claims(sid=DROP, jti="t-1"))
    two = sign(RSA_KEY, claims(sid=DROP, jti="t-2"))
    a = (await verifier().verify_access_token(one, NOW)).session_id
    b = (await verifier().verify_access_token(two, NOW)).session_id
    assert a.startswith("token:") and b.startswith("token:") and a != b
    assert (await verifier().verify_access_token(one, NOW)).session_id == a  # stable


async def test_sid_fallback_is_an_opt_in() -> None:
    tok = sign(RSA_KEY, claims(sid=DROP))
    assert (await verifier(sid_fallback_claim="sub").verify_access_token(tok, NOW)).session_id == (
        "alice"
    )
    assert (
        await verifier(sid_fallback_claim="sess").verify_access_token(
            sign(RSA_KEY, claims(sid=DROP, sess="z")), NOW
        )
    ).session_id == "z"
    await invalid(verifier(sid_fallback_claim="sess"), tok, match="session id")
    await invalid(verifier(), sign(RSA_KEY, claims(sid=5)), match="sid")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("amr", "otp"),
        ("amr", ["otp", 1]),
        ("amr", {"otp": 1}),
        ("auth_time", True),
        ("auth_time", 1.5),
        ("auth_time", "1700000000"),
        ("acr", 2),
        ("acr", ["mfa"]),
        ("client_id", 3),
    ],
)
async def test_wrong_typed_evidence(name: str, value: Any) -> None:
    await invalid(verifier(), sign(RSA_KEY, claims(**{name: value})), match=name)


# -- cache -----------------------------------------------------------------------------------


async def test_cache_hit_then_expiry() -> None:
    v = verifier(leeway_s=30)
    tok = sign(RSA_KEY)
    first = await v.verify_access_token(tok, NOW)
    assert await v.verify_access_token(tok, NOW + 100) is first
    assert (v.cache_stats.hits, v.cache_stats.misses) == (1, 1)
    # at exp the cache no longer answers; within the leeway the full check still accepts
    assert await v.verify_access_token(tok, NOW + 300) == first
    assert v.cache_stats.hits == 1
    await invalid(v, tok, NOW + 330, reason="token-expired")


async def test_cache_rechecks_nbf_and_is_bounded() -> None:
    v = verifier(leeway_s=0, token_cache_size=2)
    tok = sign(RSA_KEY, claims(nbf=NOW))
    await v.verify_access_token(tok, NOW)
    await invalid(v, tok, NOW - 1, match="nbf")  # an earlier `now` (clock stepped back)
    toks = [sign(RSA_KEY, claims(sub=f"u{i}")) for i in range(3)]
    for t in toks:
        await v.verify_access_token(t, NOW)
    assert len(v._cache) == 2


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_cache_metrics_report_size_hits_and_misses() -> None:
    """The token cache's gauge follows the cache (it plotted a constant 0 when nothing set
    it), and the lookups counter makes the miss rate visible, evictions included."""
    metrics = Metrics()
    r = metrics.registry
    v = verifier(leeway_s=0, token_cache_size=2)
    metrics.token_cache.capacity(2)
    v.observe_cache(metrics.token_cache)
    assert _sample(r, "stepup_authz_token_cache_entries") == 0
    assert _sample(r, "stepup_authz_token_cache_capacity") == 2
    toks = [sign(RSA_KEY, claims(sub=f"u{i}")) for i in range(3)]
    await v.verify_access_token(toks[0], NOW)
    assert _sample(r, "stepup_authz_token_cache_entries") == 1
    await v.verify_access_token(toks[0], NOW)  # hit
    await v.verify_access_token(toks[1], NOW)
    await v.verify_access_token(toks[2], NOW)  # evicts toks[0]
    assert _sample(r, "stepup_authz_token_cache_entries") == 2
    await v.verify_access_token(toks[0], NOW)  # a miss again: it was evicted
    assert _sample(r, "stepup_authz_token_cache_lookups_total", result="hit") == 1
    assert _sample(r, "stepup_authz_token_cache_lookups_total", result="miss") == 4
    assert (v.cache_stats.hits, v.cache_stats.misses) == (1, 4)
    # an entry found expired is dropped: the gauge goes down with it
    await invalid(v, toks[2], NOW + 10_000, reason="token-expired")
    assert _sample(r, "stepup_authz_token_cache_entries") == 1
    assert _sample(r, "stepup_authz_token_cache_lookups_total", result="miss") == 5


async def test_cache_metrics_without_a_cache() -> None:
    metrics = Metrics()
    v = verifier(token_cache_size=0)
    v.observe_cache(metrics.token_cache)
    tok = sign(RSA_KEY)
    await v.verify_access_token(tok, NOW)
    await v.verify_access_token(tok, NOW)
    r = metrics.registry
    assert _sample(r, "stepup_authz_token_cache_entries") == 0
    assert _sample(r, "stepup_authz_token_cache_lookups_total", result="miss") == 2
    assert _sample(r, "stepup_authz_token_cache_lookups_total", result="hit") == 0


async def test_cache_dropped_when_key_withdrawn(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(RSA_KEY)))
    clock = FakeClock()
    src = FileKeySource(path, min_interval_s=30, clock=clock)
    await src.start()
    v = TokenVerifier(settings(), src)
    tok = sign(RSA_KEY)
    await v.verify_access_token(tok, NOW)
    path.write_text(json.dumps(jwks(RSA_KEY2)))
    clock.advance(31)
    assert await src.refresh() is True
    await invalid(v, tok, NOW + 1, match="kid")


# -- ID tokens -------------------------------------------------------------------------------


async def test_id_token() -> None:
    v = verifier()
    tok = sign(RSA_KEY, claims(aud=CLIENT, nonce="n-123"))
    got = await v.verify_id_token(tok, NOW, nonce="n-123")
    assert (got.subject, got.issuer, got.claims["nonce"]) == ("alice", ISS, "n-123")
    for bad in ("n-124", "n-12", "n-1234"):
        with pytest.raises(TokenError, match="nonce"):
            await v.verify_id_token(tok, NOW, nonce=bad)
    with pytest.raises(TokenError, match="nonce"):
        await v.verify_id_token(sign(RSA_KEY, claims(aud=CLIENT)), NOW, nonce="n-123")
    with pytest.raises(TokenError, match="nonce"):
        await v.verify_id_token(tok, NOW, nonce="")
    with pytest.raises(TokenError, match="aud"):  # an access token is not an ID token
        await v.verify_id_token(sign(RSA_KEY, claims(nonce="n-123")), NOW, nonce="n-123")


async def test_id_token_azp() -> None:
    v = verifier()
    multi = claims(aud=[CLIENT, "other"], nonce="n")
    assert await v.verify_id_token(sign(RSA_KEY, multi), NOW, nonce="n")
    with pytest.raises(TokenError, match="azp"):
        await v.verify_id_token(sign(RSA_KEY, {**multi, "azp": "other"}), NOW, nonce="n")
    no_azp = {k: v for k, v in multi.items() if k != "azp"}
    with pytest.raises(TokenError, match="azp"):
        await v.verify_id_token(sign(RSA_KEY, no_azp), NOW, nonce="n")
    with pytest.raises(TokenError, match="auth_time"):
        await v.verify_id_token(sign(RSA_KEY, {**multi, "auth_time": "x"}), NOW, nonce="n")


async def test_verify_claims_with_other_audience_and_typ() -> None:
    tok = sign(RSA_KEY, claims(aud="x"), typ="application/logout+jwt")
    got = await verifier().verify_claims(tok, NOW, audience="x", typ="logout+jwt")
    assert got["aud"] == "x"


# -- key sets and static / file sources ------------------------------------------------------


def test_keyset_skips_unusable_keys() -> None:
    good = RSA_KEY.jwk()
    bad = [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {**good, "kid": "private", "d": "AQAB"},
        {**good, "kid": "enc", "use": "enc"},
        {**good, "kid": "ops", "key_ops": ["encrypt"]},
        {**good, "kid": "x" * 300},
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        "not-a-dict",
    ]
    ks = KeySet({"keys": [*bad, good]})
    assert len(ks) == 1
    assert ks.get("rsa-1", "RS256") is ks.get("rsa-1", "RS256")  # built once
    assert ks.get("hmac", "HS256") is None
    with pytest.raises(ValueError, match="usable"):
        KeySet({"keys": bad})
    with pytest.raises(ValueError, match="JWKS"):
        KeySet([good])


def test_key_without_alg_serves_compatible_algs_only() -> None:
    raw = {k: v for k, v in RSA_KEY.jwk().items() if k != "alg"}
    ks = KeySet({"keys": [raw]})
    assert ks.get("rsa-1", "PS256") is not None
    assert ks.get("rsa-1", "ES256") is None


async def test_static_source_without_keys_is_unavailable() -> None:
    src = StaticKeySource({"keys": []})
    assert not src.ready
    with pytest.raises(KeysUnavailable):
        await src.start()
    with pytest.raises(KeysUnavailable):
        await TokenVerifier(settings(), src).verify_access_token(sign(RSA_KEY), NOW)


async def test_file_source(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    src = FileKeySource(path)
    with pytest.raises(KeysUnavailable, match=r"jwks\.json"):
        await src.start()
    path.write_text(json.dumps(jwks(RSA_KEY)))
    await src.start()
    assert src.ready and src.get("rsa-1", "RS256") is not None
    path.write_text("{broken")
    assert await src.refresh() is False  # rate limited (30 s) anyway, and broken
    await src.aclose()


# -- JWKS over HTTP --------------------------------------------------------------------------


@dataclass
class Idp:
    """A tiny JWKS + discovery server. Set ``status``/``doc`` to misbehave; with ``hold``
    each JWKS request waits (``requested`` is set) until ``release`` is set."""

    doc: dict[str, Any]
    status: int = 200
    hold: bool = False
    hits: int = 0
    answered: int = 0
    discovery_hits: int = 0
    base: str = ""
    discovery: dict[str, Any] = field(default_factory=dict)
    requested: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def jwks(self, _: web.Request) -> web.Response:
        self.hits += 1
        self.requested.set()
        if self.hold:
            await self.release.wait()
        self.answered += 1
        if self.status != 200:
            return web.Response(status=self.status, text="boom")
        return web.json_response(self.doc)

    async def config(self, _: web.Request) -> web.Response:
        self.discovery_hits += 1
        return web.json_response(
            self.discovery or {"issuer": self.base, "jwks_uri": self.base + "/jwks"}
        )


@pytest.fixture
async def idp() -> AsyncIterator[Idp]:
    state = Idp(jwks(RSA_KEY))
    app = web.Application()
    app.router.add_get("/jwks", state.jwks)
    app.router.add_get("/.well-known/openid-configuration", state.config)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.base = f"http://{host}:{port}"
    yield state
    state.release.set()
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def jwks_source(
    idp: Idp, http: aiohttp.ClientSession, clock: Callable[[], float], **kw: Any
) -> JwksKeySource:
    kw.setdefault("refresh_every_s", None)
    return JwksKeySource(http, url=idp.base + "/jwks", min_interval_s=30, clock=clock, **kw)


async def test_jwks_unknown_kid_one_fetch_per_interval(
    idp: Idp, http: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    src = jwks_source(idp, http, clock)
    await src.start()
    assert idp.hits == 1
    v = TokenVerifier(settings(), src)
    assert await v.verify_access_token(sign(RSA_KEY), NOW)
    # start() counts as the interval's fetch: the refetch is held back, so the kid cannot
    # be judged yet -> keys-unavailable with the seconds left, never invalid_token
    held = await invalid(v, sign(RSA_KEY2), reason="keys-unavailable", match="rate-limited")
    assert isinstance(held, KeysUnavailable) and held.retry_after_s == 30
    assert idp.hits == 1
    clock.advance(31)
    # many concurrent requests with an unknown kid share one fetch
    results = await asyncio.gather(
        *(v.verify_access_token(sign(RSA_KEY2, claims(sub=f"u{i}")), NOW) for i in range(20)),
        return_exceptions=True,
    )
    assert all(isinstance(r, TokenError) and r.reason == "token-invalid" for r in results)
    assert idp.hits == 2
    clock.advance(10)
    held = await invalid(v, sign(RSA_KEY2), reason="keys-unavailable")
    assert isinstance(held, KeysUnavailable) and held.retry_after_s == 20
    assert idp.hits == 2  # within the interval: no fetch
    # the IdP rotates in the new key; once the interval has passed, one fetch finds it
    idp.doc = jwks(RSA_KEY, RSA_KEY2)
    clock.advance(31)
    assert (await v.verify_access_token(sign(RSA_KEY2), NOW)).subject == "alice"
    assert idp.hits == 3
    await src.aclose()


async def test_unknown_kid_waits_briefly_then_keys_unavailable_while_the_fetch_goes_on(
    idp: Idp, http: aiohttp.ClientSession
) -> None:
    """A slow IdP must not hold a Check past Envoy's timeout: the Check gets our own
    keys-unavailable after jwks_refresh_wait_ms; the fetch is not cancelled, and once it
    lands the rotated key verifies without another fetch."""
    clock = FakeClock()
    src = jwks_source(idp, http, clock)
    await src.start()
    v = TokenVerifier(settings(jwks_refresh_wait_ms=50), src)
    idp.doc, idp.hold = jwks(RSA_KEY, RSA_KEY2), True
    clock.advance(31)
    # The IdP holds the refresh until released: the Check's answer comes while the fetch is
    # still unanswered, after the verifier's own short wait (the timer under test). Had it
    # waited for the IdP, wait_for would end it with TimeoutError instead.
    with pytest.raises(KeysUnavailable, match="refreshed"):
        await asyncio.wait_for(v.verify_access_token(sign(RSA_KEY2), NOW), 10)
    assert (idp.hits, idp.answered) == (2, 1)  # start()'s fetch answered; the refresh held
    idp.release.set()  # the IdP answers now
    assert await src.refresh() is True  # joins the fetch in flight: the key set changed
    assert (await v.verify_access_token(sign(RSA_KEY2), NOW)).subject == "alice"
    assert idp.hits == 2
    await src.aclose()


async def test_jwks_rotation_and_failed_refresh_keeps_keys(
    idp: Idp, http: aiohttp.ClientSession
) -> None:
    clock = FakeClock()
    src = jwks_source(idp, http, clock)
    await src.start()
    v = TokenVerifier(settings(token_cache_size=0), src)
    idp.status = 500
    clock.advance(31)
    assert await src.refresh() is False
    assert idp.hits == 2
    assert await v.verify_access_token(sign(RSA_KEY), NOW)  # old keys still work
    idp.status, idp.doc = 200, {"keys": []}  # a useless document is a failure too
    clock.advance(31)
    assert await src.refresh() is False
    assert await v.verify_access_token(sign(RSA_KEY), NOW)
    idp.doc = jwks(RSA_KEY)
    clock.advance(31)
    assert await src.refresh() is False  # unchanged
    idp.doc = jwks(RSA_KEY2)  # rotated: the old key is gone
    clock.advance(31)
    assert await src.refresh() is True
    assert await v.verify_access_token(sign(RSA_KEY2), NOW)
    await invalid(v, sign(RSA_KEY), match="kid")
    await src.aclose()


async def test_jwks_start_fails_closed(idp: Idp, http: aiohttp.ClientSession) -> None:
    idp.status = 500
    src = jwks_source(idp, http, FakeClock())
    with pytest.raises(KeysUnavailable, match="HTTP 500"):
        await src.start()
    assert not src.ready
    with pytest.raises(KeysUnavailable):
        await TokenVerifier(settings(), src).verify_access_token(sign(RSA_KEY), NOW)


async def test_jwks_timeout_does_not_block_the_loop(idp: Idp, http: aiohttp.ClientSession) -> None:
    """The IdP never answers; the fetch's own timeout (``timeout_s``, a real timer: the
    subject) ends it. While it waits, the loop runs other work: this test, and the IdP's
    handler on the same loop, which a blocking fetch would starve."""
    idp.hold = True
    src = jwks_source(idp, http, FakeClock(), timeout_s=0.3)
    starting = asyncio.create_task(src.start())
    await asyncio.wait_for(idp.requested.wait(), 10)
    assert not starting.done()  # the fetch is in flight and the loop is free
    with pytest.raises(KeysUnavailable, match="Timeout"):
        await asyncio.wait_for(starting, 10)
    assert idp.answered == 0  # it was the timeout, not an answer


async def test_jwks_periodic_refresh(idp: Idp, http: aiohttp.ClientSession) -> None:
    src = jwks_source(idp, http, FakeClock(), refresh_every_s=0.05)
    before = asyncio.all_tasks()
    await src.start()
    (periodic,) = [t for t in asyncio.all_tasks() - before if "_every" in t.get_coro().__qualname__]  # type: ignore[union-attr]
    idp.doc = jwks(RSA_KEY2)
    # The period is the source's own timer (the subject): wait for it to fetch the new key.
    await async_wait_until(lambda: src.get("rsa-2", "RS256") is not None, "a periodic refresh")
    await src.aclose()
    assert periodic.done()  # aclose() stopped the background refresh: no fetch after it


async def test_jwks_document_too_large(idp: Idp, http: aiohttp.ClientSession) -> None:
    idp.doc = {"keys": [RSA_KEY.jwk()], "pad": "x" * (600 * 1024)}
    with pytest.raises(KeysUnavailable, match="too large"):
        await jwks_source(idp, http, FakeClock()).start()


async def test_discovery(idp: Idp, http: aiohttp.ClientSession) -> None:
    assert await discover_jwks_url(idp.base, http, 1.0) == idp.base + "/jwks"
    # lazily in start(), via key_source_from_settings
    src = key_source_from_settings(settings(issuer=idp.base), http)
    assert isinstance(src, JwksKeySource) and idp.discovery_hits == 1
    await src.start()
    assert src.ready and idp.discovery_hits == 2 and src.url == idp.base + "/jwks"
    await src.aclose()


async def test_discovery_issuer_must_match(idp: Idp, http: aiohttp.ClientSession) -> None:
    for doc in (
        {"issuer": idp.base + "/", "jwks_uri": idp.base + "/jwks"},
        {"issuer": idp.base + "x", "jwks_uri": idp.base + "/jwks"},
        {"jwks_uri": idp.base + "/jwks"},
    ):
        idp.discovery = doc
        with pytest.raises(KeysUnavailable, match="issuer"):
            await discover_jwks_url(idp.base, http, 1.0)
    idp.discovery = {"issuer": idp.base, "jwks_uri": "file:///etc/passwd"}
    with pytest.raises(KeysUnavailable, match="jwks_uri"):
        await discover_jwks_url(idp.base, http, 1.0)


async def test_key_source_from_settings(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    f = tmp_path / "k.json"
    assert isinstance(
        key_source_from_settings(settings(jwks_file=f, jwks_url="https://x/j"), http), FileKeySource
    )
    src = key_source_from_settings(settings(jwks_url="https://x/j"), http)
    assert isinstance(src, JwksKeySource) and src.url == "https://x/j"


# -- token acceptance: typ lists, client allowlist, profiles ---------------------------------


@pytest.mark.parametrize(
    ("accepted", "typ", "ok"),
    [
        (["at+jwt", "JWT"], "JWT", True),
        (["at+jwt", "JWT"], "application/at+jwt", True),
        (["at+jwt", "JWT"], None, False),
        (["at+jwt", None], None, True),
        (["at+jwt", None], "JWT", False),
        ("JWT", "jwt", True),
    ],
)
async def test_typ_list(accepted: Any, typ: str | None, ok: bool) -> None:
    v = verifier(token_typ=accepted)
    tok = sign(RSA_KEY, typ=DROP if typ is None else typ)
    if ok:
        assert await v.verify_access_token(tok, NOW)
    else:
        await invalid(v, tok, match="typ")


@pytest.mark.parametrize(
    ("profile", "typ", "ok"),
    [
        ("generic", "anything", True),  # not checked, as before profiles
        ("keycloak", "JWT", True),
        ("keycloak", "at+jwt", True),
        ("entra", "JWT", True),
        ("entra", "at+jwt", False),
        ("ping", None, True),
        ("ping", "JWT", False),
        ("okta", None, True),  # Okta's header: kid and alg only
        ("okta", "JWT", True),
    ],
)
async def test_typ_profile_defaults(profile: str, typ: str | None, ok: bool) -> None:
    over: Any = profile
    if profile == "entra":
        over = {"name": "entra", "auth_contexts": [{"id": "c1", "acr": "mfa"}]}
    v = verifier(profile=over)
    extra = {"oid": "alice", "acrs": []} if profile == "entra" else {}
    if profile == "okta":
        extra = {"uid": "00u1"}
    tok = sign(RSA_KEY, claims(**extra), typ=DROP if typ is None else typ)
    if ok:
        assert await v.verify_access_token(tok, NOW)
    else:
        await invalid(v, tok, match="typ")


async def test_typ_null_turns_the_profile_default_off() -> None:
    contexts = [{"id": "c1", "acr": "mfa"}]
    v = verifier(profile={"name": "entra", "auth_contexts": contexts}, token_typ=None)
    tok = sign(RSA_KEY, claims(oid="a"), typ="at+jwt")
    assert await v.verify_access_token(tok, NOW)


async def test_allowed_clients() -> None:
    v = verifier(allowed_clients=["stepup-authz", "desk-app"])
    assert (await v.verify_access_token(sign(RSA_KEY), NOW)).client_id == CLIENT
    await invalid(v, sign(RSA_KEY, claims(azp="other")), match="allowed_clients")
    await invalid(v, sign(RSA_KEY, claims(azp=DROP)), match="allowed_clients")
    # client_id (RFC 9068) comes before azp in the generic profile
    tok = sign(RSA_KEY, claims(client_id="desk-app", azp="other"))
    assert (await v.verify_access_token(tok, NOW)).client_id == "desk-app"
    await invalid(v, sign(RSA_KEY, claims(client_id=7)), match="client_id")


async def test_okta_profile_user_is_uid_and_client_is_cid() -> None:
    v = verifier(profile="okta", allowed_clients=["0oa-app"])
    tok = sign(RSA_KEY, claims(sub="alice@example.com", uid="00u1", cid="0oa-app", azp=DROP))
    ident = await v.verify_access_token(tok, NOW)
    assert (ident.subject, ident.client_id) == ("00u1", "0oa-app")
    await invalid(v, sign(RSA_KEY, claims(cid="0oa-app")), match="uid")  # no uid: refused
    await invalid(v, sign(RSA_KEY, claims(uid="a\nb", cid="0oa-app")), match="control")


async def test_entra_profile_reads_acrs_through_auth_contexts() -> None:
    contexts = [{"id": "c1", "acr": "mfa"}, {"id": "c2", "acr": "phr"}]
    v = verifier(profile={"name": "entra", "auth_contexts": contexts}, token_typ=None)
    for acrs, want in ((["c1"], "mfa"), (["c2", "c1"], "phr"), (["c9"], None), ([], None)):
        tok = sign(RSA_KEY, claims(oid="o-1", acr=DROP, acrs=acrs))
        assert (await v.verify_access_token(tok, NOW)).evidence.acr == want
    await invalid(v, sign(RSA_KEY, claims(oid="o-1", acrs="c1")), match="acrs")


RSA_KEY3 = rsa_key("rsa-3")


async def test_two_rotations_inside_the_interval(idp: Idp, http: aiohttp.ClientSession) -> None:
    """Rotation 1 is found by the refetch its first token triggers; rotation 2, 5 s later,
    is held back by the rate limit: keys-unavailable with the seconds left (never
    invalid_token), tokens of the earlier keys keep verifying, and once the interval has
    passed the third key verifies."""
    clock = FakeClock()
    src = jwks_source(idp, http, clock)
    await src.start()
    v = TokenVerifier(settings(token_cache_size=0), src)
    clock.advance(31)
    idp.doc = jwks(RSA_KEY2, RSA_KEY)  # rotation 1
    assert (await v.verify_access_token(sign(RSA_KEY2), NOW)).subject == "alice"
    clock.advance(5)
    idp.doc = jwks(RSA_KEY3, RSA_KEY2)  # rotation 2, inside the interval
    held = await invalid(v, sign(RSA_KEY3), reason="keys-unavailable")
    assert isinstance(held, KeysUnavailable) and held.retry_after_s == 25
    assert await v.verify_access_token(sign(RSA_KEY2), NOW)  # still in the set we hold
    assert await v.verify_access_token(sign(RSA_KEY), NOW)
    clock.advance(25)
    assert (await v.verify_access_token(sign(RSA_KEY3), NOW)).subject == "alice"
    assert idp.hits == 3
    # the reload withdrew rsa-1: within the next interval that is a verdict, not a wait
    await invalid(v, sign(RSA_KEY), match="kid")
    await src.aclose()


@pytest.mark.parametrize(
    "kid",
    ["../../etc/passwd", "/abs", "a b", "' OR '1'='1", "x\r\ny", "nul\x00", "https://e/j", ""],
)
async def test_a_kid_that_is_no_key_id_is_refused_before_any_refetch(kid: str) -> None:
    """Paths, URLs, quotes, spaces, control characters: malformed, refused without asking
    the key source to refetch (an attacker's stream of odd kids cannot drive refetches or
    count as fail-closed errors)."""
    src = CountingSource(StaticKeySource(jwks(RSA_KEY)))
    v = TokenVerifier(settings(), src)
    await invalid(v, sign(RSA_KEY, kid=kid), match="kid")
    assert src.refreshes == 0


async def test_ordinary_key_ids_are_accepted() -> None:
    for kid in ("rsa-1", "2c0e6f9a_b1.KEY:v2", "AbC-_~+=", "f" * 64):
        key = Key(kid, _RSA, "RS256")
        v = TokenVerifier(settings(), StaticKeySource(jwks(key)))
        assert (await v.verify_access_token(sign(key), NOW)).subject == "alice"
