"""Processes for the benchmark: the service stack (authz.demo.stack.Stack, unchanged), two
stand-alone Envoys for the reference scenarios, and what the harness reads from them
(CPU from /proc, Envoy admin counters, the service's Prometheus counters), plus the tokens
and the grant the scenarios need.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import jwt
import pyotp

from authz.demo.stack import (
    AUDIENCE,
    CLIENT_ID,
    CLIENT_SECRET,
    HOST,
    Stack,
    free_ports,
    http_ok,
    render_envoy_config,
)
from bench.parse import parse_envoy_stats, proc_cpu_ticks, system_busy_ticks

BENCH_DIR = Path(__file__).resolve().parent
ENVOY_DIR = BENCH_DIR / "envoy"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
_envoy_ids = iter(range(1, 100))


class BenchError(RuntimeError):
    pass


# -- plain HTTP on loopback ------------------------------------------------------------------
def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) — 4xx/5xx are answers here, not exceptions."""
    req = urllib.request.Request(url, headers=headers or {})  # noqa: S310 (loopback http only)
    try:
        with _opener.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers.items()), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers.items()), err.read()


def http_text(url: str) -> str:
    status, _, body = http_get(url)
    if status != 200:
        raise BenchError(f"GET {url} -> {status}")
    return body.decode()


