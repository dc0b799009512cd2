"""Passkeys in a real browser: Debian's Chromium under Playwright with its virtual
authenticator (CDP WebAuthn domain), against the passkey endpoints served by a real aiohttp
app on loopback over real Redis (``tests/passkeys/harness.py``).

Each test starts from the attacker's (or the unlucky user's) story and checks the limit
holds: the refusal names the rule, and no grant is written. Time is the harness's Clock.
Screenshots of the pages: ``STEPUP_SCREENSHOTS=docs/img`` (the docs show what these tests saw).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import BrowserContext, CDPSession, Page, Route

from authz.core.grants import Proof, Target, grant_for
from authz.core.session import Evidence
from authz.core.transactions import TransactionRequest
from tests.browser import chromium
from tests.passkeys.harness import CHROMIUM_AAGUID, ISS, Stack, passkey_stack

pytestmark = pytest.mark.integration

# Screenshots land where STEPUP_SCREENSHOTS says (docs/img to refresh the docs), else in a
# scratch folder: a test run does not rewrite tracked files.
IMG = Path(os.environ.get("STEPUP_SCREENSHOTS") or tempfile.mkdtemp(prefix="passkey-shots-"))
HARDWARE_KEY = {
    "protocol": "ctap2",
    "ctap2Version": "ctap2_1",
    "transport": "usb",
    "hasResidentKey": True,
    "hasUserVerification": True,
    "isUserVerified": True,
    "automaticPresenceSimulation": True,
}
SYNCED_PASSKEY = {
    **HARDWARE_KEY,
    "transport": "internal",
    "defaultBackupEligibility": True,
    "defaultBackupState": True,
}


class Browser:
    """One browser context signed in as the stack's user, with a virtual authenticator."""

    def __init__(self, stack: Stack, context: BrowserContext, page: Page, cdp: CDPSession):
        self.stack, self.context, self.page, self.cdp = stack, context, page, cdp
        self.authenticator = ""
        self.replies: list[dict[str, Any]] = []  # the JSON endpoints' answers, in order

    async def sign_in(self, **token: Any) -> None:
        await self.context.add_cookies(
            [{"name": "stepup-token", "value": self.stack.token(**token), "url": self.stack.url}]
        )

    async def add_authenticator(self, options: dict[str, Any]) -> str:
        added = await self.cdp.send("WebAuthn.addVirtualAuthenticator", {"options": options})
        self.authenticator = added["authenticatorId"]
        return self.authenticator

    async def credentials(self) -> list[dict[str, Any]]:
        got = await self.cdp.send(
            "WebAuthn.getCredentials", {"authenticatorId": self.authenticator}
        )
        return list(got["credentials"])

    async def enrol(self, name: str = "YubiKey 5", *, for_level: str | None = None) -> None:
        q = f"?for={for_level}" if for_level else ""
        await self.page.goto(f"{self.stack.url}/_stepup/passkey/keys{q}")
        await self.page.fill("#key-name", name)
        await self.page.click("#add")
        await self.page.wait_for_function(
            "() => location.search.includes('added=1') || "
            "(document.getElementById('status') || {}).className === 'error'"
        )
        if "added=1" not in self.page.url:
            raise AssertionError(
                f"enrolment failed: {await self.page.inner_text('#status')} {self.replies[-1:]}"
            )

    async def open_stepup(self, level: str, **kw: Any) -> None:
        await self.page.goto(self.stack.stepup_url(level, **kw))
        await self.page.wait_for_selector("#go")

    async def confirm(self) -> str:
        """Press the button; 'granted' when the page went back to rd, 'approved' when it
        approved a transaction (and offers the way back to resubmit), else the error text."""
        await self.page.click("#go")
        await self.page.wait_for_function(
            "() => location.pathname === '/done' || "
            "(document.getElementById('status') || {}).className === 'error' || "
            "!((document.getElementById('resubmit') || {hidden: true}).hidden)"
        )
        if self.page.url.endswith("/done"):
            return "granted"
        if await self.page.is_visible("#resubmit"):
            return "approved"
        return await self.page.inner_text("#status")

    def last_reply(self) -> dict[str, Any]:
        return self.replies[-1]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with chromium() as b:
        yield b


