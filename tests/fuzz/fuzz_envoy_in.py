"""atheris harness: bytes -> CheckRequest -> attributes_from_check -> the pure decision.

Two ways in, chosen by the first byte: the bytes as a serialised CheckRequest
(``ParseFromString``, as Envoy's gRPC call delivers it), or a CheckRequest built field by
field from the bytes (reaches deeper: method, path, host, headers, peer, extensions).

Expected: ``DecodeError`` from protobuf, ``RequestError`` from the adapter. Anything else
raised is a finding, and so is a broken invariant on accepted attributes (a path that is
not canonical, a host with a port or userinfo, a level lowered by context extensions).

    python tests/fuzz/fuzz_envoy_in.py CORPUS_DIR -max_total_time=60
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris
from envoy.service.auth.v3 import external_auth_pb2  # generated code: not under test
from google.protobuf.message import DecodeError

with atheris.instrument_imports(enable_loader_override=False):
    from authz.check.request import attributes_from_check
    from authz.core.attributes import canonicalize_path, normalize_host
    from authz.core.decision import Outcome, evaluate, resolve_level, route_level
    from authz.core.policy import load_policy
    from authz.errors import RequestError

POLICY = load_policy(
    {
        "levels": {
            "public": {"public": True},
            "standard": {},
            "elevated": {"acr": ["mfa"], "max_age": 900},
            "high": {"acr": ["phr"], "max_age": 300, "ip_allow": ["10.0.0.0/8"]},
        },
        "routes": [
            {"path": "/", "level": "public"},
            {"path_prefix": "/accounts/", "methods": ["GET"], "level": "elevated"},
            {"path_prefix": "/accounts/", "level": "high"},
            {"path_regex": "^/clients/[0-9]+/statements$", "level": "elevated"},
            {"host": "*.example.com", "path_prefix": "/wires/", "level": "high"},
        ],
        "default_level": "standard",
        "rules": [
            {"when": {"ip_in": ["198.51.100.0/24"]}, "deny": "ip-blocked"},
            {
                "when": {"ip_not_in": ["10.0.0.0/8"], "level_at_least": "elevated"},
                "raise_to": "high",
            },
        ],
    }
)

_KEYS = [
    "x-forwarded-for",
    "cookie",
    "authorization",
    "accept",
    "x-stepup-user",
    "content-type",
    ":path",
    ":authority",
    ":method",
    "x-request-id",
    "host",
    "x-stepup-peer-address",
]


def _structured(fdp: atheris.FuzzedDataProvider) -> external_auth_pb2.CheckRequest:
    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method = fdp.ConsumeUnicodeNoSurrogates(8)
    http.path = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 200))
    http.host = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
    http.scheme = fdp.ConsumeUnicodeNoSurrogates(6)
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        key = (
            _KEYS[fdp.ConsumeIntInRange(0, len(_KEYS) - 1)]
            if fdp.ConsumeBool()
            else fdp.ConsumeUnicodeNoSurrogates(12)
        )
        http.headers[key] = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 80))
    req.attributes.source.address.socket_address.address = fdp.ConsumeUnicodeNoSurrogates(40)
    if fdp.ConsumeBool():
        req.attributes.context_extensions["stepup_level"] = fdp.ConsumeUnicodeNoSurrogates(10)
    return req


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    peer_header = "x-stepup-peer-address" if fdp.ConsumeBool() else None
    if fdp.ConsumeBool():
        req = external_auth_pb2.CheckRequest()
        try:
            req.ParseFromString(fdp.ConsumeBytes(fdp.remaining_bytes()))
        except DecodeError:
            return
    else:
        req = _structured(fdp)
    try:
        attrs = attributes_from_check(req, peer_header)
    except RequestError:
        return
    # Invariants of accepted attributes.
    assert attrs.path.startswith("/") and "//" not in attrs.path, attrs.path
    assert not {".", ".."} & set(attrs.path.split("/")), attrs.path
    assert ";" not in attrs.path and "\\" not in attrs.path, attrs.path
    assert canonicalize_path(attrs.path)[0] == attrs.path, attrs.path
    assert attrs.host and normalize_host(attrs.host) == attrs.host, attrs.host
    assert attrs.method.isalpha() and attrs.method.isupper(), attrs.method
    # The pure decision never raises, and context extensions never lower the level.
    base = route_level(POLICY, attrs)
    plain = POLICY.route_for(attrs.host, attrs.method, attrs.path)
    plain_level = plain.level if plain is not None else POLICY.default_level
    if base.deny is None:
        assert base.level is not None and base.level.rank >= plain_level.rank
    resolution = resolve_level(POLICY, attrs, None, base)
    decision = evaluate(resolution, None, (), 1_800_000_000)
    if decision.outcome is Outcome.ALLOW:
        assert decision.level is not None and decision.level.public


def seed(corpus: Path) -> None:
    """A few real-looking CheckRequests, so mutation starts from valid messages."""
    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    samples = [
        ("GET", "/accounts/1", "app.example.com", {"authorization": "Bearer a.b.c"}),
        ("POST", "/wires/9?x=1", "pay.example.com", {"cookie": "stepup_token=x"}),
        ("GET", "/public/../accounts/%2e%2e/x", "h", {"x-forwarded-for": "1.2.3.4"}),
    ]
    for i, (method, path, host, headers) in enumerate(samples):
        req = external_auth_pb2.CheckRequest()
        http = req.attributes.request.http
        http.method, http.path, http.host = method, path, host
        http.headers.update(headers)
        req.attributes.source.address.socket_address.address = "10.1.2.3"
        req.attributes.context_extensions["stepup_level"] = "high"
        # atheris takes the integer (hops) from the end and the bool (1: ParseFromString)
        # from the front; the message is what remains.
        (corpus / f"seed-{i}").write_bytes(b"\x01" + req.SerializeToString() + b"\x00")


def main() -> None:
    corpus = next((Path(a) for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus is not None and not corpus.is_file():  # a file: reproduce one input
        seed(corpus)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
