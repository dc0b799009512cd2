"""Token attacks (RFC 8725 and friends), each against the verifier directly and then as a
bearer token through the real Envoy to a sensitive route.

Tokens that must be "valid but for one property" are signed with the IdP's own private key
(the suite's stack runs the dev IdP with a key generated in conftest), so a refusal proves
the verifier checked that property and not merely the signature. Attacker keys are
generated here.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from authz.check.tokens import StaticKeySource, TokenVerifier
from authz.config.settings import OidcSettings
from authz.demo.stack import AUDIENCE, CLIENT_ID, Stack
from authz.devidp.config import SigningKey
from authz.errors import TokenError
from tests.builders import DROP, b64, password_grant, public_jwk, public_pem

from .helpers import Minter, forge, raw_request

EVIL_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EVIL_EC = ec.generate_private_key(ec.SECP256R1())
LOCAL_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
LOCAL_ISS = "https://idp.example.com/realms/firm"
INVALID, EXPIRED = "token-invalid", "token-expired"
# A well-formed kid the key set does not hold: token-invalid once a refetch shows it is not
# there, keys-unavailable (403, retry later) while a refetch is held back by its rate limit
# -- a rotation the service has not seen yet looks the same. Both deny; neither fetches
# the attacker's URL.
UNKNOWN_KID = "unknown-kid"


def _self_signed(private: Any) -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(private, hashes.SHA256())
    )
    return base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()


def _hmac_token(m: Minter, secret: bytes, alg: str = "HS256") -> str:
    header = b64(json.dumps({"alg": alg, "typ": "at+jwt", "kid": m.kid}).encode())
    payload = b64(json.dumps(m.claims()).encode())
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    sig = hmac.new(secret, f"{header}.{payload}".encode(), digest).digest()
    return f"{header}.{payload}.{b64(sig)}"


def _tamper(token: str, **claims: Any) -> str:
    h, p, s = token.split(".")
    doc = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    doc.update(claims)
    return f"{h}.{b64(json.dumps(doc).encode())}.{s}"


def _payload_raw(m: Minter, raw: bytes) -> str:
    return m.sign(raw_payload=raw)


@dataclass(frozen=True)
class Ctx:
    m: Minter
    jku: str  # a URL that counts fetches: it must never be fetched


@dataclass(frozen=True)
class TokenCase:
    id: str
    build: Callable[[Ctx], str]
    reason: str  # the x-stepup-reason / TokenError.reason expected; "" = accepted


_HUGE_ALG = b'{"alg": 1' + b"0" * 5000 + b"}"
_DUP_ALG = b'{"alg":"RS256","alg":"none"}'


def _nested(depth: int) -> bytes:
    return b'{"iss":"x","deep":' + b"[" * depth + b"]" * depth + b"}"


CASES: list[TokenCase] = [
    # controls: the minting is right, so each refusal below is about its one property
    TokenCase("control-valid-accepted", lambda c: c.m.token(), ""),
    TokenCase(
        "control-typ-application-prefix-accepted",
        lambda c: c.m.sign(c.m.claims(), typ="application/at+jwt"),
        "",
    ),
    TokenCase(
        "control-typ-case-insensitive-accepted", lambda c: c.m.sign(c.m.claims(), typ="AT+JWT"), ""
    ),
    TokenCase("control-no-kid-single-key-accepted", lambda c: c.m.sign(c.m.claims(), kid=DROP), ""),
    # alg none and symmetric confusion
    *[
        TokenCase(
            f"alg-{a}-refused",
            lambda c, a=a: forge({"alg": a, "typ": "at+jwt", "kid": c.m.kid}, c.m.claims()),
            INVALID,
        )
        for a in ("none", "None", "NONE", "nOnE", "", "null")
    ],
    TokenCase(
        "alg-none-with-a-signature-refused",
        lambda c: forge({"alg": "none", "typ": "at+jwt"}, c.m.claims(), b"sig"),
        INVALID,
    ),
    TokenCase(
        "alg-missing-refused",
        lambda c: forge({"typ": "at+jwt", "kid": c.m.kid}, c.m.claims(), b"x"),
        INVALID,
    ),
    TokenCase(
        "alg-as-list-refused",
        lambda c: forge({"alg": ["RS256"], "kid": c.m.kid}, c.m.claims(), b"x"),
        INVALID,
    ),
    TokenCase(
        "hs256-keyed-with-public-pem-refused",
        lambda c: _hmac_token(c.m, public_pem(c.m.private_key)),
        INVALID,
    ),
    TokenCase(
        "hs384-keyed-with-public-pem-refused",
        lambda c: _hmac_token(c.m, public_pem(c.m.private_key), "HS384"),
        INVALID,
    ),
    TokenCase(
        "hs512-keyed-with-public-pem-refused",
        lambda c: _hmac_token(c.m, public_pem(c.m.private_key), "HS512"),
        INVALID,
    ),
    TokenCase(
        "hs256-keyed-with-public-jwk-json-refused",
        lambda c: _hmac_token(c.m, json.dumps(public_jwk(c.m.private_key)).encode()),
        INVALID,
    ),
    TokenCase(
        "hs256-keyed-with-modulus-refused",
        lambda c: _hmac_token(c.m, public_jwk(c.m.private_key)["n"].encode()),
        INVALID,
    ),
    TokenCase(
        "ps256-with-the-real-key-not-in-allowlist-refused",
        lambda c: c.m.sign(c.m.claims(), alg="PS256"),
        INVALID,
    ),
    TokenCase(
        "rs512-with-the-real-key-not-in-allowlist-refused",
        lambda c: c.m.sign(c.m.claims(), alg="RS512"),
        INVALID,
    ),
    TokenCase(
        "es256-attacker-key-refused",
        lambda c: c.m.sign(c.m.claims(), key=EVIL_EC, alg="ES256"),
        INVALID,
    ),
    # keys smuggled in the header
    TokenCase(
        "embedded-jwk-attacker-key-refused",
        lambda c: c.m.sign(c.m.claims(), key=EVIL_RSA, jwk=public_jwk(EVIL_RSA)),
        INVALID,
    ),
    TokenCase(
        "embedded-jwk-no-kid-refused",
        lambda c: c.m.sign(c.m.claims(), key=EVIL_RSA, kid=DROP, jwk=public_jwk(EVIL_RSA)),
        INVALID,
    ),
    TokenCase(
        "jku-attacker-jwks-refused",
        lambda c: c.m.sign(c.m.claims(), key=EVIL_RSA, kid="evil", jku=c.jku),
        UNKNOWN_KID,
    ),
    TokenCase(
        "jku-with-real-kid-refused",
        lambda c: c.m.sign(c.m.claims(), key=EVIL_RSA, jku=c.jku),
        INVALID,
    ),
    TokenCase(
        "x5u-attacker-cert-refused",
        lambda c: c.m.sign(c.m.claims(), key=EVIL_RSA, kid="evil", x5u=c.jku),
        UNKNOWN_KID,
    ),
    TokenCase(
        "x5c-attacker-cert-refused",
        lambda c: c.m.sign(c.m.claims(), key=EVIL_RSA, kid=DROP, x5c=[_self_signed(EVIL_RSA)]),
        INVALID,
    ),
    TokenCase(
        "same-kid-other-key-refused", lambda c: c.m.sign(c.m.claims(), key=EVIL_RSA), INVALID
    ),
    # kid injection
    *[
        TokenCase(
            f"kid-{name}-refused", lambda c, kid=kid: c.m.sign(c.m.claims(), kid=kid), INVALID
        )
        for name, kid in [
            ("path-traversal", "../../../../../../dev/null"),
            ("path-traversal-encoded", "..%2F..%2F..%2Fetc%2Fpasswd"),
            ("absolute-path", "/etc/passwd"),
            ("sql-tautology", "' OR '1'='1"),
            ("sql-union", "x' UNION SELECT 'secret' --"),
            ("nul-byte", "kid\u0000"),
            ("crlf", "kid\r\nx-injected: 1"),
            ("url", "https://evil.example/jwks.json"),
            ("number", 0),
            ("list", [0]),
            ("object", {"$ne": None}),
            ("empty", ""),
            ("huge-300", "k" * 300),
            ("huge-4000", "k" * 4000),
        ]
    ],
    TokenCase(
        "kid-huge-attacker-signed-refused",
        lambda c: c.m.sign(c.m.claims(), key=EVIL_RSA, kid="../" * 1500),
        INVALID,
    ),
    # issuer and audience tricks (signed with the real key)
    *[
        TokenCase(f"iss-{name}-refused", lambda c, f=f: c.m.token(iss=f(c.m.issuer)), INVALID)
        for name, f in [
            ("prefix", lambda i: i[:-1]),
            ("superstring", lambda i: i + "0"),
            ("trailing-slash", lambda i: i + "/"),
            ("dot-segment", lambda i: i + "/."),
            ("upper-case", lambda i: i.upper()),
            ("userinfo", lambda i: i + "@evil.example"),
            ("whitespace", lambda i: i + " "),
            ("list", lambda i: [i]),
            ("null", lambda i: None),
            ("other-idp", lambda i: "https://evil.example"),
        ]
    ],
    TokenCase("iss-missing-refused", lambda c: c.m.token(iss=DROP), INVALID),
    *[
        TokenCase(f"aud-{name}-refused", lambda c, a=a: c.m.token(aud=a), INVALID)
        for name, a in [
            ("superstring", AUDIENCE + "-evil"),
            ("prefix", AUDIENCE[:-1]),
            ("suffix-match", "x" + AUDIENCE),
            ("upper-case", AUDIENCE.upper()),
            ("other", "other-api"),
            ("list-other", ["other-api"]),
            ("empty-list", []),
            ("list-superstring", [AUDIENCE + "x", "x" + AUDIENCE]),
            ("number", 1),
            ("object", {AUDIENCE: True}),
            ("list-with-object", [{"aud": AUDIENCE}]),
            ("client-id", CLIENT_ID),
            ("null", None),
        ]
    ],
    TokenCase("aud-missing-refused", lambda c: c.m.token(aud=DROP), INVALID),
    # typ: access tokens only (RFC 9068); an ID token is not an access token
    *[
        TokenCase(f"typ-{name}-refused", lambda c, t=t: c.m.sign(c.m.claims(), typ=t), INVALID)
        for name, t in [
            ("JWT", "JWT"),
            ("missing", DROP),
            ("superstring", "at+jwt2"),
            ("parameter", "at+jwt; x=1"),
            ("id-token", "id_token+jwt"),
            ("number", 1),
        ]
    ],
    TokenCase(
        "id-token-shaped-refused",
        lambda c: c.m.sign(c.m.claims(aud=CLIENT_ID, azp=CLIENT_ID, nonce="n"), typ="JWT"),
        INVALID,
    ),
    # times
    TokenCase(
        "expired-an-hour-ago",
        lambda c: c.m.token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600),
        EXPIRED,
    ),
    TokenCase("nbf-in-an-hour-refused", lambda c: c.m.token(nbf=int(time.time()) + 3600), INVALID),
    TokenCase("iat-in-an-hour-refused", lambda c: c.m.token(iat=int(time.time()) + 3600), INVALID),
    *[
        TokenCase(
            f"{claim}-{name}-refused", lambda c, claim=claim, v=v: c.m.token(**{claim: v}), INVALID
        )
        for claim in ("exp", "iat")
        for name, v in [("string", "9999999999"), ("float", 9.9e9), ("bool", True), ("null", None)]
    ],
    TokenCase("exp-negative-huge-expired", lambda c: c.m.token(exp=-(10**30)), EXPIRED),
    # Harmless: exp bounds the lifetime, and revocation reads such a token as very old.
    TokenCase("iat-negative-huge-accepted", lambda c: c.m.token(iat=-(10**30)), ""),
    TokenCase("exp-missing-refused", lambda c: c.m.token(exp=DROP), INVALID),
    TokenCase("iat-missing-refused", lambda c: c.m.token(iat=DROP), INVALID),
    TokenCase("nbf-string-refused", lambda c: c.m.token(nbf="0"), INVALID),
    # claim types the step-up decision reads
    TokenCase("acr-list-refused", lambda c: c.m.token(acr=["mfa"]), INVALID),
    TokenCase("amr-string-refused", lambda c: c.m.token(amr="otp"), INVALID),
    TokenCase("amr-list-of-objects-refused", lambda c: c.m.token(amr=[{"otp": 1}]), INVALID),
    TokenCase("auth-time-string-refused", lambda c: c.m.token(auth_time="1"), INVALID),
    TokenCase("auth-time-float-refused", lambda c: c.m.token(auth_time=1.5), INVALID),
    TokenCase("sub-missing-refused", lambda c: c.m.token(sub=DROP), INVALID),
    TokenCase("sub-empty-refused", lambda c: c.m.token(sub=""), INVALID),
    TokenCase("sub-number-refused", lambda c: c.m.token(sub=7), INVALID),
    TokenCase("sid-empty-refused", lambda c: c.m.token(sid=""), INVALID),
    # The subject and acr become upstream headers (x-stepup-user, x-stepup-acr): a control
    # character would split or smuggle a header. Refused at verification, with a reason,
    # rather than left to the proxy's codec (Envoy answers a bare 503).
    TokenCase(
        "sub-with-crlf-header-injection-refused",
        lambda c: c.m.token(sub="alice\r\nx-stepup-level: high"),
        INVALID,
    ),
    TokenCase("sub-with-lf-refused", lambda c: c.m.token(sub="alice\nx-injected: 1"), INVALID),
    TokenCase("sub-with-nul-refused", lambda c: c.m.token(sub="alice\x00admin"), INVALID),
    TokenCase("acr-with-crlf-refused", lambda c: c.m.token(acr="mfa\r\nx-injected: 1"), INVALID),
    TokenCase("sub-unicode-accepted", lambda c: c.m.token(sub="\u00e5lice"), ""),
    # tampering and signatures
    TokenCase(
        "payload-tampered-acr-refused", lambda c: _tamper(c.m.token(acr="pwd"), acr="phr"), INVALID
    ),
    TokenCase("signature-stripped-refused", lambda c: c.m.token().rsplit(".", 1)[0] + ".", INVALID),
    TokenCase("signature-truncated-refused", lambda c: c.m.token()[:-10], INVALID),
    TokenCase(
        "signature-of-another-token-refused",
        lambda c: ".".join(
            [*c.m.token(acr="phr").split(".")[:2], c.m.token(acr="pwd").split(".")[2]]
        ),
        INVALID,
    ),
    TokenCase("crit-header-refused", lambda c: c.m.sign(c.m.claims(), crit=["exp"]), INVALID),
    TokenCase(
        "b64-false-unencoded-payload-refused", lambda c: c.m.sign(c.m.claims(), b64=False), INVALID
    ),
    # malformed and oversized
    *[
        TokenCase(f"malformed-{name}-refused", lambda c, t=t: t, INVALID)
        for name, t in [
            ("single-part", "abc"),
            ("two-parts", "abc.def"),
            ("empty-parts", ".."),
            ("jwe-five-parts", "a.b.c.d.e"),
            ("padding", "eyJhbGciOiJSUzI1NiJ9=.e30=.sig="),
            ("not-base64", "!!!.###.$$$"),
            ("header-not-json", f"{b64(b'nope')}.{b64(b'{}')}.x"),
            ("header-array", f"{b64(b'[]')}.{b64(b'{}')}.x"),
            ("header-string", f"{b64(json.dumps('RS256').encode())}.{b64(b'{}')}.x"),
            ("header-huge-number", f"{b64(_HUGE_ALG)}.{b64(b'{}')}.x"),
            ("header-duplicate-alg", f"{b64(_DUP_ALG)}.{b64(b'{}')}."),
            ("json-serialization", '{"payload":"e30","signatures":[]}'),
            ("whitespace-inside", "eyJh bGci.e30.x"),
        ]
    ],
    TokenCase("payload-array-refused", lambda c: _payload_raw(c.m, b"[]"), INVALID),
    TokenCase("payload-null-refused", lambda c: _payload_raw(c.m, b"null"), INVALID),
    TokenCase("payload-not-utf8-refused", lambda c: _payload_raw(c.m, b"\xff\xfe{}"), INVALID),
    TokenCase(
        "payload-duplicate-sub-refused",
        lambda c: _payload_raw(c.m, json.dumps(c.m.claims()).encode()[:-1] + b', "sub": "admin"}'),
        INVALID,
    ),
    TokenCase(
        "payload-nan-exp-refused",
        lambda c: _payload_raw(
            c.m, json.dumps(c.m.claims(exp=DROP)).encode()[:-1] + b', "exp": NaN}'
        ),
        INVALID,
    ),
    TokenCase(
        "payload-infinity-exp-refused",
        lambda c: _payload_raw(
            c.m, json.dumps(c.m.claims(exp=DROP)).encode()[:-1] + b', "exp": Infinity}'
        ),
        INVALID,
    ),
    TokenCase(
        "payload-5000-digit-exp-refused",
        lambda c: _payload_raw(
            c.m, json.dumps(c.m.claims(exp=DROP)).encode()[:-1] + b', "exp": 1' + b"0" * 5000 + b"}"
        ),
        INVALID,
    ),
    TokenCase("payload-deeply-nested-refused", lambda c: _payload_raw(c.m, _nested(2000)), INVALID),
    TokenCase("oversized-8kib-plus-one-refused", lambda c: c.m.token(pad="x" * 6200), INVALID),
]
IDS = [c.id for c in CASES]
assert len(set(IDS)) == len(IDS)


# -- against the verifier directly -------------------------------------------------------------


@pytest.fixture(scope="module")
def local() -> Ctx:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        pem = Path(d) / "k.pem"
        pem.write_bytes(
            LOCAL_RSA.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        kid = SigningKey.load_or_generate(pem).kid
    return Ctx(Minter(LOCAL_RSA, kid, LOCAL_ISS), "http://127.0.0.1:9/never-fetched")


def verifier(ctx: Ctx, **over: Any) -> TokenVerifier:
    """Configured as the suite's stack configures the service."""
    base: dict[str, Any] = {
        "issuer": ctx.m.issuer,
        "client_id": CLIENT_ID,
        "audience": AUDIENCE,
        "algorithms": ("RS256",),
        "token_typ": "at+jwt",
        "leeway_s": 30,
    }
    base.update(over)
    jwk = public_jwk(ctx.m.private_key, kid=ctx.m.kid, use="sig", alg="RS256")
    return TokenVerifier(OidcSettings(**base), StaticKeySource({"keys": [jwk]}))


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_verifier(local: Ctx, case: TokenCase, outcome: Callable[[str, str], None]) -> None:
    token = case.build(local)
    try:
        identity = await verifier(local).verify_access_token(token, int(time.time()))
        observed = f"accepted ({identity.subject!r}, acr {identity.evidence.acr!r})"
    except TokenError as exc:
        observed = f"refused: {exc.reason} ({exc})"
    outcome(f"refused: {case.reason}" if case.reason else "accepted", observed)
    if case.reason == UNKNOWN_KID:
        assert observed.startswith(("refused: token-invalid ", "refused: keys-unavailable "))
    elif case.reason:
        assert observed.startswith(f"refused: {case.reason} ")
    else:
        assert observed.startswith("accepted")