async def _session(browser: Any, stack: Stack, options: dict[str, Any] = HARDWARE_KEY) -> Browser:
    context = await browser.new_context()
    page = await context.new_page()
    cdp = await context.new_cdp_session(page)
    await cdp.send("WebAuthn.enable")
    b = Browser(stack, context, page, cdp)

    async def record(response: Any) -> None:
        if "/_stepup/passkey/" in response.url and response.request.method == "POST":
            try:
                b.replies.append(await response.json())
            except Exception:  # a non-JSON error page: keep the status
                b.replies.append({"status": response.status})

    page.on("response", record)
    await b.sign_in()
    await b.add_authenticator(options)
    return b


async def _grants(stack: Stack, level: str) -> list[Any]:
    return await stack.credentials.session_grants(stack.uk, stack.sk, [level])


async def test_enrol_then_passkey_stepup_records_a_grant_with_hwk_and_uv(
    browser: Any, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with passkey_stack(tmp_path, redis_url, redis_prefix) as stack:
        b = await _session(browser, stack)
        await b.page.goto(f"{stack.url}/_stepup/passkey/keys")
        await b.page.screenshot(path=str(IMG / "passkey-keys-empty.png"))
        await b.enrol("YubiKey 5 NFC")
        await b.page.screenshot(path=str(IMG / "passkey-keys.png"))
        [cred] = await stack.credentials.credentials(stack.uk)
        assert cred.aaguid == CHROMIUM_AAGUID and cred.device_bound and cred.user_verified
        assert cred.issuer == ISS and cred.subject == "alice"

        stack.clock.advance(60)  # a later step-up: the key predates it
        await b.open_stepup("high", rd="/wires/")
        await b.page.screenshot(path=str(IMG / "passkey-stepup.png"))
        assert "Wire transfers" in await b.page.inner_text("#why")
        assert "Wire transfer authority" in await b.page.inner_text("#why")
        # rd=/wires/ is not served by the test app; the grant is what matters, then /done.
        await b.page.goto(stack.stepup_url("high"))
        assert await b.confirm() == "granted"
        [grant] = await _grants(stack, "high")
        assert grant.evidence.acr == "phr"
        assert grant.evidence.amr == ("hwk", "user", "pin", "mfa")
        assert grant.evidence.auth_time == int(stack.clock())
        assert grant.expires_at == int(stack.clock()) + 300
        [after] = await stack.credentials.credentials(stack.uk)
        assert after.sign_count > cred.sign_count and after.last_used_at == int(stack.clock())
        m = stack.metrics.passkey_ceremonies.labels(
            kind="authenticate", result="success", level="high"
        )
        assert m._value.get() == 1


async def test_no_user_verification_on_a_uv_level_is_refused(
    browser: Any, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with passkey_stack(tmp_path, redis_url, redis_prefix) as stack:
        b = await _session(browser, stack)
        await b.enrol()
        stack.clock.advance(60)
        # The key no longer verifies its user, and a hostile page script asks the browser not
        # to require it: the server must refuse what the authenticator signs without UV.
        await b.cdp.send(
            "WebAuthn.setUserVerified",
            {"authenticatorId": b.authenticator, "isUserVerified": False},
        )

        async def discourage(route: Route) -> None:
            resp = await route.fetch()
            doc = await resp.json()
            doc["publicKey"]["userVerification"] = "discouraged"
            await route.fulfill(response=resp, body=json.dumps(doc))

        await b.page.route("**/authenticate/options", discourage)
        await b.open_stepup("high")
        text = await b.confirm()
        assert "PIN or fingerprint" in text
        assert b.last_reply()["reason"] == "user-verification-required"
        assert await _grants(stack, "high") == []


async def test_a_counter_that_goes_backwards_is_refused_as_a_possible_clone(
    browser: Any, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with passkey_stack(tmp_path, redis_url, redis_prefix) as stack:
        b = await _session(browser, stack)
        await b.enrol()
        stack.clock.advance(60)
        await b.open_stepup("high")
        assert await b.confirm() == "granted"
        # A copy of the key (same private key) with an older counter: WebAuthn 6.1.1.
        [vc] = await b.credentials()
        assert vc["signCount"] >= 2
        await b.cdp.send(
            "WebAuthn.removeCredential",
            {"authenticatorId": b.authenticator, "credentialId": vc["credentialId"]},
        )
        await b.cdp.send(
            "WebAuthn.addCredential",
            {"authenticatorId": b.authenticator, "credential": {**vc, "signCount": 0}},
        )
        stack.clock.advance(400)  # the first grant has expired
        await b.open_stepup("high")
        text = await b.confirm()
        assert "may have been copied" in text
        reply = b.last_reply()
        assert reply["reason"] == "counter-regression" and reply["rule"] == "webauthn.sign_count"
        assert stack.metrics.passkey_clones._value.get() == 1
        assert [g for g in await _grants(stack, "high") if g.is_live(int(stack.clock()))] == []


async def test_a_synced_passkey_is_refused_on_a_device_bound_level(
    browser: Any, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with passkey_stack(tmp_path, redis_url, redis_prefix) as stack:
        b = await _session(browser, stack, SYNCED_PASSKEY)
        # Enrolling it *for* the device-bound level is refused at once, naming the rule.
        await b.page.goto(f"{stack.url}/_stepup/passkey/keys?for=high")
        await b.page.fill("#key-name", "Phone")
        await b.page.click("#add")
        await b.page.wait_for_selector("#status.error")
        assert b.last_reply()["rule"] == "authenticators.device_bound"
        assert await stack.credentials.credentials(stack.uk) == []
        # Enrolled for a level that accepts synced passkeys, it still cannot step up to high.
        await b.enrol("Phone")
        [cred] = await stack.credentials.credentials(stack.uk)
        assert cred.backup_eligible and not cred.device_bound
        stack.clock.advance(60)
        await b.open_stepup("high")
        text = await b.confirm()
        await b.page.screenshot(path=str(IMG / "passkey-refused.png"))
        assert "synced passkey is not accepted" in text
        reply = b.last_reply()
        assert reply["reason"] == "device-bound-required"
        assert reply["rule"] == "authenticators.device_bound" and reply["decision_id"]
        assert await _grants(stack, "high") == []
        # ... and on the level that accepts it, it gives swk, not hwk.
        await b.open_stepup("elevated")
        assert await b.confirm() == "granted"
        [grant] = await _grants(stack, "elevated")
        assert grant.evidence.amr[0] == "swk"


async def test_an_aaguid_outside_the_allowlist_is_refused(
    browser: Any, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    other = "ee882879-721c-4913-9775-3dfcce97072a"  # another model's AAGUID
    async with passkey_stack(tmp_path, redis_url, redis_prefix, pinned_aaguid=other) as stack:
        b = await _session(browser, stack)
        await b.enrol()
        stack.clock.advance(60)
        await b.open_stepup("pinned")
        text = await b.confirm()
        assert "model of security key is not accepted" in text
        assert b.last_reply()["reason"] == "authenticator-not-allowed"
        assert b.last_reply()["rule"] == "authenticators.aaguids"
        assert await _grants(stack, "pinned") == []
    # The same authenticator, listed: accepted.
    async with passkey_stack(tmp_path, redis_url, redis_prefix + "2:") as stack:
        b = await _session(browser, stack)
        await b.enrol()
        stack.clock.advance(60)
        await b.open_stepup("pinned")
        assert await b.confirm() == "granted"


async def test_a_key_enrolled_during_a_stepup_cannot_complete_it(
    browser: Any, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """Keycloak CVE-2023-3597: the factor enrolled in the middle of a step-up satisfied it."""
    async with passkey_stack(tmp_path, redis_url, redis_prefix) as stack:
        b = await _session(browser, stack)
        await b.open_stepup("high")  # the step-up begins (no key yet: the page still renders)
        stepup = b.page.url  # it carries when the step-up began (st)
        assert "st=" in stepup
        stack.clock.advance(10)
        await b.enrol()  # "add a key" from the step-up page, during the step-up
        stack.clock.advance(10)
        await b.page.goto(stepup)  # back to the same step-up
        text = await b.confirm()
        assert "added during this step-up" in text
        assert b.last_reply()["reason"] == "enrolled-during-stepup"
        assert b.last_reply()["rule"] == "enrolment.same_stepup"
        assert await _grants(stack, "high") == []
        # Reloading the same step-up does not reset it ...
        await b.page.goto(stepup)
        assert "added during this step-up" in await b.confirm()
        # ... a new step-up (the Check sends a new link) does.
        stack.clock.advance(10)
        await b.open_stepup("high")
        assert await b.confirm() == "granted"


async def test_a_transaction_grant_allows_its_own_request_once(
    browser: Any, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with passkey_stack(tmp_path, redis_url, redis_prefix) as stack:
        b = await _session(browser, stack)
        await b.enrol()
        stack.clock.advance(60)
        body = json.dumps({"amount": "25,000.00 USD", "payee": {"name": "ACME Clearing"}})
        wire = TransactionRequest("POST", "localhost", "/wires/", body.encode())
        tx = stack.links.sign_transaction(
            level="wire",
            session=stack.sk,
            request=wire,
            fields=("amount", "payee.name"),
            now=int(stack.clock()),
        )
        await b.open_stepup("wire", tx=tx)
        shown = await b.page.inner_text(".action")
        assert "POST localhost/wires/" in shown and "25,000.00 USD" in shown
        assert "ACME Clearing" in shown
        await b.page.screenshot(path=str(IMG / "passkey-transaction.png"))
        assert await b.confirm() == "approved"
        assert "submit it again within 120 seconds" in await b.page.inner_text("#status")
        # The way back is to where the request was made (rd), to submit it again there.
        await b.page.click("#resubmit a")
        await b.page.wait_for_url(f"{stack.url}/done")
        assert await _grants(stack, "wire") == []  # no time-window grant for the level
        now = int(stack.clock())
        # What the Check would do: consume the grant for the digest of the request it sees.
        other = TransactionRequest(
            "POST", "localhost", "/wires/", body.replace("25", "95").encode()
        )
        assert (
            await stack.credentials.consume_transaction_grant(
                stack.uk, stack.sk, "wire", other.digest, now
            )
            is None
        )
        got = await stack.credentials.consume_transaction_grant(
            stack.uk, stack.sk, "wire", wire.digest, now
        )
        assert got is not None and got.grant.evidence.amr[0] == "hwk"
        assert got.grant.expires_at <= now + 120
        replay = await stack.credentials.consume_transaction_grant(
            stack.uk, stack.sk, "wire", wire.digest, now
        )
        assert replay is None


async def test_an_edited_transaction_link_is_refused(
    browser: Any, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with passkey_stack(tmp_path, redis_url, redis_prefix) as stack:
        b = await _session(browser, stack)
        wire = TransactionRequest("POST", "localhost", "/wires/", b'{"amount": "1"}')
        tx = stack.links.sign_transaction(
            level="wire", session=stack.sk, request=wire, fields=("amount",), now=int(stack.clock())
        )
        body, mac = tx.split(".")
        doc = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        doc["f"] = [["amount", "1"]]
        doc["dg"] = "00" * 32
        forged = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
        await b.page.goto(stack.stepup_url("wire", tx=f"{forged}.{mac}"))
        assert "cannot be used" in await b.page.inner_text("h1")
        assert "Reference:" in await b.page.inner_text(".ref")
        await b.page.screenshot(path=str(IMG / "passkey-error.png"))


async def test_removal_works_and_restore_from_the_archive_gives_back_a_working_key(
    browser: Any, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    from tests.passkeys.archive import archive_stream, restore_cli

    async with passkey_stack(tmp_path, redis_url, redis_prefix, audit=True) as stack:
        b = await _session(browser, stack)
        await b.enrol("Desk key")
        [cred] = await stack.credentials.credentials(stack.uk)
        # Lose the registry (a Redis without persistence restarted): restore from the archive.
        await stack.redis.delete(stack.credentials.registry_key(stack.uk))
        archive = await archive_stream(stack, tmp_path / "archive")
        out = await restore_cli(stack, archive)
        assert "restored 1 credential" in out
        [back] = await stack.credentials.credentials(stack.uk)
        assert back.credential_id == cred.credential_id and back.public_key == cred.public_key
        stack.clock.advance(60)
        await b.open_stepup("high")
        assert await b.confirm() == "granted"
        # Remove it from the keys page: it is gone, and so is the step-up with it.
        await b.page.goto(f"{stack.url}/_stepup/passkey/keys")
        await b.page.click("button.remove")
        await b.page.wait_for_url("**removed=1**")
        assert "no security keys" in await b.page.inner_text("main")
        assert await stack.credentials.credentials(stack.uk) == []
        # The archive now says enrolled then removed: a restore brings nothing back.
        archive = await archive_stream(stack, tmp_path / "archive2")
        out = await restore_cli(stack, archive)
        assert "restored 0 credential" in out


async def test_a_browser_without_webauthn_goes_to_the_idp_when_the_level_allows(
    browser: Any, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with passkey_stack(tmp_path, redis_url, redis_prefix) as stack:
        b = await _session(browser, stack)
        await b.enrol()
        stack.clock.advance(60)
        await b.context.add_init_script("delete window.PublicKeyCredential;")
        page = await b.context.new_page()
        await page.goto(stack.stepup_url("elevated"))
        await page.wait_for_url("**/_stepup/start?level=elevated**")
        # A passkey-only level has nowhere to fall back to: it says so instead.
        await page.goto(stack.stepup_url("high"))
        await page.wait_for_selector("#status.error")
        assert "accepts nothing else" in await page.inner_text("#status")


async def test_enrolment_needs_a_fresh_stepup(
    browser: Any, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    async with passkey_stack(tmp_path, redis_url, redis_prefix) as stack:
        b = await _session(browser, stack)
        await b.sign_in(acr="pwd")  # a password sign-in only
        await b.page.goto(f"{stack.url}/_stepup/passkey/keys")
        assert "first confirm your sign-in" in await b.page.inner_text("main")
        link = await b.page.get_attribute("main a[href*='/_stepup/start']", "href")
        assert link is not None and "level=elevated" in link
        await b.page.screenshot(path=str(IMG / "passkey-keys-locked.png"))
        # A stale MFA (older than the enrolment window) does not open it either.
        await b.sign_in(acr="mfa", age_s=600)
        resp = await b.page.request.post(
            f"{stack.url}/_stepup/passkey/register/options",
            data=json.dumps({"name": "x"}),
            headers={"Content-Type": "application/json", "Origin": stack.url},
        )
        assert resp.status == 403
        assert (await resp.json())["reason"] == "enrolment-not-allowed"
        # An IdP step-up to elevated completes (the callback records a grant through the one
        # grant rule): enrolment opens for enrol_window_s.
        now = int(stack.clock())
        level = stack.routes._policy.by_name["elevated"]
        grant = grant_for(
            level,
            Target(ISS, "alice"),
            Proof(ISS, "alice", Evidence("mfa", ("pwd", "otp"), now), challenged_at=now),
            now=now,
            leeway=0,
            default_ttl_s=900,
        )
        await stack.sessions.write_grant(stack.uk, stack.sk, grant, now)
        await b.enrol("After IdP step-up")
        stack.clock.advance(stack.settings.passkeys.enrol_window_s + 1)
        await b.page.goto(f"{stack.url}/_stepup/passkey/keys")
        assert "first confirm your sign-in" in await b.page.inner_text("main")
        assert await b.page.query_selector("button.remove") is None
