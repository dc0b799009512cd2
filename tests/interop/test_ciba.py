"""Push step-up (OpenID CIBA, poll mode) end to end: panva's oidc-provider with its CIBA
feature (tests/interop/op/ciba.mjs, its own configuration) as the IdP of the real stack --
Envoy running what `render envoy` produces, the service, Valkey, the audit exporter and the
echo upstream. No fake anywhere between the API client and the OP.

The test plays the API client (its token, the 401 challenge, the push, the retry) and the
user's phone (the OP's test-only device endpoints: what is shown, approve, deny). Waiting
for the outcome is a real wait: the OP's `interval` is the timer under test (the service
must never poll sooner, and the OP's own log of polls says whether it did).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz.audit.export import read_records
from authz.demo.stack import Stack
from tests.builders import wait_until
from tests.interop.harness import (
    CIBA_CONFIG,
    CLIENT_SECRET,
    Browser,
    Op,
    running_op,
)

pytestmark = [pytest.mark.interop, pytest.mark.e2e]

POLICY = Path(__file__).resolve().parent / "ciba_policy.yaml"
INTERVAL_S = 1  # what the OP names in its acknowledgements
ALICE_ID = "u1-alice"  # the OP's `sub` for alice
BINDING = re.compile(r"[B-Z2-9]{4}-(GET|POST)/[A-Za-z0-9/._-]*")
OUTCOME_TIMEOUT_S = 30.0
ARCHIVE_WAIT_S = 20.0


@pytest.fixture(scope="module")
def ciba_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Op, Stack]]:
    workdir: Path = tmp_path_factory.mktemp("ciba-stack")
    with running_op(CIBA_CONFIG, workdir, interval_s=INTERVAL_S) as op:
        port = urlsplit(op.issuer).port
        assert port is not None
        stack = Stack(
            workdir / "stack",
            policy_file=POLICY,
            with_idp=False,
            idp_port=port,  # the stack's issuer URL is the OP's
            extra_settings={
                "oidc": {
                    "client_secret": CLIENT_SECRET,
                    # acr, amr and auth_time asked for in the backchannel request's claims
                    "profile": {"name": "generic", "claims_request": True},
                },
                # Rate limits have their own tests; here each test is its own client.
                "ciba": {"enabled": True, "max_expiry_s": 60, "max_per_user": 100},
            },
        )
        assert stack.idp_url == op.issuer
        stack.start()
        try:
            yield op, stack
        finally:
            stack.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Client:
    """The API client: its token, the service behind Envoy."""

    http: aiohttp.ClientSession
    stack: Stack
    token: str

    async def call(self, method: str, path: str) -> aiohttp.ClientResponse:
        resp = await self.http.request(
            method, f"{self.stack.envoy_url}{path}", headers=bearer(self.token)
        )
        await resp.read()
        return resp

    async def challenge(self, method: str, path: str) -> dict[str, Any]:
        """The RFC 9470 challenge's parameters, as a client reads them."""
        resp = await self.call(method, path)
        assert resp.status == 401, resp.status
        www = resp.headers["WWW-Authenticate"]
        assert 'error="insufficient_user_authentication"' in www
        acr = re.search(r'acr_values="([^"]+)"', www)
        max_age = re.search(r"max_age=(\d+)", www)
        assert acr and max_age, www
        return {"acr_values": acr.group(1), "max_age": int(max_age.group(1))}

    async def push(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], Any]:
        async with self.http.post(
            f"{self.stack.envoy_url}/_stepup/ciba", json=body, headers=bearer(self.token)
        ) as resp:
            return resp.status, await resp.json(), resp.headers

    async def status(self, url: str) -> tuple[int, dict[str, Any], Any]:
        async with self.http.get(f"{self.stack.envoy_url}{url}", headers=bearer(self.token)) as r:
            return r.status, await r.json(), r.headers

    async def outcome(self, url: str) -> dict[str, Any]:
        """Poll the service as a client does, honouring its Retry-After (a real wait: the
        OP's interval is the timer here), until the request ends."""
        deadline = time.monotonic() + OUTCOME_TIMEOUT_S
        while True:
            code, doc, headers = await self.status(url)
            assert code == 200, doc
            if doc["status"] != "pending":
                return doc
            if time.monotonic() > deadline:
                raise AssertionError(f"still pending after {OUTCOME_TIMEOUT_S:g} s: {doc}")
            await asyncio.sleep(float(headers["Retry-After"]))


