"""Transaction binding on the Check's side: the body Envoy sends, the decision for a
transaction-bound level (nothing but the request's own grant, taken once, and only when
everything else allows), the signed ``tx`` link in the step-up redirect and where the
browser goes back, and the per-route body buffering ``render`` asks Envoy for."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import MappingProxyType
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

from authz.check.authorizer import Authorizer
from authz.check.redirects import Redirects, resubmit_from
from authz.check.request import PARTIAL_BODY_HEADER, attributes_from_check
from authz.check.response import denial
from authz.config.policy_file import PolicyHolder
from authz.core.attributes import RequestAttributes
from authz.core.decision import CheckInputs, Decision, Outcome, decide, with_transaction
from authz.core.policy import Policy, load_policy
from authz.core.reasons import Reason
from authz.core.session import Evidence, Grant, UserState, session_key, user_key
from authz.core.transactions import TransactionRequest, of_request
from authz.errors import StoreError
from authz.ops.metrics import Metrics
from authz.render import render_envoy
from authz.stepup.link import ContextSigner
from authz.stepup.passkeys.links import LinkSigner
from authz.store.credentials import TransactionGrant
from authz.store.memory import MemorySessionStore
from tests.builders import NOW, FakeClock, FakeTokens, check_request, identity

POLICY = """\
levels:
  public: {public: true}
  standard: {}
  high: {acr: [phr], max_age: 300, factors: [passkey]}
  wire:
    acr: [phr]
    max_age: 300
    factors: [passkey]
    transaction_bound: {fields: [amount, payee.name], ttl_s: 120, max_body_bytes: 4096}
  strict:
    acr: [phr]
    max_age: 300
    factors: [passkey]
    transaction_bound: {require_body: true}
routes:
  - {path: /, level: public}
  - {path_prefix: /wires/, methods: [POST], level: wire}
  - {path_prefix: /strict/, methods: [POST], level: strict}
  - {path_prefix: /accounts/, level: high}
default_level: standard
rules:
  - {name: blocked, when: {ip_in: [198.51.100.0/24]}, deny: ip-blocked}