# -- exp / nbf / iat boundaries (injected clock, leeway 30 s) -----------------------------------

N = 1_800_000_000


@pytest.mark.parametrize(
    ("claims", "leeway", "reason"),
    [
        pytest.param({"exp": N - 30}, 30, EXPIRED, id="exp-at-now-minus-leeway-expired"),
        pytest.param({"exp": N - 29}, 30, "", id="exp-one-second-inside-leeway-accepted"),
        pytest.param({"nbf": N + 30}, 30, "", id="nbf-at-now-plus-leeway-accepted"),
        pytest.param({"nbf": N + 31}, 30, INVALID, id="nbf-one-second-beyond-leeway-refused"),
        pytest.param({"iat": N + 30}, 30, "", id="iat-at-now-plus-leeway-accepted"),
        pytest.param({"iat": N + 31}, 30, INVALID, id="iat-one-second-beyond-leeway-refused"),
        pytest.param({"exp": N}, 0, EXPIRED, id="exp-equal-now-no-leeway-expired"),
        pytest.param({"exp": N + 1}, 0, "", id="exp-one-second-ahead-no-leeway-accepted"),
        pytest.param({"nbf": N + 1}, 0, INVALID, id="nbf-one-second-ahead-no-leeway-refused"),
        pytest.param({"nbf": N}, 0, "", id="nbf-equal-now-no-leeway-accepted"),
    ],
)
async def test_time_boundaries(
    local: Ctx,
    claims: dict[str, int],
    leeway: int,
    reason: str,
    outcome: Callable[[str, str], None],
) -> None:
    """At ``now = N``: RFC 7519 4.1.4 (expired *on or after* exp) and 4.1.5, with leeway."""
    token = local.m.sign(local.m.claims(now=N, **claims))
    try:
        await verifier(local, leeway_s=leeway).verify_access_token(token, N)
        observed = "accepted"
    except TokenError as exc:
        observed = f"refused: {exc.reason}"
    outcome(f"refused: {reason}" if reason else "accepted", observed)
    assert observed == (f"refused: {reason}" if reason else "accepted")


