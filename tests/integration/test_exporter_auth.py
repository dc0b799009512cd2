"""The audit exporter against a password-protected server, the password given only as a
file (ExporterSettings.password_file), and over rediss:// with a private CA (ca_file).

Servers, as elsewhere in tests/integration: a private embedded Valkey made to require a
password (CONFIG SET requirepass, as tests/integration/test_sessions.py does), and a
TLS-only redis-server child process started with --requirepass (as the tls_redis fixture
of tests/integration/test_encryption.py starts one, Debian's build has TLS)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry

from authz.audit.chain import SigningKey
from authz.audit.config import load_exporter_settings
from authz.audit.exporter import Exporter, build_exporter, run_exporter
from authz.audit.mac import MacKeyRing
from authz.audit.segments import list_segments
from authz.audit.testing import StreamWriter, sample_event
from authz.audit.verify import verify
from authz.store.connections import EmbeddedValkey
from tests.builders import wait_until
from tests.tlsutil import tls_redis_server

pytestmark = pytest.mark.integration

KEY = SigningKey.generate()
KEYS = {KEY.key_id: KEY.private_key.public_key()}
PASSWORD = "p@ss:w/rd#1?"  # what a URL would have to quote: never in one here
STREAM = "stepup:audit"
MAC_KEY = os.urandom(32)
RING = MacKeyRing({"t": MAC_KEY}, "t")


def write_config(tmp_path: Path, redis_url: str, **extra: Any) -> Path:
    """exporter.yaml beside its files, with relative paths (resolved against its folder)."""
    (tmp_path / "signing.pem").write_bytes(KEY.private_pem())
    (tmp_path / "redis-password").write_text(PASSWORD + "\n")  # stripped on read
    (tmp_path / "mac.key").write_bytes(MAC_KEY)  # raw bytes: one of the two key formats
    cfg = tmp_path / "exporter.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "redis_url": redis_url,
                "stream_key": STREAM,
                "archive_dir": "archive",
                "signing_key_file": "signing.pem",
                "password_file": "redis-password",
                "mac_keys": {"t": "mac.key"},
                "batch_size": 50,
                "block_ms": 100,
                "linger_ms": 0,
                **extra,
            }
        )
    )
    return cfg


def produce(client: redis.Redis, n: int) -> list[str]:
    """A new producer's announcement and ``n`` records, MAC'd; their event ids."""
    w = StreamWriter(RING, STREAM)
    hello = w.hello()
    ids = [json.loads(hello[b"r"])["event_id"]]
    pipe = client.pipeline(transaction=False)
    pipe.xadd(STREAM, hello)  # type: ignore[arg-type]
    for i in range(n):
        ev = sample_event(i)
        ids.append(ev.event_id)
        pipe.xadd(STREAM, w.fields(ev))  # type: ignore[arg-type]
    pipe.execute()
    return ids


def drain(ex: Exporter) -> None:
    for _ in range(1000):
        if ex.poll(block_ms=None) == 0:
            return
    raise AssertionError("the exporter did not catch up")


def archived_ids(archive: Path) -> list[str]:
    out = []
    for seg in list_segments([archive]):
        for line in seg.read_text().splitlines():
            doc = json.loads(line)
            if doc.get("kind") == "event":
                out.append(doc["event_id"])
    return out


def export_all(cfg: Path, **overrides: Any) -> Exporter:
    """build_exporter from the settings file (as `audit exporter --config` does), archive
    everything in the stream, seal; the caller closes the client."""
    settings = load_exporter_settings(cfg)
    if overrides:
        settings = settings.model_copy(update=overrides)
    ex = build_exporter(settings, CollectorRegistry())
    try:
        ex.start()
        drain(ex)
    except BaseException:
        ex.writer.close(seal=False)
        ex.client.close()
        raise
    ex.close()
    return ex


# -- a password-protected Valkey ---------------------------------------------------------------


@pytest.fixture
def protected(embedded_valkey: EmbeddedValkey) -> Iterator[redis.Redis]:
    """The private Valkey, now requiring PASSWORD; yields a client that has it."""
    admin = redis.Redis.from_url(embedded_valkey.url)
    try:
        admin.config_set("requirepass", PASSWORD)
    finally:
        admin.close()
    client = redis.Redis.from_url(embedded_valkey.url, password=PASSWORD)
    yield client
    client.close()


def test_the_exporter_authenticates_with_the_password_file(
    embedded_valkey: EmbeddedValkey, protected: redis.Redis, tmp_path: Path
) -> None:
    ids = produce(protected, 120)
    cfg = write_config(tmp_path, embedded_valkey.url)
    ex = export_all(cfg)
    try:
        assert ex.client.connection_pool.connection_kwargs["password"] == PASSWORD
    finally:
        ex.client.close()
    r = verify([tmp_path / "archive"], public_keys=KEYS)
    assert r.ok and r.records == 121, r.error  # the announcement, then the 120
    assert archived_ids(tmp_path / "archive") == ids


def test_the_server_refuses_the_exporter_without_the_right_password(
    embedded_valkey: EmbeddedValkey, protected: redis.Redis, tmp_path: Path
) -> None:
    """The control: the server really requires the password the file gives."""
    produce(protected, 3)
    cfg = write_config(tmp_path, embedded_valkey.url)
    with pytest.raises(redis.AuthenticationError):
        export_all(cfg, password_file=None)
    (tmp_path / "wrong").write_text("not-the-password\n")
    with pytest.raises(redis.AuthenticationError):
        export_all(cfg, password_file=tmp_path / "wrong")
    assert protected.xlen(STREAM) == 4  # nothing was archived, nothing trimmed


def test_a_refused_password_ends_the_exporter_process_non_zero(
    embedded_valkey: EmbeddedValkey, protected: redis.Redis, tmp_path: Path
) -> None:
    """Not retried forever as "unavailable": the process exits (2) so its supervisor
    restarts it, re-reading the password file, and the restarts show."""
    (tmp_path / "wrong").write_text("not-the-password\n")
    cfg = write_config(tmp_path, embedded_valkey.url, password_file="wrong")
    before = _wrongpass(protected)
    assert run_exporter(load_exporter_settings(cfg), install_signals=False) == 2
    # It gave up on the first refusal (one AUTH per connection redis-py tried), where a
    # retry loop would have kept knocking with the same wrong password.
    assert 1 <= _wrongpass(protected) - before <= 4


def test_redis_down_at_start_is_retried_not_a_crash(tmp_path: Path) -> None:
    """The exporter starts while its Redis is unreachable, keeps retrying, and stops
    cleanly on request (the gap check waits for the first answer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = write_config(tmp_path, f"redis://127.0.0.1:{port}/0", password_file=None)
    result: list[int] = []
    done = threading.Event()

    def run() -> None:
        result.append(run_exporter(load_exporter_settings(cfg), install_signals=False, stop=done))

    retries = _Retries()
    logging.getLogger("authz.audit.exporter").addHandler(retries)
    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert retries.seen.wait(10), "no retry logged"  # the third "redis unavailable"
        assert worker.is_alive()  # retrying, not crashed
    finally:
        logging.getLogger("authz.audit.exporter").removeHandler(retries)
        done.set()
    worker.join(10)
    assert result == [0]


def _wrongpass(client: redis.Redis) -> int:
    """WRONGPASS replies the server has sent so far (INFO errorstats)."""
    stats = client.info("errorstats")
    return int(stats.get("errorstat_WRONGPASS", {}).get("count", 0))


class _Retries(logging.Handler):
    """Sets ``seen`` once the exporter has logged "redis unavailable; retrying" three times."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("redis unavailable"):
            self.count += 1
            if self.count >= 3:
                self.seen.set()


def _count_events(archive: Path) -> int:
    if not archive.exists():
        return 0
    return sum(seg.read_bytes().count(b'"kind":"event"') for seg in list_segments([archive]))


def test_the_exporter_process_authenticates_with_the_password_file(
    embedded_valkey: EmbeddedValkey, protected: redis.Redis, tmp_path: Path
) -> None:
    """`stepup-authz audit exporter --config` (run_exporter), as the chart runs it."""
    ids = produce(protected, 200)
    cfg = write_config(tmp_path, embedded_valkey.url)
    archive = tmp_path / "archive"
    with (tmp_path / "exporter.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "authz.audit", "exporter", "--config", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:

        def archived() -> bool:  # a real process writing files
            assert proc.poll() is None, (tmp_path / "exporter.log").read_text()
            return _count_events(archive) >= len(ids)  # the announcement and the 200

        wait_until(archived, "every record archived", timeout_s=30)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    log_text = (tmp_path / "exporter.log").read_text()
    assert proc.returncode == 0, log_text
    assert "redis unavailable" not in log_text  # never refused (NOAUTH/WRONGPASS retries)
    r = verify([archive], public_keys=KEYS)
    assert r.ok and r.records == 201 and r.unsigned_tail == 0, r.error
    assert archived_ids(archive) == ids


# -- rediss:// with a private CA and --requirepass --------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """A TLS-only redis-server child on loopback with --requirepass: (port, the CA that
    signed its certificate (for 127.0.0.1 and redis.test), an unrelated CA)."""
    with tls_redis_server(tmp_path / "tls-redis", password=PASSWORD) as srv:
        yield srv.port, srv.ca, srv.other_ca


def test_rediss_with_ca_file_and_password_file(
    tls_redis: tuple[int, Path, Path], tmp_path: Path
) -> None:
    port, ca, _ = tls_redis
    producer = redis.Redis.from_url(
        f"rediss://127.0.0.1:{port}", password=PASSWORD, ssl_ca_certs=str(ca)
    )
    try:
        ids = produce(producer, 60)
        cfg = write_config(tmp_path, f"rediss://127.0.0.1:{port}/0", ca_file=str(ca))
        ex = export_all(cfg)
        ex.client.close()
        r = verify([tmp_path / "archive"], public_keys=KEYS)
        assert r.ok and r.records == 61, r.error
        assert archived_ids(tmp_path / "archive") == ids
    finally:
        producer.close()


def test_rediss_refuses_a_server_the_ca_file_does_not_vouch_for(
    tls_redis: tuple[int, Path, Path], tmp_path: Path
) -> None:
    port, ca, other = tls_redis
    cfg = write_config(tmp_path, f"rediss://127.0.0.1:{port}/0", ca_file=str(other))
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate verify failed"):
        export_all(cfg)
    # The right CA, but the certificate names redis.test and 127.0.0.1, not localhost.
    cfg = write_config(tmp_path, f"rediss://localhost:{port}/0", ca_file=str(ca))
    with pytest.raises(redis.ConnectionError, match=r"(?i)mismatch|not valid for"):
        export_all(cfg)