"""
BODY = b'{"amount": "25,000.00 USD", "payee": {"name": "ACME Clearing"}}'
PASSKEY = Evidence("phr", ("hwk", "user", "pin", "mfa"), NOW)
ALICE = identity(issuer="https://idp", acr="phr", amr=("hwk",), auth_time=NOW)


def _attrs(
    path: str = "/wires/",
    body: bytes | None = BODY,
    *,
    method: str = "POST",
    ip: str = "10.0.0.5",
    headers: dict[str, str] | None = None,
) -> RequestAttributes:
    h = {"accept": "text/html", "authorization": "Bearer t", **(headers or {})}
    return RequestAttributes(
        method,
        "https",
        "app.test",
        path,
        "",
        MappingProxyType(h),
        ipaddress.ip_address(ip),
        body=body,
    )


# -- what Envoy sends -------------------------------------------------------------------------


def _grpc_body(headers: dict[str, str], raw: bytes = b"", text: str = "") -> bytes | None:
    req = check_request("/wires/", headers, method="POST")
    req.attributes.request.http.raw_body = raw
    req.attributes.request.http.body = text
    return attributes_from_check(req).body


def test_the_body_counts_only_when_envoy_sent_the_whole_of_it() -> None:
    whole = {PARTIAL_BODY_HEADER: "false", "content-length": str(len(BODY))}
    assert _grpc_body(whole, raw=BODY) == BODY
    assert _grpc_body({PARTIAL_BODY_HEADER: "false"}, text="ab") == b"ab"  # no pack_as_bytes
    assert _grpc_body({PARTIAL_BODY_HEADER: "true"}, raw=BODY[:10]) is None  # cut
    assert _grpc_body({}, raw=BODY) is None  # Envoy did not say it buffered the body
    # A client's own "partial: false" on a route Envoy does not buffer: its content-length
    # does not match the (empty) body Envoy sent, so no body is known.
    assert _grpc_body({PARTIAL_BODY_HEADER: "false", "content-length": "64"}) is None
    assert _grpc_body({PARTIAL_BODY_HEADER: "false", "content-length": "x"}, raw=b"x") is None
    # ... nor without a content-length (a chunked body Envoy did not buffer).
    assert _grpc_body({PARTIAL_BODY_HEADER: "false"}) is None
    assert _grpc_body({PARTIAL_BODY_HEADER: "false", "content-length": "0"}) == b""


# -- the decision ---------------------------------------------------------------------------------


@pytest.fixture
def policy() -> Policy:
    return load_policy(yaml.safe_load(POLICY))


def _decide(policy: Policy, attrs: RequestAttributes, grants: tuple[Grant, ...] = ()) -> Decision:
    state = UserState(grants=grants)
    return decide(policy, attrs, CheckInputs(NOW, 0, ALICE, None, state))


def test_neither_the_token_nor_a_time_boxed_grant_satisfies_a_transaction_level(
    policy: Policy,
) -> None:
    # The token itself carries phr/hwk from now: enough for "high", not for a wire.
    assert _decide(policy, _attrs("/accounts/1", method="GET")).outcome is Outcome.ALLOW
    d = _decide(policy, _attrs())
    assert (d.outcome, d.reason) == (Outcome.STEP_UP, Reason.TRANSACTION_REQUIRED)
    window = Grant("wire", PASSKEY, NOW + 100, NOW)
    d = _decide(policy, _attrs(), (window,))
    assert (d.outcome, d.reason) == (Outcome.STEP_UP, Reason.TRANSACTION_REQUIRED)


def test_a_rule_deny_comes_first_so_the_grant_is_never_asked_for(policy: Policy) -> None:
    d = _decide(policy, _attrs(ip="198.51.100.7"))
    assert (d.outcome, d.slug) == (Outcome.DENY, "ip-blocked")
    # ... and with_transaction leaves anything but transaction-required alone.
    assert with_transaction(d, Grant("wire", PASSKEY, NOW + 60, NOW), NOW) is d


def test_the_request_grant_allows_with_the_passkey_evidence(policy: Policy) -> None:
    d = _decide(policy, _attrs())
    ok = with_transaction(d, Grant("wire", PASSKEY, NOW + 60, NOW), NOW)
    assert (ok.outcome, ok.reason, ok.evidence) == (Outcome.ALLOW, Reason.ALLOWED, PASSKEY)
    expired = with_transaction(d, Grant("wire", PASSKEY, NOW - 1, NOW - 120), NOW)
    assert expired.outcome is Outcome.STEP_UP
    weak = with_transaction(d, Grant("wire", Evidence("mfa", ("otp",), NOW), NOW + 60, NOW), NOW)
    assert weak.outcome is Outcome.STEP_UP
    assert with_transaction(d, None, NOW).outcome is Outcome.STEP_UP


# -- the Check ------------------------------------------------------------------------------------


class FakeTransactions:
    """The credential store's transaction grants: GETDEL semantics, calls recorded."""

    def __init__(self) -> None:
        self.grants: dict[tuple[str, str, str], TransactionGrant] = {}
        self.calls: list[str] = []
        self.fail = False

    def put(self, request: TransactionRequest, evidence: Evidence = PASSKEY) -> None:
        uk = user_key(ALICE.issuer, ALICE.subject)
        sk = session_key(ALICE.issuer, ALICE.subject, ALICE.session_id)
        grant = Grant("wire", evidence, NOW + 120, NOW)
        self.grants[(uk, sk, request.digest)] = TransactionGrant(grant, request.digest)

    async def consume_transaction_grant(
        self, user: str, session: str, level: str, digest: str, now: int
    ) -> TransactionGrant | None:
        self.calls.append(digest)
        if self.fail:
            raise StoreError("down")
        tx = self.grants.pop((user, session, digest), None)
        return tx if tx is not None and tx.grant.level == level else None


@pytest.fixture
def check(tmp_path: Path) -> tuple[Authorizer, FakeTransactions]:
    (tmp_path / "policy.yaml").write_text(POLICY)
    tokens = FakeTokens()
    tokens.access["t"] = ALICE
    txs = FakeTransactions()
    authorizer = Authorizer(
        policy=PolicyHolder(tmp_path / "policy.yaml"),
        tokens=tokens,  # type: ignore[arg-type]
        store=MemorySessionStore(FakeClock(NOW)),
        metrics=Metrics(),
        token_cookie="stepup_token",
        leeway=0,
        clock=FakeClock(NOW),
        transactions=txs,
    )
    return authorizer, txs


async def test_the_grant_allows_its_own_request_once(
    check: tuple[Authorizer, FakeTransactions],
) -> None:
    authorizer, txs = check
    txs.put(of_request(_attrs()))
    other = _attrs(body=BODY.replace(b"25", b"95"))
    d = (await authorizer.check(other)).decision
    assert (d.outcome, d.reason) == (Outcome.STEP_UP, Reason.TRANSACTION_REQUIRED)
    d = (await authorizer.check(_attrs())).decision  # the other body did not burn it
    assert d.outcome is Outcome.ALLOW and d.evidence == PASSKEY
    d = (await authorizer.check(_attrs())).decision  # a second submission
    assert (d.outcome, d.reason) == (Outcome.STEP_UP, Reason.TRANSACTION_REQUIRED)


async def test_a_deny_for_another_cause_leaves_the_grant_alone(
    check: tuple[Authorizer, FakeTransactions],
) -> None:
    authorizer, txs = check
    blocked = _attrs(ip="198.51.100.7")
    txs.put(of_request(blocked))
    assert (await authorizer.check(blocked)).decision.outcome is Outcome.DENY
    assert txs.calls == [] and len(txs.grants) == 1