# -- CPU and memory from /proc ---------------------------------------------------------------
def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` (all its threads) and of its live children (the workers of
    ``serve --workers N``) so far, in seconds."""
    total = proc_cpu_ticks(Path(f"/proc/{pid}/stat").read_text())
    for child in _children(pid):
        with contextlib.suppress(OSError):
            total += proc_cpu_ticks(Path(f"/proc/{child}/stat").read_text())
    return total / CLK_TCK


def host_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy so far (the whole host, every process)."""
    return system_busy_ticks(Path("/proc/stat").read_text()) / CLK_TCK


def children_cpu_seconds() -> float:
    """CPU of this process's waited-for children (wrk, h2load) so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def rss_kib(pid: int) -> int:
    """Resident set of ``pid`` plus its live children (the workers), KiB."""
    total = 0
    for p in (pid, *_children(pid)):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def find_pid(*needles: str) -> int | None:
    """The first process whose command line contains every needle (ours are unique: each
    names a file in the bench's own work directory or a port chosen for this run)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(n in argv for n in needles):
            return int(entry.name)
    return None


# -- a stand-alone Envoy (scenarios 0 and 1) --------------------------------------------------
@dataclass
class Envoy:
    """One Envoy on its own ports, rendered from a bench template; ``stop()`` kills its group."""

    name: str
    config: Path
    listen_port: int
    admin_port: int
    popen: subprocess.Popen[bytes]
    log: IO[bytes]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        self.log.close()


def start_envoy(
    name: str, template: Path, workdir: Path, envoy_bin: str, **values: str | int
) -> Envoy:
    listen_port, admin_port = free_ports(2)
    config = workdir / f"{name}.yaml"
    config.write_text(
        render_envoy_config(template, listen_port=listen_port, admin_port=admin_port, **values)
    )
    log = (workdir / f"{name}.log").open("ab")
    popen = subprocess.Popen(
        [
            envoy_bin,
            "-c",
            str(config),
            "--log-level",
            "warn",
            "--concurrency",
            "1",
            # a base id of our own, apart from the Stack's (which derives its ids from our pid)
            "--base-id",
            str(3_000_000_000 + (os.getpid() % 1_000_000) * 100 + next(_envoy_ids)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        process_group=0,
    )
    env = Envoy(name, config, listen_port, admin_port, popen, log)
    deadline = time.monotonic() + 20
    while not http_ok(f"{env.admin_url}/ready", expect=b"LIVE"):
        if popen.poll() is not None or time.monotonic() > deadline:
            env.stop()
            tail = (workdir / f"{name}.log").read_text(errors="replace")[-3000:]
            raise BenchError(f"envoy {name} did not become ready:\n{tail}")
        time.sleep(0.05)
    return env


def envoy_counters(admin_url: str) -> dict[str, int]:
    """The edge listener's HTTP counters (downstream_rq_2xx, ext_authz.*, rbac.*, ...)."""
    return parse_envoy_stats(http_text(f"{admin_url}/stats?filter=%5Ehttp%5C.edge%5C."))


# -- tokens and the grant ----------------------------------------------------------------------
def password_token(idp_url: str, *, otp: str | None = None) -> str:
    """An access token from the dev IdP's password grant (acr=pwd, or mfa with ``otp``)."""
    form = {"grant_type": "password", "username": "alice", "password": "alice-password"}
    if otp:
        form["otp"] = otp
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    req = urllib.request.Request(  # noqa: S310 (loopback http only)
        f"{idp_url}/token",
        data=urllib.parse.urlencode(form).encode(),
        headers={"Authorization": f"Basic {basic}"},
    )
    with _opener.open(req, timeout=5) as resp:
        return str(json.loads(resp.read())["access_token"])


def mfa_token(idp_url: str) -> str:
    from authz.devidp import ALICE_TOTP_SECRET

    return password_token(idp_url, otp=pyotp.TOTP(ALICE_TOTP_SECRET).now())


def write_grant(stack: Stack, token: str, level: str, ttl_s: int) -> None:
    """Record a step-up grant for ``token``'s session through the service's own store API,
    exactly as the callback would after an mfa sign-in now."""
    from authz.config.settings import RedisSettings
    from authz.core.session import session_key, user_key
    from authz.store.connections import make_client
    from authz.store.sessions import RedisSessionStore
    from bench.inproc import bench_grant

    claims = jwt.decode(token, options={"verify_signature": False})  # our own fresh token
    settings = RedisSettings(url=stack.redis_url)
    key = session_key(claims["iss"], claims["sub"], claims["sid"])
    extra: dict[str, object] = {}
    crypto = stack.settings().get("crypto")
    if crypto:  # the service's keyring: a grant sealed under another key reads as corrupt
        from authz.config.settings import CryptoSettings
        from authz.store.crypto import cipher_from_settings

        extra["cipher"] = cipher_from_settings(CryptoSettings.model_validate(crypto))

    async def write() -> None:
        store = RedisSessionStore(
            make_client(stack.redis_url, settings),
            prefix=settings.key_prefix,
            deadline_ms=2000,
            **extra,
        )  # type: ignore[arg-type]
        try:
            now = int(time.time())
            grant = bench_grant(level, now, ttl_s)
            await store.write_grant(user_key(claims["iss"], claims["sub"]), key, grant, now)
        finally:
            await store.aclose()

    asyncio.run(write())


# The bench policy's levels: scenario 2 allows at "elevated" (GET /accounts/1), scenario 4 at
# "high" (GET /wires/1). Allows at or above AUDIT_DURABLE_LEVEL are audited before access.
AUDIT_DURABLE_LEVEL = "high"


class BenchStack(Stack):
    """The demo stack with the bench's Envoy (direct responses behind ext_authz), audit before
    access from ``high`` only (so scenario 2 measures the allow path, scenario 4 adds the
    durable audit record), optionally the HTTP ext_authz listener with a second Envoy in
    front of it (scenario 5), and ``serve --workers N``."""

    def __init__(
        self,
        workdir: Path,
        policy_file: Path,
        log_level: str,
        *,
        http_authz: bool = False,
        workers: int = 1,
    ) -> None:
        # A keyring of our own (written at start): the harness seals the scenario grants
        # under the same key as the service (see write_grant).
        self.bench_crypto_key = Path(workdir).resolve() / "crypto-bench.key"
        extra: dict[str, object] = {
            "log": {"level": log_level},
            "audit": {"durable_level": AUDIT_DURABLE_LEVEL},
            "crypto": {"keys": {"bench": str(self.bench_crypto_key)}, "active_kid": "bench"},
        }
        super().__init__(
            workdir,
            policy_file=policy_file,
            envoy_template=ENVOY_DIR / "authz_grpc.yaml",
            extra_settings=extra,
        )
        # The demo Stack picks its own check_port (for its HTTP-mode stack): the HTTP
        # listener's setting and the second Envoy both take that one, set after it.
        self.with_http_authz = http_authz
        if http_authz:
            self.extra_settings["http_authz"] = {"enabled": True, "port": self.check_port}
        self.workers = workers
        self.http_envoy: Envoy | None = None

    def _service_argv(self) -> list[str]:
        argv = super()._service_argv()
        return [*argv, "--workers", str(self.workers)] if self.workers > 1 else argv

    def _start(self) -> None:
        self.bench_crypto_key.parent.mkdir(parents=True, exist_ok=True)
        if not self.bench_crypto_key.exists():
            self.bench_crypto_key.write_bytes(os.urandom(32))
        super()._start()
        if self.with_http_authz:
            envoy_bin = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
            self.http_envoy = start_envoy(
                "authz_http",
                ENVOY_DIR / "authz_http.yaml",
                self.workdir,
                envoy_bin,
                authz_check_port=self.check_port,
            )

    def stop(self) -> None:
        if self.http_envoy is not None:
            self.http_envoy.stop()
            self.http_envoy = None
        super().stop()

    @property
    def http_envoy_url(self) -> str:
        if self.http_envoy is None:
            raise BenchError("the HTTP ext_authz Envoy is not running")
        return self.http_envoy.url


# -- the floors (scenarios 6 and 7) ------------------------------------------------------------
@dataclass
class Floor:
    """A bench.floors server (its own process group) and the Envoy in front of it."""

    mode: str
    port: int
    popen: subprocess.Popen[bytes]
    log: IO[bytes]
    envoy: Envoy | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
            self.envoy = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        self.log.close()


def capture_http_answer(port: int, head: bytes, timeout: float = 5.0) -> bytes:
    """Send one check request head to an HTTP ext_authz listener; its whole answer."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(head)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise BenchError(f"the HTTP ext_authz listener closed without answering: {buf!r}")
            buf += chunk
        top, _, body = buf.partition(b"\r\n\r\n")
        length = 0
        for line in top.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return top + b"\r\n\r\n" + body[:length]


def capture_grpc_answer(target: str, request: bytes, timeout: float = 5.0) -> bytes:
    """One Authorization/Check call with serialised bytes in and out (no stubs needed)."""
    import grpc

    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary("/envoy.service.auth.v3.Authorization/Check")
        return bytes(check(request, timeout=timeout))


def start_floor(
    mode: str,
    answer: bytes,
    workdir: Path,
    envoy_bin: str,
    *,
    await_redis: str | None = None,
    spin_us: int = 0,
) -> Floor:
    """Start ``python -m bench.floors <mode>`` answering ``answer`` and, in front of it, an
    Envoy rendered from the service's own bootstrap for that mode. ``await_redis`` (gRPC):
    the floor awaits one GET on that Redis per check (scenario 6r)."""
    port = free_ports(1)[0]
    name = (
        f"floor-{mode}" + ("-await" if await_redis else "") + (f"-spin{spin_us}" if spin_us else "")
    )
    answer_file = workdir / f"{name}.answer"
    answer_file.write_bytes(answer)
    log = (workdir / f"{name}.log").open("ab")
    popen = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.floors",
            mode,
            "--port",
            str(port),
            "--answer",
            str(answer_file),
            "--record",
            str(workdir / f"{name}.request"),
            *(["--await-redis", await_redis] if await_redis else []),
            *(["--spin-us", str(spin_us)] if spin_us else []),
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=BENCH_DIR.parent,
        process_group=0,
    )
    floor = Floor(mode, port, popen, log)
    deadline = time.monotonic() + 20
    while b"ready" not in (workdir / f"{name}.log").read_bytes():
        if popen.poll() is not None or time.monotonic() > deadline:
            floor.stop()
            tail = (workdir / f"{name}.log").read_text(errors="replace")[-3000:]
            raise BenchError(f"the {mode} floor did not start:\n{tail}")
        time.sleep(0.05)
    try:
        if mode == "grpc":
            # /_stepup/* goes to a port nobody listens on: the bench sends nothing there.
            floor.envoy = start_envoy(
                name.replace("-", "_"),
                ENVOY_DIR / "authz_grpc.yaml",
                workdir,
                envoy_bin,
                authz_grpc_port=port,
                authz_http_port=free_ports(1)[0],
            )
        else:
            floor.envoy = start_envoy(
                "floor_http",
                ENVOY_DIR / "authz_http.yaml",
                workdir,
                envoy_bin,
                authz_check_port=port,
            )
    except BaseException:
        floor.stop()
        raise
    return floor


def bench_stack(
    workdir: Path, policy_file: Path, log_level: str, *, http_authz: bool = False, workers: int = 1
) -> BenchStack:
    return BenchStack(workdir, policy_file, log_level, http_authz=http_authz, workers=workers)


def worker_pids(supervisor: int) -> list[int]:
    """The worker processes of ``serve --workers N`` (the supervisor's children)."""
    return _children(supervisor)


def stack_pids(stack: Stack) -> dict[str, int]:
    """PIDs of the stack's Envoy, service, Valkey and audit exporter."""
    pids: dict[str, int] = {}
    if stack.service_proc is not None:
        pids["service"] = stack.service_proc.pid
    envoy = find_pid("envoy", str(stack.workdir / "envoy.yaml"))
    # Valkey rewrites its process title to "valkey-server 127.0.0.1:PORT".
    redis = find_pid("valkey-server", f"{HOST}:{stack.redis_port}") or find_pid(
        "valkey-server", "--port", str(stack.redis_port)
    )
    if envoy is None or redis is None:
        raise BenchError(f"could not find the stack's processes (envoy={envoy}, redis={redis})")
    pids["envoy"], pids["redis"] = envoy, redis
    exporter = stack.exporter_proc  # the audit exporter: its CPU is part of auditing's cost
    if exporter is not None:
        pids["exporter"] = exporter.pid
    return pids


__all__ = ["AUDIENCE", "BenchError", "Envoy", "Stack"]  # re-exported for bench.run
