"""The exporter: Redis Stream -> archive, in order, exactly once, restart-safe.

Progress lives in the archive, not beside it: every archived record carries its stream id,
so after any crash ``ArchiveWriter.open`` yields the last id that is on disk (fsync'ed) and
the exporter reads ``XREAD STREAMS key <that id>`` (strictly after it). The stream is
trimmed (``XTRIM MINID ~``) only up to an id that is already fsync'ed, so nothing that is
not yet archived ever leaves Redis. Producers may write a record twice (a retried XADD whose
first reply was lost): records whose ``event_id`` was archived recently are skipped.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import ssl
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from prometheus_client import CollectorRegistry, start_http_server

from authz.audit.archive import ArchiveWriter, ResumePoint
from authz.audit.chain import SigningKey
from authz.audit.config import ExporterSettings
from authz.audit.events import ARCHIVE_FIELDS, decode_record
from authz.audit.metrics import AuditMetrics
from authz.audit.sinks import STREAM_FIELD
from authz.errors import ConfigError

log = logging.getLogger("authz.audit.exporter")

MALFORMED = "audit.malformed"  # the type given to a stream entry that is not a valid record


def _id_ms(stream_id: str) -> int:
    return int(stream_id.split("-", 1)[0])


_SCALAR_TYPES = frozenset({str, int, bool, type(None)})  # what json.loads gives for scalars


def _ok_record(doc: Mapping[str, Any]) -> bool:
    return (
        isinstance(doc.get("type"), str)
        and not (ARCHIVE_FIELDS & doc.keys())
        and {type(v) for v in doc.values()} <= _SCALAR_TYPES
    )


def entry_record(stream_id: str, fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """The event record of one stream entry. An entry that is not a valid record is still
    archived (as ``audit.malformed`` with its raw text), never skipped."""
    raw = fields.get(STREAM_FIELD)
    if raw is not None:
        try:
            doc = decode_record(raw)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if doc is not None and _ok_record(doc):
            return doc
    text = repr({k.decode("latin-1"): v.decode("latin-1") for k, v in fields.items()})
    return {"v": 1, "type": MALFORMED, "raw": text[:4096], "ts_ms": _id_ms(stream_id)}


class Exporter:
    def __init__(
        self,
        client: redis.Redis,
        writer: ArchiveWriter,
        *,
        stream_key: str,
        batch_size: int = 500,
        trim: bool = True,
        metrics: AuditMetrics | None = None,
        clock: Any = time.time,
    ) -> None:
        self.client = client
        self.writer = writer
        self.stream_key = stream_key
        self.batch_size = batch_size
        self.trim = trim
        self.metrics = metrics
        self.clock = clock
        self.last_id = "0-0"
        self.duplicates = 0
        self._gap_checked = True  # until start()
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()

    def start(self) -> ResumePoint:
        rp = self.writer.open()
        self.last_id = rp.stream_id
        for eid in rp.recent_ids:
            self._remember(eid)
        self._gap_checked = False
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            self.check_stream_gap_once()  # Redis down now: the run loop asks again
        return rp

    def check_stream_gap_once(self) -> None:
        """The gap check of ``start``, once per start, when Redis first answers."""
        if not self._gap_checked:
            self._check_stream_gap()
            self._gap_checked = True

    def close(self) -> None:
        self.writer.close(seal=True)

    def _remember(self, event_id: str) -> None:
        self._recent[event_id] = None
        if len(self._recent) > 65_536:
            self._recent.popitem(last=False)

    def _check_stream_gap(self) -> None:
        """Loudly report records deleted from the stream before they were archived."""
        try:
            info = self.client.xinfo_stream(self.stream_key)
        except redis.ResponseError:  # no stream yet
            return
        deleted = info.get("max-deleted-entry-id")
        if isinstance(deleted, bytes):
            deleted = deleted.decode()
        if isinstance(deleted, str) and deleted != "0-0" and _cmp(deleted, self.last_id) > 0:
            log.error(
                "records were removed from the audit stream before they were archived",
                extra={"max_deleted": deleted, "last_archived": self.last_id},
            )

    def poll(self, block_ms: int | None = None) -> int:
        """Archive the next batch (waiting up to ``block_ms`` for one); returns how many
        stream entries it read (duplicates included: ``batch_size`` means "maybe more")."""
        resp: Any = self.client.xread(
            {self.stream_key: self.last_id}, count=self.batch_size, block=block_ms
        )
        entries: list[tuple[str, dict[str, Any]]] = []
        last = self.last_id
        read = 0
        for _key, items in resp or ():
            read += len(items)
            for sid_raw, fields in items:
                sid = sid_raw.decode() if isinstance(sid_raw, bytes) else str(sid_raw)
                last = sid
                rec = entry_record(sid, fields)
                eid = rec.get("event_id")
                if isinstance(eid, str):
                    if eid in self._recent:
                        self.duplicates += 1
                        log.warning(
                            "duplicate audit record skipped",
                            extra={"event_id": eid, "stream_id": sid},
                        )
                        continue
                    self._remember(eid)
                entries.append((sid, rec))
        self.writer.append(entries)  # fsync'ed when this returns
        self.last_id = last
        if last != "0-0" and self.trim and (entries or resp):
            # Only what is on disk: MINID keeps `last` itself and everything after it.
            self.client.xtrim(self.stream_key, minid=last, approximate=True)
        self._update_lag(full=read >= self.batch_size)
        self.writer.checkpoint()
        self.writer.maybe_rotate()
        return read

    def _update_lag(self, *, full: bool) -> None:
        if self.metrics is None:
            return
        lag = 0.0
        if full:
            nxt = self.client.xrange(self.stream_key, min=f"({self.last_id}", max="+", count=1)
            if nxt:
                sid = nxt[0][0]
                sid = sid.decode() if isinstance(sid, bytes) else str(sid)
                lag = max(0.0, self.clock() - _id_ms(sid) / 1000)
        self.metrics.lag.set(lag)

    def run(self, stop: threading.Event, block_ms: int = 1000, linger_ms: int = 0) -> None:
        while not stop.is_set():
            self.linger(self.poll(block_ms=block_ms), stop, linger_ms)

    def linger(self, read: int, stop: threading.Event, linger_ms: int) -> None:
        """After a partial batch, let records gather for ``linger_ms`` (a full batch means a
        backlog: read on at once). Returns early on ``stop``."""
        if linger_ms and 0 < read < self.batch_size:
            stop.wait(linger_ms / 1000)


def _cmp(a: str, b: str) -> int:
    ta = tuple(int(x) for x in a.split("-"))
    tb = tuple(int(x) for x in b.split("-"))
    return (ta > tb) - (ta < tb)


def _why(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def make_exporter_client(settings: ExporterSettings) -> redis.Redis:
    """The exporter's (sync) Redis client, with the service's rules (``make_client`` in
    authz/store/connections.py):

    - ``password_file``: the password is read from the file (a mounted Secret), stripped.
      A password in ``redis_url`` as well is refused: one source of truth.
    - ``rediss://``: the server certificate is verified (against ``ca_file`` when set, else
      the system store) and its host name checked. ``ca_file`` is ignored for other schemes,
      as the service ignores ``redis.ca_file``.

    A file that cannot be read (or a CA file that holds no certificate) is a ConfigError
    naming the setting, at start, not a connection error retried forever.
    """
    parts = urlsplit(settings.redis_url)
    # The socket timeout outlasts a blocking XREAD (block_ms) by a margin.
    kwargs: dict[str, Any] = {
        "socket_timeout": settings.block_ms / 1000 + 5,
        "socket_connect_timeout": 5,
    }
    if settings.password_file is not None:
        if parts.password:
            raise ConfigError(
                "a password is set both in redis_url and in password_file", location="password_file"
            )
        try:
            password = settings.password_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{settings.password_file}: {_why(exc)}", location="password_file"
            ) from exc
        if not password:
            raise ConfigError(f"{settings.password_file}: empty password", location="password_file")
        kwargs["password"] = password
    if parts.scheme == "rediss":
        kwargs.update(ssl_cert_reqs="required", ssl_check_hostname=True)
        if settings.ca_file is not None:
            if "ssl_ca_certs" in parse_qs(parts.query):
                raise ConfigError(
                    "a CA is set both in redis_url (ssl_ca_certs) and in ca_file",
                    location="ca_file",
                )
            try:  # read it now: redis-py would only at connect, as a retried error
                ssl.create_default_context(cafile=str(settings.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"{settings.ca_file}: {_why(exc)}", location="ca_file") from exc
            kwargs["ssl_ca_certs"] = str(settings.ca_file)
    client: redis.Redis = redis.Redis.from_url(settings.redis_url, **kwargs)
    return client


def build_exporter(
    settings: ExporterSettings, registry: CollectorRegistry | None = None
) -> Exporter:
    metrics = AuditMetrics(registry or CollectorRegistry(auto_describe=True))
    key = SigningKey.from_pem_file(settings.signing_key_file)
    writer = ArchiveWriter(
        settings.archive_dir,
        key,
        max_bytes=settings.segment_max_bytes,
        max_age_s=settings.segment_max_age_s,
        checkpoint_every=settings.checkpoint_every,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        metrics=metrics,
    )
    client = make_exporter_client(settings)
    return Exporter(
        client,
        writer,
        stream_key=settings.stream_key,
        batch_size=settings.batch_size,
        trim=settings.trim,
        metrics=metrics,
    )


def run_exporter(
    settings: ExporterSettings, *, install_signals: bool = True, stop: threading.Event | None = None
) -> int:
    """The exporter process: until SIGTERM/SIGINT; a Redis error is retried with backoff,
    an archive (disk) error ends the process so a supervisor restarts it into recovery."""
    exporter = build_exporter(settings)
    if settings.metrics_port is not None and exporter.metrics is not None:
        start_http_server(
            settings.metrics_port, settings.metrics_host, registry=exporter.metrics.registry
        )
    stop = stop or threading.Event()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    exporter.start()  # the archive only: Redis is first asked inside the retry loop
    backoff = 0.1
    try:
        while not stop.is_set():
            try:
                exporter.check_stream_gap_once()
                read = exporter.poll(block_ms=settings.block_ms)
                backoff = 0.1
                exporter.linger(read, stop, settings.linger_ms)
            except redis.AuthenticationError as exc:
                # Not transient: a supervisor restarts the process, which re-reads the
                # password file (a rotated Secret), and the restarts are visible.
                log.error(
                    "redis refused the exporter's credentials; exiting", extra={"error": str(exc)}
                )
                return 2
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis unavailable; retrying", extra={"error": str(exc)})
                stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
    finally:
        exporter.close()
        exporter.client.close()
    return 0
