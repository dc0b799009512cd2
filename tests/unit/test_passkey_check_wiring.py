"""What the Check path does with passkeys on: where a step-up goes, what the upstream
learns about the factor, and that the ceremony's state cookie stays ours."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

from authz.app import _service_cookies
from authz.check.redirects import Redirects
from authz.check.response import allowance
from authz.config.policy_file import load_policy
from authz.core.attributes import RequestAttributes
from authz.core.decision import Decision, Outcome
from authz.core.reasons import Reason
from authz.core.session import Evidence
from authz.stepup.link import ContextSigner
from authz.stepup.passkeys.settings import PasskeySettings
from tests import builders

POLICY = load_policy(
    {
        "levels": {
            "standard": {},
            "elevated": {"acr": ["mfa", "phr"], "factors": ["idp", "passkey"]},
            "high": {"acr": ["phr"], "factors": ["passkey"]},
        },
        "default_level": "standard",
    }
).by_name


def _attrs(cookie: str = "") -> RequestAttributes:
    headers = {"accept": "text/html", **({"cookie": cookie} if cookie else {})}
    return RequestAttributes(
        "GET", "http", "localhost", "/wires/1", "", headers, ip_address("127.0.0.1")
    )


def _step_up(level: str) -> Decision:
    return Decision(Outcome.STEP_UP, Reason.ACR_INSUFFICIENT, POLICY[level], builders.identity())


def test_a_passkey_first_level_goes_to_the_passkey_page_only_with_passkeys_on() -> None:
    signer = ContextSigner(b"k" * 32, max_age_s=300)
    on = Redirects("/_stepup", signer, clock=lambda: 1_900_000_000.0, passkeys=True)
    off = Redirects("/_stepup", signer, clock=lambda: 1_900_000_000.0)
    target = on.target(_step_up("high"), _attrs())
    assert target.startswith("/_stepup/passkey?level=high&rd=%2Fwires%2F1&ctx=")
    # The IdP first (it lists passkey second): the IdP start, which the page falls back to.
    assert on.target(_step_up("elevated"), _attrs()).startswith("/_stepup/start?level=elevated")
    # Passkeys off: every step-up goes to the IdP, as before.
    assert off.target(_step_up("high"), _attrs()).startswith("/_stepup/start?level=high&")


def test_the_upstream_sees_the_amr_the_allow_rests_on_and_nothing_that_splits_it() -> None:
    ev = Evidence("phr", ("hwk", "user", "pin", "mfa"), 1_900_000_000)
    d = Decision(Outcome.ALLOW, Reason.ALLOWED, POLICY["high"], builders.identity(), ev)
    headers, _ = allowance(d, _attrs(), "01DEC")
    assert dict(headers)["x-stepup-amr"] == "hwk user pin mfa"
    odd = Evidence("mfa", ("pwd", "otp hwk", "x\r\nx-stepup-level: high", "", "otp"), 1)
    d = Decision(Outcome.ALLOW, Reason.ALLOWED, POLICY["elevated"], builders.identity(), odd)
    headers, _ = allowance(d, _attrs(), "01DEC")
    assert dict(headers)["x-stepup-amr"] == "pwd otp"


def test_the_passkey_state_cookie_never_reaches_the_upstream(tmp_path: Path) -> None:
    base = builders.settings(tmp_path, cookie_secure=False)
    on = base.model_copy(update={"passkeys": PasskeySettings(enabled=True)})
    assert "stepup-passkey" not in _service_cookies(base)
    strip = frozenset(_service_cookies(on))
    d = Decision(Outcome.ALLOW, Reason.ALLOWED, POLICY["standard"], builders.identity())
    headers, _ = allowance(d, _attrs("stepup-passkey=abc; theme=dark"), "01DEC", strip)
    assert dict(headers)["cookie"] == "theme=dark"