async def signed_in(op: Op, stack: Stack, http: aiohttp.ClientSession) -> Client:
    """A password-only sign-in at the OP: the API client's first token."""
    sign_in = await Browser(op, http).sign_in(factor="pwd")
    return Client(http, stack, sign_in.access_token)


class Phone:
    """The user's authentication device: the OP's test-only endpoints."""

    def __init__(self, op: Op, http: aiohttp.ClientSession) -> None:
        self.op, self.http = op, http

    async def shown(self) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.op.issuer}/_admin/ciba") as resp:
            return list(await resp.json())

    async def find(self, binding_message: str) -> dict[str, Any]:
        """The request whose code matches the one the client shows (what a user checks)."""
        found = [r for r in await self.shown() if r["binding_message"] == binding_message]
        assert len(found) == 1, found
        return found[0]

    async def answer(self, auth_req_id: str, verb: str, factor: str = "otp") -> None:
        async with self.http.post(
            f"{self.op.issuer}/_admin/ciba/{auth_req_id}/{verb}", data={"factor": factor}
        ) as resp:
            assert resp.status == 200, await resp.text()

    async def polls(self, auth_req_id: str) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.op.issuer}/_admin/ciba/polls") as resp:
            return [p for p in await resp.json() if p["auth_req_id"] == auth_req_id]


def audit_records(stack: Stack, request_id: str, types: set[str]) -> list[dict[str, Any]]:
    """The archived records of one request (``request_id``: the hash the service writes),
    once the exporter (a process of its own) has archived one of each of ``types``."""

    def of_request() -> list[dict[str, Any]]:
        recs = read_records([stack.audit_dir]) if stack.audit_dir.is_dir() else []
        return [r for r in recs if r.get("request_id") == request_id]

    wait_until(
        lambda: types <= {r["type"] for r in of_request()},
        f"{types} of {request_id} in the archive",
        timeout_s=ARCHIVE_WAIT_S,
    )
    return of_request()


async def ciba_metric(stack: Stack, outcome: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(f"{stack.service_http_url}/metrics") as r:
        text = await r.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "stepup_authz_ciba_requests_total"
        and sample.labels.get("outcome") == outcome
    )


def audit_id(auth_req_id: str) -> str:
    return hashlib.sha256(auth_req_id.encode()).hexdigest()[:32]


