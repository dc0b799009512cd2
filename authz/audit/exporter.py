"""The exporter: Redis Stream -> archive, in order, exactly once, restart-safe, trusting
nothing it cannot verify.

Every entry's MAC is checked (authz/audit/mac.py) and its producer's sequence number
accounted for (authz/audit/producers.py). What does not verify is archived as
``audit.quarantined`` (the entry as text, marked, never as the record it claims to be); a
missing sequence number becomes an ``audit.gap`` record; each is counted
(``audit_quarantined_total``, ``audit_missing_records_total``) for the alerts. Deletions
are found by those gaps, not by stream ids, which ``XSETID`` can rewrite.

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
from authz.audit.events import ARCHIVE_FIELDS, EventType, canonical_bytes, decode_record
from authz.audit.mac import F_PRODUCER, F_RECORD, F_SEQ, EntryRefused, MacKeyRing, verify_entry
from authz.audit.mapping import quarantined
from authz.audit.metrics import AuditMetrics
from authz.audit.producers import ProducerTracker, Verdict
from authz.errors import ConfigError

log = logging.getLogger("authz.audit.exporter")

MALFORMED = str(EventType.MALFORMED)
HEAD_STREAM_SUFFIX = ":head"  # <stream_key>:head: the signed heads, newest last
HEAD_STREAM_MAXLEN = 1000


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
    """The record an entry claims to hold, unverified (``audit tail`` shows the stream as
    it is). An entry that is not a valid record shows as ``audit.malformed``."""
    raw = fields.get(F_RECORD)
    if raw is not None:
        doc = _parse_record(raw)
        if doc is not None:
            return doc
    return {"v": 1, "type": MALFORMED, "raw": _raw_text(fields), "ts_ms": _id_ms(stream_id)}


def _parse_record(raw: bytes) -> dict[str, Any] | None:
    try:
        doc = decode_record(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if _ok_record(doc) else None


def _raw_text(fields: Mapping[bytes, bytes]) -> str:
    return repr({k.decode("latin-1"): v.decode("latin-1") for k, v in fields.items()})[:4096]


def _claimed(fields: Mapping[bytes, bytes]) -> tuple[str | None, int | None]:
    """The producer and sequence number an unverified entry claims (for the record)."""
    p, n = fields.get(F_PRODUCER), fields.get(F_SEQ)
    pid = p.decode("latin-1")[:128] if p is not None else None
    seq = int(n) if n is not None and n.isdigit() and len(n) < 16 else None
    return pid, seq


class Exporter:
    def __init__(
        self,
        client: redis.Redis,
        writer: ArchiveWriter,
        *,
        stream_key: str,
        ring: MacKeyRing,
        batch_size: int = 500,
        trim: bool = True,
        metrics: AuditMetrics | None = None,
        clock: Any = time.time,
        reorder_window_s: float = 10.0,
        producer_silent_s: float = 300.0,
        producer_forget_s: float = 7 * 86_400.0,
    ) -> None:
        self.client = client
        self.writer = writer
        self.stream_key = stream_key
        self.head_key = stream_key + HEAD_STREAM_SUFFIX
        self.ring = ring
        self.batch_size = batch_size
        self.trim = trim
        self.metrics = metrics
        self.clock = clock
        self._window_ms = int(reorder_window_s * 1000)
        self._silent_ms = int(producer_silent_s * 1000)
        self._forget_ms = int(producer_forget_s * 1000)
        self.tracker = ProducerTracker.restore(
            None,
            reorder_window_ms=self._window_ms,
            silent_after_ms=self._silent_ms,
            forget_after_ms=self._forget_ms,
        )
        self.last_id = "0-0"
        self.duplicates = 0
        self._gap_checked = True  # until start()
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()

    def start(self) -> ResumePoint:
        rp = self.writer.open()
        self.last_id = rp.stream_id
        for eid in rp.recent_ids:
            self._remember(eid)
        # The producers' account: the newest checkpoint's, plus what was archived after it.
        self.tracker = ProducerTracker.restore(
            rp.producers,
            reorder_window_ms=self._window_ms,
            silent_after_ms=self._silent_ms,
            forget_after_ms=self._forget_ms,
        )
        for line in rp.replay:
            sid = line.get("stream_id")
            self.tracker.replay(line, _id_ms(sid) if isinstance(sid, str) else 0)
        self.writer.state = self.tracker.snapshot
        self.writer.on_checkpoint = self.publish_head
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
        """Log what the stream's own bookkeeping says about deleted entries. Not relied on
        (``XSETID ... MAXDELETEDID`` rewrites it): the producers' sequence numbers are."""
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

    def publish_head(self, cp: Mapping[str, Any]) -> None:
        """A new signed head, outside the archive: one log line (stdout, for the log
        collectors) and the stream ``<stream_key>:head``. Best effort: the next checkpoint
        publishes again; ``head_file`` is the writer's."""
        text = canonical_bytes(cp).decode("ascii")
        log.info("audit head", extra={"head": text, "seq": cp.get("seq")})
        try:
            self.client.xadd(
                self.head_key,
                {b"cp": text.encode("ascii")},
                maxlen=HEAD_STREAM_MAXLEN,
                approximate=True,
            )
        except redis.RedisError as exc:
            log.warning("audit head not published to the stream", extra={"error": str(exc)})

    def judge(self, sid: str, fields: Mapping[bytes, bytes], now_ms: int) -> dict[str, Any] | None:
        """The archive record for one stream entry: the verified record (with its producer
        and sequence number), or an ``audit.quarantined`` record; None for a duplicate."""
        try:
            entry = verify_entry(self.ring, self.stream_key, fields)
        except EntryRefused as refused:
            return self._quarantine(sid, fields, refused.reason)
        rec = _parse_record(entry.record)
        eid = rec.get("event_id") if rec is not None else None
        recent = isinstance(eid, str) and eid in self._recent
        verdict, reason = self.tracker.observe(
            entry.producer, entry.seq, rec, now_ms, recent=recent
        )
        if verdict is Verdict.DUPLICATE:
            self.duplicates += 1
            if self.metrics is not None:
                self.metrics.duplicates.inc()
            log.warning("duplicate audit record skipped", extra={"event_id": eid, "stream_id": sid})
            return None
        if verdict is Verdict.QUARANTINE:
            return self._quarantine(sid, fields, reason)
        if rec is None:  # authenticated, counted in its sequence, but not a valid record
            return self._quarantine(sid, fields, "malformed-record")
        if isinstance(eid, str):
            self._remember(eid)
        rec["producer"], rec["producer_seq"] = entry.producer, entry.seq
        return rec

    def _quarantine(self, sid: str, fields: Mapping[bytes, bytes], reason: str) -> dict[str, Any]:
        pid, seq = _claimed(fields)
        if self.metrics is not None:
            self.metrics.quarantined.labels(reason=reason).inc()
        log.error(
            "audit stream entry quarantined",
            extra={"stream_id": sid, "reason": reason, "claimed_producer": pid},
        )
        return quarantined(
            reason=reason,
            raw=_raw_text(fields),
            claimed_producer=pid,
            claimed_seq=seq,
            ts_ms=_id_ms(sid),
        ).to_record()

    def _due(self, now_ms: int) -> list[dict[str, Any]]:
        out = []
        for event in self.tracker.due(now_ms):
            rec = event.to_record()
            if self.metrics is not None:
                if rec["type"] == EventType.SEQUENCE_GAP:
                    self.metrics.missing.inc(int(rec["missing"] or 0))
                else:
                    self.metrics.silent.inc()
            log.error(
                "audit records unaccounted for",
                extra={k: rec.get(k) for k in ("type", "of_producer", "first_missing", "missing")},
            )
            out.append(rec)
        return out

    def poll(self, block_ms: int | None = None) -> int:
        """Archive the next batch (waiting up to ``block_ms`` for one); returns how many
        stream entries it read (duplicates included: ``batch_size`` means "maybe more")."""
        resp: Any = self.client.xread(
            {self.stream_key: self.last_id}, count=self.batch_size, block=block_ms
        )
        entries: list[tuple[str, dict[str, Any]]] = []
        last = self.last_id
        read = 0
        now_ms = int(self.clock() * 1000)
        for _key, items in resp or ():
            read += len(items)
            for sid_raw, fields in items:
                sid = sid_raw.decode() if isinstance(sid_raw, bytes) else str(sid_raw)
                last = sid
                rec = self.judge(sid, fields, now_ms)
                if rec is not None:
                    entries.append((sid, rec))
        # The exporter's own findings, at the stream position they were made at.
        entries.extend((last, rec) for rec in self._due(now_ms))
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
    if settings.username is not None:
        if parts.username and parts.username != settings.username:
            raise ConfigError("redis_url names another user than username", location="username")
        kwargs["username"] = settings.username
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
    try:
        key = SigningKey.from_pem_file(settings.signing_key_file)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"{settings.signing_key_file}: {_why(exc)}", location="signing_key_file"
        ) from exc
    ring = MacKeyRing.from_files(settings.mac_keys, None, location="mac_keys", verifier=True)
    writer = ArchiveWriter(
        settings.archive_dir,
        key,
        max_bytes=settings.segment_max_bytes,
        max_age_s=settings.segment_max_age_s,
        checkpoint_every=settings.checkpoint_every,
        checkpoint_interval_s=settings.checkpoint_interval_s,
        metrics=metrics,
        head_file=settings.head_file,
    )
    client = make_exporter_client(settings)
    return Exporter(
        client,
        writer,
        stream_key=settings.stream_key,
        ring=ring,
        batch_size=settings.batch_size,
        trim=settings.trim,
        metrics=metrics,
        reorder_window_s=settings.reorder_window_s,
        producer_silent_s=settings.producer_silent_s,
        producer_forget_s=settings.producer_forget_s,
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