async def test_other_levels_never_ask_and_a_store_error_fails_closed(
    check: tuple[Authorizer, FakeTransactions],
) -> None:
    authorizer, txs = check
    d = (await authorizer.check(_attrs("/accounts/1", None, method="GET"))).decision
    assert d.outcome is Outcome.ALLOW and txs.calls == []
    txs.fail = True
    d = (await authorizer.check(_attrs())).decision
    assert (d.outcome, d.reason) == (Outcome.ERROR, Reason.SESSION_STORE_UNAVAILABLE)


async def test_a_level_that_binds_the_body_refuses_a_request_without_one(
    check: tuple[Authorizer, FakeTransactions],
) -> None:
    authorizer, txs = check
    d = (await authorizer.check(_attrs("/strict/x", body=None))).decision
    assert (d.outcome, d.reason) == (Outcome.DENY, Reason.TRANSACTION_INVALID)
    assert txs.calls == []


# -- the redirect ---------------------------------------------------------------------------------

KEY = b"k" * 32


def _redirect(policy: Policy, attrs: RequestAttributes) -> dict[str, str]:
    redirects = Redirects(
        "/_stepup",
        ContextSigner(KEY, max_age_s=300),
        clock=FakeClock(NOW),
        passkeys=True,
        links=LinkSigner(KEY),
    )
    d = _decide(policy, attrs)
    target = redirects.target(d, attrs)
    assert target.startswith("/_stepup/passkey?level=wire&")
    return {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}


def test_the_redirect_signs_the_request_for_this_session_only(policy: Policy) -> None:
    attrs = _attrs(headers={"referer": "https://app.test/wires/new?from=home"})
    q = _redirect(policy, attrs)
    assert q["rd"] == "/wires/new?from=home"  # back to the form: a POST cannot be replayed
    links = LinkSigner(KEY)
    sk = session_key(ALICE.issuer, ALICE.subject, ALICE.session_id)
    tx = links.transaction(q["tx"], level="wire", session=sk, now=NOW, max_age_s=120)
    assert tx.digest == of_request(attrs).digest and tx.ip == "10.0.0.5"
    assert dict(tx.shown) == {"amount": "25,000.00 USD", "payee.name": "ACME Clearing"}
    other = session_key(ALICE.issuer, ALICE.subject, "s2")
    with pytest.raises(ValueError, match="another sign-in"):
        links.transaction(q["tx"], level="wire", session=other, now=NOW, max_age_s=120)
    with pytest.raises(ValueError, match="expired"):
        links.transaction(q["tx"], level="wire", session=sk, now=NOW + 121, max_age_s=120)


@pytest.mark.parametrize(
    ("method", "referer", "back"),
    [
        ("GET", "https://app.test/other", "/wires/"),  # a GET is loaded again as it is
        ("POST", "https://app.test/wires/new", "/wires/new"),
        ("POST", "https://evil.example/wires/new", "/wires/"),  # another site: not there
        ("POST", "javascript:alert(1)", "/wires/"),
        ("POST", "http://[bad/", "/wires/"),
        ("POST", "", "/wires/"),
    ],
)
def test_where_the_browser_goes_back_to_resubmit(method: str, referer: str, back: str) -> None:
    attrs = _attrs(method=method, headers={"referer": referer} if referer else {})
    assert unquote(resubmit_from(attrs)) == back


# -- render ---------------------------------------------------------------------------------------


def test_render_asks_envoy_for_the_whole_body_on_transaction_routes_only(policy: Policy) -> None:
    doc = render_envoy(policy, mode="grpc", hosts=["app.test"])
    routes = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    per = {
        r["name"]: r["typed_per_filter_config"]["envoy.filters.http.ext_authz"].get(
            "check_settings", {}
        )
        for r in routes
    }
    assert per["policy-1-wire"]["with_request_body"] == {
        "max_request_bytes": 4096,
        "allow_partial_message": False,
        "pack_as_bytes": True,
    }
    assert per["policy-2-strict"]["with_request_body"]["max_request_bytes"] == 16384
    assert "with_request_body" not in per["policy-3-high"]
    assert "with_request_body" not in per["default-standard"]


def test_a_browser_post_to_a_transaction_level_is_sent_to_approve_it(policy: Policy) -> None:
    """303 to the passkey page for a transaction-bound step-up of any method; another
    unsafe request of a browser keeps its page (a redirect would drop its body unseen)."""
    redirects = Redirects("/_stepup", None, clock=FakeClock(NOW), passkeys=True, links=None)
    wire = _attrs()
    status, headers, _ = denial(
        _decide(policy, wire), wire, "01D", redirects=redirects, error_status=503
    )
    assert status == 303 and dict(headers)["location"].startswith("/_stepup/passkey?level=wire")
    put = _attrs("/accounts/1", method="PUT")
    high = Decision(Outcome.STEP_UP, Reason.ACR_INSUFFICIENT, policy.by_name["high"], ALICE)
    status, headers, _ = denial(high, put, "01D", redirects=redirects, error_status=503)
    assert status == 401 and "location" not in dict(headers)