async def test_a_pushed_approval_lets_the_retried_request_through(
    ciba_stack: tuple[Op, Stack], http: aiohttp.ClientSession
) -> None:
    op, stack = ciba_stack
    client, phone = await signed_in(op, stack, http), Phone(op, http)
    challenge = await client.challenge("GET", "/accounts/1")
    assert challenge == {"acr_values": "mfa phr", "max_age": 900}

    code, started, headers = await client.push(
        {**challenge, "method": "GET", "path": "/accounts/1"}
    )
    assert code == 202, started
    assert headers["Location"] == started["status_url"]
    assert BINDING.fullmatch(started["binding_message"]), started
    assert started["interval"] == INTERVAL_S  # the OP's, as it named it

    shown = await phone.find(started["binding_message"])
    assert shown["login"] == "alice" and shown["login_hint"] == ALICE_ID  # from the token
    assert shown["acr_values"] == "mfa phr"
    claims = json.loads(shown["claims"])["id_token"]
    assert claims["acr"] == {"essential": True, "values": ["mfa", "phr"]}
    assert claims["auth_time"] == {"essential": True}

    code, doc, _ = await client.status(started["status_url"])
    assert (code, doc["status"]) == (200, "pending")
    assert (await client.call("GET", "/accounts/1")).status == 401  # not yet

    await phone.answer(shown["auth_req_id"], "approve", factor="otp")
    done = await client.outcome(started["status_url"])
    assert (done["status"], done["reason"]) == ("approved", "success")
    assert 0 < done["grant_expires_in"] <= 900

    retried = await client.call("GET", "/accounts/1")
    assert retried.status == 200
    assert "mfa" in await retried.text()  # the echo upstream shows x-stepup-acr

    polls = await phone.polls(shown["auth_req_id"])
    assert polls and polls[-1]["answer"] == "tokens"
    assert not [p for p in polls if p["early"] or p["answer"] == "slow_down"], polls
    gaps = [b["at_ms"] - a["at_ms"] for a, b in itertools.pairwise(polls)]
    assert all(g >= INTERVAL_S * 1000 for g in gaps), gaps

    recs = audit_records(stack, audit_id(shown["auth_req_id"]), {"ciba.started", "ciba.completed"})
    started_rec = next(r for r in recs if r["type"] == "ciba.started")
    completed = next(r for r in recs if r["type"] == "ciba.completed")
    assert started_rec["route"].startswith("GET ") and started_rec["route"].endswith(" /accounts/1")
    assert (completed["acr"], completed["level"]) == ("mfa", "elevated")
    # `elevated` names no methods, so the claims request asked for no amr (the OP sent none)
    assert (completed["amr"], completed["factor"]) == ("", "none")
    assert completed["user"] == f"{op.issuer}|{ALICE_ID}"
    assert await ciba_metric(stack, "approved") >= 1
    assert await ciba_metric(stack, "started") >= 1


async def test_a_weaker_approval_is_no_grant(
    ciba_stack: tuple[Op, Stack], http: aiohttp.ClientSession
) -> None:
    """`high` asks for a hardware key: an OTP approval proves mfa, not phr with hwk."""
    op, stack = ciba_stack
    client, phone = await signed_in(op, stack, http), Phone(op, http)
    challenge = await client.challenge("POST", "/wires/1")
    assert challenge == {"acr_values": "phr", "max_age": 300}
    body = {**challenge, "method": "POST", "path": "/wires/1"}

    code, started, _ = await client.push(body)
    assert code == 202, started
    shown = await phone.find(started["binding_message"])
    assert json.loads(shown["claims"])["id_token"]["amr"] == {"essential": True}
    await phone.answer(shown["auth_req_id"], "approve", factor="otp")
    done = await client.outcome(started["status_url"])
    assert (done["status"], done["reason"]) == ("failed", "acr-insufficient")
    assert (await client.call("POST", "/wires/1")).status == 401

    code, started, _ = await client.push(body)  # the session may try again
    assert code == 202, started
    shown = await phone.find(started["binding_message"])
    await phone.answer(shown["auth_req_id"], "approve", factor="key")
    done = await client.outcome(started["status_url"])
    assert done["status"] == "approved", done
    assert (await client.call("POST", "/wires/1")).status == 200


async def test_a_denied_push_is_no_grant(
    ciba_stack: tuple[Op, Stack], http: aiohttp.ClientSession
) -> None:
    op, stack = ciba_stack
    client, phone = await signed_in(op, stack, http), Phone(op, http)
    code, started, _ = await client.push(
        {"level": "elevated", "method": "GET", "path": "/accounts/2"}
    )
    assert code == 202, started
    shown = await phone.find(started["binding_message"])
    await phone.answer(shown["auth_req_id"], "deny")
    done = await client.outcome(started["status_url"])
    assert (done["status"], done["reason"]) == ("denied", "ciba-denied")
    assert (await client.call("GET", "/accounts/2")).status == 401
    (failed,) = [
        r
        for r in audit_records(stack, audit_id(shown["auth_req_id"]), {"ciba.failed"})
        if r["type"] == "ciba.failed"
    ]
    assert (failed["reason"], failed["idp_error"]) == ("ciba-denied", "access_denied")