async def test_cache_does_not_outlive_exp(local: Ctx, outcome: Callable[[str, str], None]) -> None:
    """A verified token is cached; a later Check after its exp must not hit the cache."""
    v = verifier(local, leeway_s=0)
    token = local.m.sign(local.m.claims(now=N, exp=N + 60))
    await v.verify_access_token(token, N)
    await v.verify_access_token(token, N + 59)
    assert v.cache_stats.hits == 1
    with pytest.raises(TokenError) as info:
        await v.verify_access_token(token, N + 60)
    outcome("refused: token-expired after exp, cache or not", f"refused: {info.value.reason}")
    assert info.value.reason == EXPIRED


# -- through Envoy -------------------------------------------------------------------------------


@dataclass
class Counter:
    url: str
    hits: int = 0


@pytest.fixture(scope="module")
def jku_server() -> Any:
    """A JWKS/x5u server the attacker controls: nobody may ever fetch from it."""
    counter = Counter("")

    async def handler(request: web.Request) -> web.Response:
        counter.hits += 1
        return web.json_response({"keys": [public_jwk(EVIL_RSA, kid="evil", alg="RS256")]})

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    counter.url = f"http://127.0.0.1:{port}/jwks.json"
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield counter
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.run_until_complete(runner.cleanup())
    loop.close()


