"""atheris harness: bytes -> token -> TokenVerifier.verify_access_token / verify_id_token.

Three ways in, chosen by the input: the bytes as the token text; a header and a payload
from the bytes, base64url-encoded with arbitrary signature bytes; or a header and claims
built from the bytes and **signed with the verifier's own key** (so the fuzzer gets past
the signature into the header, claim and type checks, where the interesting code is).

Expected: ``TokenError`` (``KeysUnavailable`` included). Anything else raised is a finding,
and so is an accepted token that breaks the rules (wrong iss/aud, expired, wrong typ).

    python tests/fuzz/fuzz_tokens.py CORPUS_DIR -max_total_time=60
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import atheris
from cryptography.hazmat.primitives.asymmetric import ec

from authz.config.settings import OidcSettings

# Imported first, so not instrumented: pydantic and aiohttp are not under test, and
# instrumenting them costs most of the time budget at start-up.
from authz.errors import TokenError

with atheris.instrument_imports(enable_loader_override=False):
    import jwt  # pyjwt parses the JWS for us: its branches guide the fuzzer too

    from authz.check.tokens import StaticKeySource, TokenVerifier

ISS, AUD, CLIENT = "https://idp.example.com", "mesh", "stepup-authz"
LEEWAY = 30
KEY = ec.generate_private_key(ec.SECP256R1())
JWK = {
    **json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key())),
    "kid": "k1",
    "use": "sig",
    "alg": "ES256",
}
VERIFIER = TokenVerifier(
    OidcSettings(
        issuer=ISS,
        client_id=CLIENT,
        audience=AUD,
        algorithms=("ES256", "RS256"),
        token_typ="at+jwt",
        leeway_s=LEEWAY,
        token_cache_size=64,
    ),
    StaticKeySource({"keys": [JWK]}),
)
ES256 = jwt.get_algorithm_by_name("ES256")
_CLAIMS = [
    "iss",
    "aud",
    "sub",
    "sid",
    "exp",
    "nbf",
    "iat",
    "acr",
    "amr",
    "auth_time",
    "nonce",
    "azp",
    "client_id",
    "typ",
]
_HEADER = ["alg", "kid", "typ", "crit", "jku", "jwk", "x5u", "b64", "cty"]


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that must never suspend (a static key source never does I/O)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the verifier suspended with a static key source")


def value(fdp: atheris.FuzzedDataProvider, now: int, good: Any) -> Any:
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind <= 3:
        return good  # mostly valid, so the other claims get checked too
    if kind == 4:
        return fdp.ConsumeIntInRange(now - 100_000, now + 100_000)
    if kind == 5:
        return fdp.ConsumeUnicodeNoSurrogates(16)
    if kind == 6:
        return fdp.ConsumeFloat()
    if kind == 7:
        return [fdp.ConsumeUnicodeNoSurrogates(8) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 8:
        return fdp.ConsumeBool()
    return None


def signed(fdp: atheris.FuzzedDataProvider, now: int, id_token: bool) -> str:
    goods: dict[str, Any] = {
        "iss": ISS,
        "aud": CLIENT if id_token else AUD,
        "sub": "alice",
        "sid": "s1",
        "exp": now + 600,
        "nbf": now - 10,
        "iat": now - 10,
        "acr": "mfa",
        "amr": ["otp"],
        "auth_time": now - 20,
        "nonce": "n-1",
        "azp": CLIENT,
        "client_id": CLIENT,
        "typ": "x",
    }
    claims = {k: value(fdp, now, goods[k]) for k in _CLAIMS if fdp.ConsumeIntInRange(0, 7)}
    header_goods = {
        "alg": "ES256",
        "kid": "k1",
        "typ": "JWT" if id_token else "at+jwt",
        "crit": ["b64"],
        "jku": "https://evil/",
        "jwk": {},
        "x5u": "x",
        "b64": False,
        "cty": "JWT",
    }
    header = {
        k: value(fdp, now, header_goods[k])
        for k in _HEADER
        if fdp.ConsumeIntInRange(0, 3) == 0 or k in ("alg", "kid", "typ")
    }
    header_raw = json.dumps(header).encode()
    payload_raw = json.dumps(claims).encode()
    if fdp.ConsumeIntInRange(0, 15) == 0:  # occasionally splice raw bytes into the JSON
        payload_raw = payload_raw[:-1] + fdp.ConsumeBytes(16) + b"}"
    signing_input = f"{b64(header_raw)}.{b64(payload_raw)}"
    return f"{signing_input}.{b64(ES256.sign(signing_input.encode(), KEY))}"


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    id_token = fdp.ConsumeBool()
    now = 1_800_000_000 + fdp.ConsumeIntInRange(-1000, 1000)
    if mode == 0:
        token = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    elif mode == 1:
        header = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
        payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 400))
        token = f"{b64(header)}.{b64(payload)}.{b64(fdp.ConsumeBytes(80))}"
    else:
        token = signed(fdp, 1_800_000_000, id_token)
    try:
        if id_token:
            claims = drive(VERIFIER.verify_id_token(token, now, nonce="n-1"))
            assert claims["iss"] == ISS and claims.get("nonce") == "n-1", claims
            aud = claims["aud"]
            assert aud == CLIENT or (isinstance(aud, list) and CLIENT in aud), claims
        else:
            identity = drive(VERIFIER.verify_access_token(token, now))
            assert identity.issuer == ISS and identity.subject and identity.session_id
            # sub and acr become upstream header values: never a control character
            for text in (identity.subject, identity.evidence.acr or ""):
                assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text), identity
            assert now < identity.expires_at + LEEWAY, (identity, now)
            header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
            assert str(header.get("typ", "")).lower().removeprefix("application/") == "at+jwt"
    except TokenError:
        return


def seed(corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    for i in range(8):
        # varied leading bytes pick varied modes; the fuzzer takes it from there
        (corpus / f"seed-{i}").write_bytes(bytes([i * 37 % 256]) * 64 + bytes(range(256)))


def main() -> None:
    corpus = next((Path(a) for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus is not None and not corpus.is_file():  # a file: reproduce one input
        seed(corpus)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
