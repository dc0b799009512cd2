"""Authenticated stream entries: each producer MACs every record it writes to the stream.

A Redis writer (a compromised pod, an operator with ``redis-cli``) can add, delete and
reorder stream entries. It cannot make an entry the exporter accepts: the MAC key lives in
a Secret mounted into the producers and the exporter, never in Redis. Deletions show as
gaps in a producer's sequence numbers, which stream ids (``XSETID``, ``MAXDELETEDID``)
cannot hide.

One stream entry (fields, in this order)::

    r  the record: its canonical bytes (``events.canonical_bytes``), unchanged
    p  the producer id: [A-Za-z0-9._:-]{1,128}, new for every process start
    n  the producer's sequence number: ASCII decimal, 1, 2, 3, ... never reused
    k  the MAC key id: [A-Za-z0-9_-]{1,32}, selects the key in the ring (rotation)
    m  HMAC-SHA256(key, message), 64 lowercase hex digits

    message = "stepup-audit-v1" LF stream_key LF p LF n LF r

(LF is one 0x0A byte; the stream key and the producer id contain none, ``n`` is digits, so
the message parses one way only.) The record is the last part and is MAC'd as the very
bytes sent, so the Check path MACs the bytes it already built (``mapping.allowed_record``).
The stream key is in the message: an entry copied into another stream does not verify.

A key file (a Kubernetes Secret mount) holds 32 random bytes, raw or base64, as the grant
encryption keys do (``authz.store.crypto.parse_key``): ``stepup-authz audit keygen --mac``.
"""

from __future__ import annotations

import hmac
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from authz.errors import ConfigError

DOMAIN = b"stepup-audit-v1"
MAC_KEY_BYTES = 32
KID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
PRODUCER_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SEQ_RE = re.compile(rb"[1-9][0-9]{0,18}")

# The stream entry's field names (one byte each: they are sent with every record).
F_RECORD, F_PRODUCER, F_SEQ, F_KID, F_MAC = b"r", b"p", b"n", b"k", b"m"


def mac_message(stream_key: str, producer: str, seq: int, record: bytes) -> bytes:
    """The exact bytes the MAC covers (see the module docstring)."""
    return b"\n".join(
        (DOMAIN, stream_key.encode("ascii"), producer.encode("ascii"), b"%d" % seq, record)
    )


def parse_mac_key(data: bytes, *, source: str) -> bytes:
    """A MAC key from a file's content: 32 bytes, raw or base64 (the grant keys' format)."""
    from authz.store.crypto import parse_key  # one key-file format for every key

    return parse_key(data, source=source)


@dataclass(frozen=True)
class MacKeyRing:
    """The MAC keys by key id; new entries are MAC'd under ``active``. Verifiers hold every
    key still in use by a running producer (keep a retired key until its producers are
    gone and the stream is archived)."""

    keys: Mapping[str, bytes]
    active: str

    def __post_init__(self) -> None:
        bad = [k for k in self.keys if not KID_RE.fullmatch(k)]
        if bad:
            raise ConfigError(f"MAC key ids must match {KID_RE.pattern}: {bad}", location="mac")
        if self.active not in self.keys:
            raise ConfigError(f"active MAC key id {self.active!r} is not in the key ring")

    @classmethod
    def from_files(
        cls,
        files: Mapping[str, Path],
        active: str | None,
        *,
        location: str = "mac_keys",
        verifier: bool = False,
    ) -> MacKeyRing:
        """The ring from key files. A producer names its ``active`` key (one key needs no
        name); a ``verifier`` (the exporter) only checks entries and needs none."""
        if not files:
            raise ConfigError("no MAC key configured", location=location)
        keys: dict[str, bytes] = {}
        for kid, path in files.items():
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"{path}: {exc.strerror or exc}", location=location) from exc
            keys[kid] = parse_mac_key(data, source=f"{location}.{kid} ({path})")
        if active is None:
            if len(keys) != 1 and not verifier:
                raise ConfigError("several MAC keys: name the active one", location=location)
            active = sorted(keys)[0]
        return cls(keys, active)

    def mac(self, kid: str, message: bytes) -> str:
        return hmac.digest(self.keys[kid], message, "sha256").hex()


