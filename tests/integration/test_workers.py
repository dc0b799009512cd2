"""``stepup-authz serve --workers 2`` as a real process tree: both workers answer Checks on
the one shared gRPC port, /metrics on the shared HTTP port sums every worker's counters,
SIGTERM stops them all, and a worker that dies takes the supervisor (and its sibling) down.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client.mmap_dict import MmapedDict

from authz.audit.testing import dev_mac_settings
from authz.demo.stack import free_ports
from authz.devidp import DevClient, DevIdpConfig, base_url, bind, running
from tests.builders import async_wait_until, check_request

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Tree:
    proc: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    metrics_dir: Path
    idp: str

    def workers(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except OSError:
            return []


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by its parent counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a socket of its own listening on ``port`` (gRPC's is
    an IPv4-mapped tcp6 one)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                return True  # 0A: LISTEN
    return False


async def _ready(port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/readyz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


@pytest.fixture
async def tree(tmp_path: Path, redis_url: str, redis_prefix: str) -> AsyncIterator[Tree]:
    sock = bind()
    idp = base_url(sock)
    cfg = DevIdpConfig(
        issuer=idp,
        clients={"stepup-authz": DevClient("dev-secret", ("http://app.test/_stepup/callback",))},
    )
    grpc_port, http_port = free_ports(2)
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "policy_file": str(ROOT / "examples" / "policy.yaml"),
                "grpc": {"host": "127.0.0.1", "port": grpc_port, "shutdown_delay_s": 0},
                "http": {"host": "127.0.0.1", "port": http_port},
                "redis": {"url": redis_url, "key_prefix": redis_prefix},
                "oidc": {
                    "issuer": idp,
                    "client_id": "stepup-authz",
                    "client_secret": "dev-secret",
                    "audience": "stepup-demo",
                    "algorithms": ["RS256"],
                    "token_typ": "at+jwt",
                },
                "stepup": {"public_url": "http://app.test", "cookie_secure": False},
                "audit": dev_mac_settings(tmp_path),
            }
        )
    )
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    async with running(cfg, sock):
        # The tree's output is kept: when it exits early, the assertion says why.
        serve_log = tmp_path / "serve.log"
        out = serve_log.open("wb")
        proc = subprocess.Popen(  # noqa: ASYNC220 (a long-lived child; Popen returns at once)
            [sys.executable, "-m", "authz.cli", "serve", "--config", str(config), "--workers", "2"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        t = Tree(proc, grpc_port, http_port, metrics_dir, idp)
        try:
            # Real processes starting: wait for them, with generous deadlines.
            await async_wait_until(lambda: len(t.workers()) == 2, "two workers", timeout_s=20)

            async def ready() -> bool:
                assert proc.poll() is None, (
                    "the supervisor exited: " + serve_log.read_text(errors="replace")[-3000:]
                )
                return await _ready(http_port)

            await async_wait_until(ready, "readyz", timeout_s=30)
            # Both workers listen before we start counting (readyz may hit only one).
            await async_wait_until(
                lambda: all(_listening(pid, grpc_port) for pid in t.workers()),
                "both workers listening on the gRPC port",
                timeout_s=30,
            )
            yield t
        finally:
            if proc.poll() is None:
                proc.kill()
                for pid in t.workers():
                    with __import__("contextlib").suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait()


def _checks_by_worker(metrics_dir: Path) -> dict[int, float]:
    """checks_total per worker pid, from prometheus_client's multiprocess files."""
    out: dict[int, float] = {}
    for f in metrics_dir.glob("counter_*.db"):
        pid = int(f.stem.split("_")[1])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(f)):
            if '"stepup_authz_checks_total"' in key or '"stepup_authz_checks"' in key:
                out[pid] = out.get(pid, 0) + value
    return out


async def test_two_workers_answer_and_sigterm_stops_all(tree: Tree) -> None:
    workers = tree.workers()
    n = 60
    for _ in range(n):  # a new connection each time: the kernel picks a worker per connection
        async with grpc.aio.insecure_channel(f"127.0.0.1:{tree.grpc_port}") as ch:
            r = await external_auth_pb2_grpc.AuthorizationStub(ch).Check(check_request())
            assert r.status.code == 0  # "/" is public in the example policy
    per_worker = _checks_by_worker(tree.metrics_dir)
    assert set(per_worker) == set(workers), per_worker
    assert all(v > 0 for v in per_worker.values()), per_worker
    assert sum(per_worker.values()) == n

    # Any worker's /metrics reports the sum over both.
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{tree.http_port}/metrics") as resp,
    ):
        text = await resp.text()
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("stepup_authz_checks_total{")
    )
    assert total == n

    tree.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(tree.proc.wait, 30) == 0
    assert all(_gone(pid) for pid in workers)


async def test_a_dead_worker_stops_the_tree(tree: Tree) -> None:
    first, second = tree.workers()
    os.kill(first, signal.SIGKILL)
    code = await asyncio.to_thread(tree.proc.wait, 30)
    assert code != 0
    await async_wait_until(lambda: _gone(second), "the other worker to exit")


def test_workers_refuse_port_zero(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "policy_file": str(ROOT / "examples" / "policy.yaml"),
                "grpc": {"port": 0},
                "http": {"port": 0},
                "oidc": {
                    "issuer": "http://127.0.0.1:1",
                    "client_id": "c",
                    "client_secret": "s",
                    "audience": "a",
                },
                "stepup": {"public_url": "http://app.test"},
            }
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "authz.cli", "serve", "--config", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "fixed ports" in r.stderr


async def _password_token(idp: str) -> str:
    form = {"grant_type": "password", "username": "alice", "password": "alice-password"}
    basic = base64.b64encode(b"stepup-authz:dev-secret").decode()
    headers = {"Authorization": f"Basic {basic}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{idp}/token", data=form, headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        return str((await r.json())["access_token"])


async def test_workers_share_the_step_up_link_key(tree: Tree) -> None:
    """No stepup.context_key_file and no crypto.keys in the settings: the supervisor hands
    every worker the same keys (shared_keys_env), so a step-up link signed by whichever
    worker answered the Check verifies at whichever worker serves /_stepup/start. With a
    key per worker, about half of the first uses would answer 400 "link expired"."""
    token = await _password_token(tree.idp)
    req = check_request()
    http = req.attributes.request.http
    http.path = "/accounts/1"
    http.headers["authorization"] = f"Bearer {token}"
    http.headers["accept"] = "text/html"
    links = []
    for _ in range(12):  # a new connection each time: the kernel picks a worker per connection
        async with grpc.aio.insecure_channel(f"127.0.0.1:{tree.grpc_port}") as ch:
            r = await external_auth_pb2_grpc.AuthorizationStub(ch).Check(req)
        location = {h.header.key: h.header.value for h in r.denied_response.headers}["location"]
        assert location.startswith("/_stepup/start?level=elevated&"), location
        links.append(location)
    signers = _checks_by_worker(tree.metrics_dir)
    assert len(signers) == 2, signers  # both workers signed links
    statuses = []
    # Each link twice, on fresh connections: the first use verifies at whichever worker the
    # kernel picks; the second is refused there as reused (the nonce is in Redis, not in a
    # worker), so single use holds across workers too.
    for link in links:
        for _ in range(2):
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
                s.get(
                    f"http://127.0.0.1:{tree.http_port}{link}",
                    headers={"Authorization": f"Bearer {token}"},
                    allow_redirects=False,
                ) as resp,
            ):
                statuses.append(resp.status)
                if resp.status == 302:
                    assert resp.headers["Location"].startswith(tree.idp)
    assert statuses == [302, 400] * len(links)