@pytest.mark.e2e
@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_through_envoy(
    sec_stack: Stack,
    minter: Minter,
    jku_server: Counter,
    case: TokenCase,
    outcome: Callable[[str, str], None],
) -> None:
    token = case.build(Ctx(minter, jku_server.url))
    r = await raw_request(
        sec_stack.listen_port, "GET", "/accounts/1", [("Authorization", f"Bearer {token}")]
    )
    expected = "200 (upstream reached)" if not case.reason else f"401 {case.reason}"
    outcome(
        expected + "; the attacker's key URL is never fetched",
        f"{r}; attacker URL fetched {jku_server.hits}x",
    )
    assert jku_server.hits == 0
    if case.reason == UNKNOWN_KID:
        assert (r.status, r.reason) in ((401, INVALID), (403, "keys-unavailable")), str(r)
    elif case.reason:
        assert (r.status, r.reason) == (401, case.reason), str(r)
    else:
        assert r.status == 200 and r.echo() is not None, str(r)


@pytest.mark.e2e
async def test_real_id_token_as_access_token(
    sec_stack: Stack, outcome: Callable[[str, str], None]
) -> None:
    """The IdP's own ID token (typ JWT, aud = our client id) is not a bearer token."""
    tokens = await password_grant(sec_stack.idp_url)
    r = await raw_request(
        sec_stack.listen_port, "GET", "/x", [("Authorization", f"Bearer {tokens['id_token']}")]
    )
    control = await raw_request(
        sec_stack.listen_port, "GET", "/x", [("Authorization", f"Bearer {tokens['access_token']}")]
    )
    outcome("401 token-invalid (its access token: 200)", f"{r}; access token {control}")
    assert (r.status, r.reason) == (401, INVALID)
    assert control.status == 200