async def test_an_unanswered_push_expires(
    ciba_stack: tuple[Op, Stack], http: aiohttp.ClientSession
) -> None:
    op, stack = ciba_stack
    client, phone = await signed_in(op, stack, http), Phone(op, http)
    body = {"level": "elevated", "method": "GET", "path": "/accounts/3", "requested_expiry": 3}
    code, started, _ = await client.push(body)
    assert (code, started["expires_in"]) == (202, 3), started
    shown = await phone.find(started["binding_message"])
    done = await client.outcome(started["status_url"])  # nobody answers the phone
    assert (done["status"], done["reason"]) == ("expired", "ciba-expired")
    assert (await client.call("GET", "/accounts/3")).status == 401
    polls = await phone.polls(shown["auth_req_id"])
    assert all(p["answer"] == "authorization_pending" and not p["early"] for p in polls), polls
    assert len(polls) <= 3  # one per second until it expired, none after


async def test_another_session_cannot_use_the_approval(
    ciba_stack: tuple[Op, Stack], http: aiohttp.ClientSession
) -> None:
    op, stack = ciba_stack
    first, phone = await signed_in(op, stack, http), Phone(op, http)
    second = await signed_in(op, stack, http)  # alice again: another token, another session
    assert first.token != second.token

    code, started, _ = await first.push(
        {"level": "elevated", "method": "GET", "path": "/accounts/4"}
    )
    assert code == 202, started
    code, doc, _ = await second.status(started["status_url"])
    assert (code, doc["reason"]) == (404, "ciba-unknown")

    shown = await phone.find(started["binding_message"])
    await phone.answer(shown["auth_req_id"], "approve", factor="otp")
    assert (await first.outcome(started["status_url"]))["status"] == "approved"
    assert (await second.status(started["status_url"]))[0] == 404
    assert (await second.call("GET", "/accounts/4")).status == 401  # its own session: no grant
    assert (await first.call("GET", "/accounts/4")).status == 200


async def test_a_push_for_another_user_cannot_be_started(
    ciba_stack: tuple[Op, Stack], http: aiohttp.ClientSession
) -> None:
    op, stack = ciba_stack
    client, phone = await signed_in(op, stack, http), Phone(op, http)
    before = await phone.shown()
    for field in ("login_hint", "id_token_hint", "sub"):
        body = {"level": "elevated", "method": "GET", "path": "/accounts/5", field: "bob"}
        code, doc, _ = await client.push(body)
        assert (code, doc["reason"]) == (400, "bad-request"), doc
    assert await phone.shown() == before  # nothing reached the OP
    assert not [r for r in await phone.shown() if r["login"] == "bob"]


async def test_one_pending_push_per_session_at_the_op(
    ciba_stack: tuple[Op, Stack], http: aiohttp.ClientSession
) -> None:
    op, stack = ciba_stack
    client, phone = await signed_in(op, stack, http), Phone(op, http)
    body = {"level": "elevated", "method": "GET", "path": "/accounts/6"}
    code, started, _ = await client.push(body)
    assert code == 202, started
    count = len(await phone.shown())
    code, doc, headers = await client.push(body)
    assert (code, doc["reason"]) == (429, "ciba-pending")
    assert 0 < int(headers["Retry-After"]) <= 60
    assert len(await phone.shown()) == count  # the phone shows one request, not two
    shown = await phone.find(started["binding_message"])
    await phone.answer(shown["auth_req_id"], "deny")
    assert (await client.outcome(started["status_url"]))["status"] == "denied"
    code, _, _ = await client.push(body)
    assert code == 202  # the session's slot is free again