def new_producer_id() -> str:
    """``<host>:<pid>:<8 random hex>``: new for every start, so a restart is a new producer
    (announced), never a gap in an old one's sequence."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:80] or "host"
    return f"{host}:{os.getpid()}:{os.urandom(4).hex()}"


class Producer:
    """Stamps records for one stream: the next sequence number and the MAC.

    ``fields(record)`` returns the XADD field/value list; each call uses the next sequence
    number, so call it exactly once per record and resend the same list on a retry (the
    exporter drops the duplicate). Not thread-safe: the Auditor calls it from its loop."""

    __slots__ = ("_key", "_kid", "_prefix", "first_seq", "id", "ring", "seq", "stream_key")

    def __init__(
        self,
        ring: MacKeyRing,
        stream_key: str,
        *,
        producer_id: str | None = None,
        first_seq: int = 1,
    ) -> None:
        pid = producer_id or new_producer_id()
        if not PRODUCER_RE.fullmatch(pid):
            raise ValueError(f"producer id must match {PRODUCER_RE.pattern}: {pid!r}")
        if "\n" in stream_key or not stream_key.isascii():
            raise ValueError("the stream key must be ASCII without a newline")
        if first_seq < 1:
            raise ValueError("sequence numbers start at 1 or later")
        self.ring, self.stream_key, self.id = ring, stream_key, pid
        self.first_seq = first_seq
        self.seq = first_seq - 1  # the last number used
        self._kid = ring.active
        self._key = ring.keys[ring.active]
        self._prefix = b"\n".join((DOMAIN, stream_key.encode("ascii"), pid.encode("ascii"), b""))

    @property
    def kid(self) -> str:
        return self._kid

    def fields(self, record: bytes) -> tuple[bytes, ...]:
        self.seq = seq = self.seq + 1
        n = b"%d" % seq
        mac = hmac.digest(self._key, self._prefix + n + b"\n" + record, "sha256").hex()
        return (
            F_RECORD,
            record,
            F_PRODUCER,
            self.id.encode("ascii"),
            F_SEQ,
            n,
            F_KID,
            self._kid.encode("ascii"),
            F_MAC,
            mac.encode("ascii"),
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """A stream entry whose MAC verified."""

    producer: str
    seq: int
    kid: str
    record: bytes


class EntryRefused(Exception):
    """A stream entry that does not verify; ``reason`` is the quarantine slug."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


def verify_entry(ring: MacKeyRing, stream_key: str, fields: Mapping[bytes, bytes]) -> Entry:
    """The entry's producer, sequence number and record, or ``EntryRefused`` with one of
    ``mac-missing``, ``malformed-entry``, ``unknown-key``, ``mac-invalid``."""
    mac = fields.get(F_MAC)
    if mac is None:
        raise EntryRefused("mac-missing", "the entry carries no MAC")
    record, producer, n, kid = (fields.get(f) for f in (F_RECORD, F_PRODUCER, F_SEQ, F_KID))
    if record is None or producer is None or n is None or kid is None:
        raise EntryRefused("malformed-entry", "a MAC without its record, producer, seq or kid")
    if len(fields) != 5:
        raise EntryRefused("malformed-entry", "fields beyond r, p, n, k, m")
    try:
        pid, kid_s = producer.decode("ascii"), kid.decode("ascii")
    except UnicodeDecodeError:
        raise EntryRefused("malformed-entry", "non-ASCII producer or key id") from None
    if not PRODUCER_RE.fullmatch(pid) or not _SEQ_RE.fullmatch(n):
        raise EntryRefused("malformed-entry", "bad producer id or sequence number")
    key = ring.keys.get(kid_s)
    if key is None:
        raise EntryRefused("unknown-key", f"MAC key id {kid_s!r} is not in the key ring")
    seq = int(n)
    want = hmac.digest(key, mac_message(stream_key, pid, seq, record), "sha256").hex()
    if not hmac.compare_digest(want.encode("ascii"), mac):
        raise EntryRefused("mac-invalid", "the MAC does not match the entry")
    return Entry(pid, seq, kid_s, record)