@pytest.mark.e2e
async def test_megabyte_token_refused_by_envoy(
    sec_stack: Stack, outcome: Callable[[str, str], None]
) -> None:
    r = await raw_request(
        sec_stack.listen_port,
        "GET",
        "/accounts/1",
        [("Authorization", "Bearer " + "A" * (1 << 20))],
    )
    outcome("431 from Envoy (or connection closed); never 200", str(r))
    assert r.status in (0, 400, 431)


# -- duplicate credentials ------------------------------------------------------------------------


def _cases(m: Minter) -> dict[str, tuple[list[tuple[str, str]], set[str]]]:
    strong, weak = m.token(), m.token(acr="pwd", amr=["pwd"])
    other_user = m.token(sub="bob")
    a = "Authorization"
    return {
        "two-authorization-headers-same-token": (
            [(a, f"Bearer {strong}"), (a, f"Bearer {strong}")],
            {"401 token-invalid"},
        ),
        "two-authorization-headers-strong-then-junk": (
            [(a, f"Bearer {strong}"), (a, "Bearer junk")],
            {"401 token-invalid"},
        ),
        "two-authorization-headers-weak-then-strong": (
            [(a, f"Bearer {weak}"), (a, f"Bearer {strong}")],
            {"401 token-invalid"},
        ),
        "two-authorization-headers-two-users": (
            [(a, f"Bearer {strong}"), (a, f"Bearer {other_user}")],
            {"401 token-invalid"},
        ),
        "comma-joined-tokens-in-one-header": (
            [(a, f"Bearer {strong}, Bearer {other_user}")],
            {"401 token-invalid"},
        ),
        "basic-scheme-does-not-fall-back-to-cookie": (
            [(a, "Basic YWxpY2U6YWxpY2UtcGFzc3dvcmQ="), ("Cookie", f"stepup-token={strong}")],
            {"401 token-invalid"},
        ),
        "weak-header-wins-over-strong-cookie": (
            [(a, f"Bearer {weak}"), ("Cookie", f"stepup-token={strong}")],
            {"401 acr-insufficient"},
        ),
        "empty-authorization-header": ([(a, "")], {"401 token-invalid", "401 no-credentials"}),
        "bearer-without-token": ([(a, "Bearer")], {"401 token-invalid"}),
        "bearer-double-space": ([(a, f"Bearer  {strong}")], {"401 token-invalid", "200"}),
        "two-cookies-same-name-strong-and-junk": (
            [("Cookie", f"stepup-token={strong}; stepup-token=junk")],
            {"401 token-invalid"},
        ),
        "two-cookies-same-name-junk-and-strong": (
            [("Cookie", f"stepup-token=junk; stepup-token={strong}")],
            {"401 token-invalid"},
        ),
        "two-cookies-same-name-empty-and-strong": (
            [("Cookie", f"stepup-token=; stepup-token={strong}")],
            {"401 token-invalid"},
        ),
        "two-cookies-two-users": (
            [("Cookie", f"stepup-token={strong}; stepup-token={other_user}")],
            {"401 token-invalid"},
        ),
        "two-cookie-headers-strong-first": (
            [("Cookie", f"stepup-token={strong}"), ("Cookie", "stepup-token=junk")],
            {"401 token-invalid", "401 no-credentials"},
        ),
        "two-cookie-headers-strong-second": (
            [("Cookie", "theme=dark"), ("Cookie", f"stepup-token={strong}")],
            {"401 token-invalid", "401 no-credentials"},
        ),
        "cookie-name-case-differs": (
            [("Cookie", f"STEPUP_TOKEN={strong}")],
            {"401 no-credentials"},
        ),
        "cookie-name-with-space": (
            [("Cookie", f"stepup-token ={strong}")],
            {"401 no-credentials", "401 token-invalid"},
        ),
        "cookie-name-prefixed": ([("Cookie", f"xstepup-token={strong}")], {"401 no-credentials"}),
        "control-strong-cookie": ([("Cookie", f"stepup-token={strong}")], {"200"}),
        "control-quoted-cookie": ([("Cookie", f'stepup-token="{strong}"')], {"200"}),
        "control-lowercase-bearer": ([(a, f"bearer {strong}")], {"200"}),
    }


DUP_IDS = list(_cases(Minter(LOCAL_RSA, "k", LOCAL_ISS)))


@pytest.mark.e2e
@pytest.mark.parametrize("name", DUP_IDS)
async def test_duplicate_credentials(
    sec_stack: Stack, minter: Minter, name: str, outcome: Callable[[str, str], None]
) -> None:
    headers, expect = _cases(minter)[name]
    r = await raw_request(sec_stack.listen_port, "GET", "/accounts/1", list(headers))
    outcome(" or ".join(sorted(expect)), str(r))
    assert str(r) in expect or str(r.status) in expect, str(r)
    if "200" not in expect:
        assert r.status != 200
