"""``stepup-authz serve --workers N``: N service processes sharing one set of ports.

One Python process runs one event loop on one core; a host with several cores runs several.
Every worker is an ordinary ``serve`` (same settings file) that binds the gRPC, HTTP and
HTTP ext_authz ports with SO_REUSEPORT (grpc's ``grpc.so_reuseport``, aiohttp's and the
HTTP ext_authz listener's ``reuse_port=True``): the kernel spreads new connections over
the workers. Envoy holds a few long-lived HTTP/2 connections per cluster, so the spread is
per connection, not per request; Envoy opens one connection per worker thread (and more
under load), which is enough to use every worker.

The supervisor (this module) does no request work:

- With no ``REDIS_URL`` (embedded Valkey) it starts the embedded server once and hands its
  URL to every worker (``REDIS_URL``), so they share one state.
- Keys: every worker reads the same settings file, so configured keys (``crypto.keys``,
  ``stepup.context_key_file``, the audit MAC keys) are the same files in each. Where the
  settings configure none (development), the supervisor makes one key of each kind and
  hands it to every worker (``shared_keys_env``): a step-up link signed by one worker
  verifies on another, and a grant one wrote, another decrypts.
- Prometheus: it points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory (unless already
  set) so each worker's counters and histograms live in shared files and ``/metrics`` on
  any worker reports the sum over all of them (``prometheus_client`` multiprocess mode; the
  ``policy_info`` Info metric and gauges are per worker, see docs/performance.md).
- SIGTERM / SIGINT are forwarded to every worker (each drains its in-flight Checks, as a
  single process does); SIGHUP too (each reloads the policy). When any worker exits on its
  own, the others are stopped and the supervisor exits non-zero: the orchestrator restarts
  the pod rather than running on with fewer workers than configured.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from authz.config.settings import Settings
from authz.errors import ConfigError
from authz.store.crypto import ephemeral_key_env

log = logging.getLogger("authz.ops.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_STOP_GRACE_S = 30.0  # above the workers' own drain (shutdown_delay_s + shutdown_grace_s)
_POLL_S = 0.1


def _check_ports(settings: Settings) -> None:
    """Port 0 would give every worker a different port: refuse it up front."""
    ports = {"grpc.port": settings.grpc.port, "http.port": settings.http.port}
    if settings.http_authz.enabled:
        ports["http_authz.port"] = settings.http_authz.port
    zero = [name for name, port in ports.items() if port == 0]
    if zero:
        raise ConfigError(
            "--workers needs fixed ports (0 would differ per worker)", location=", ".join(zero)
        )


CONTEXT_KEY_ENV = "STEPUP_CONTEXT_KEY_FILE"


def shared_keys_env(settings: Settings, directory: Path) -> dict[str, str]:
    """Environment entries giving every worker one key for what the settings leave to a
    per-process random key: the field encryption key and the step-up link key (written to
    ``directory``, readable by this user only). Empty when both are configured."""
    env: dict[str, str] = {}
    if settings.crypto.active_kid is None:
        env.update(ephemeral_key_env())
    if settings.stepup.context_key_file is None:
        path = directory / "stepup-context.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            # Text, as docs/operations.md has operators make it: the file is read with
            # surrounding whitespace stripped, which would shorten raw random bytes
            # (below the 32 the signers need whenever one ended in a newline or space).
            f.write(base64.b64encode(os.urandom(48)) + b"\n")
        env[CONTEXT_KEY_ENV] = str(path)
    if env:
        log.warning(
            "keys not configured: one random key per supervisor, shared by its workers "
            "(gone at exit; several pods need keys from a Secret)",
            extra={"shared": sorted(env)},
        )
    return env


def worker_argv(config: Path) -> list[str]:
    return [sys.executable, "-m", "authz.cli", "serve", "--config", str(config)]


def supervise(config: Path, settings: Settings, workers: int) -> int:
    """Run ``workers`` service processes until SIGTERM/SIGINT or until one of them exits."""
    if workers < 2:
        raise ValueError("supervise() is for two or more workers")
    _check_ports(settings)
    env = dict(os.environ)
    owned_dir: str | None = None
    if not env.get(MULTIPROC_ENV):
        owned_dir = tempfile.mkdtemp(prefix="stepup-metrics-")
        env[MULTIPROC_ENV] = owned_dir
    keys_dir = tempfile.mkdtemp(prefix="stepup-keys-")  # mode 0700
    env.update(shared_keys_env(settings, Path(keys_dir)))
    embedded = None
    if settings.redis.embedded:
        from authz.store.connections import EmbeddedValkey

        embedded = EmbeddedValkey()
        env["REDIS_URL"] = embedded.start()
        log.info(
            "no REDIS_URL: started one embedded Valkey for all workers",
            extra={"url": env["REDIS_URL"]},
        )
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            sig = signal.SIGTERM
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    previous = {
        s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    code = 0
    try:
        for _ in range(workers):
            procs.append(subprocess.Popen(worker_argv(config), env=env))
        log.info("workers started", extra={"workers": workers, "pids": [p.pid for p in procs]})
        while True:
            exited = [p for p in procs if p.poll() is not None]
            if len(exited) == len(procs):
                break
            if exited and not stopping:
                died = exited[0]
                log.error(
                    "a worker exited; stopping the others",
                    extra={"pid": died.pid, "returncode": died.returncode},
                )
                code = died.returncode or 1
                forward(signal.SIGTERM, None)
            time.sleep(_POLL_S)
    finally:
        _stop_all(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if embedded is not None:
            embedded.stop()
        if owned_dir is not None:
            shutil.rmtree(owned_dir, ignore_errors=True)
        shutil.rmtree(keys_dir, ignore_errors=True)
    if code == 0:
        code = max((abs(p.returncode or 0) for p in procs), default=0)
        # A worker stopped by our own SIGTERM exits 0 after draining; anything else counts.
    return code


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("a worker did not stop in time; killing it", extra={"pid": p.pid})
            p.kill()
            p.wait()
