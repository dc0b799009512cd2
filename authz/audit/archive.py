"""The archive writer: hash-chained, signed JSON Lines segments, fsync'ed, append-only.

Crash-only design: every batch is written then ``fsync``'ed before the stream is trimmed,
and the archive itself is the record of progress (each line carries its Redis stream id).
``open()`` recovers from any crash point:

- a torn last line (a write cut short; or a zero-filled tail after a power loss) is copied
  to ``torn/<segment>.<ms>.torn``, then cut off the segment; the records it held are still
  in the stream (it was never trimmed past them) and are written again, once;
- complete lines that were written but not acknowledged anywhere are simply kept: the
  exporter resumes after the last archived stream id, so nothing is written twice;
- a crash between sealing a segment and starting the next leaves a read-only sealed
  segment; the next record starts a new one.

One writer per archive: an exclusive ``flock`` on ``<archive>/.lock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authz.audit.chain import GENESIS, SigningKey, chain_line, record_hash
from authz.audit.events import canonical_bytes
from authz.audit.metrics import AuditMetrics
from authz.audit.segments import fsync_dir, list_segments, segment_created, segment_name
from authz.errors import StepupError

log = logging.getLogger("authz.audit.archive")

HEAD_FILE = "HEAD.json"
RECENT_IDS = 65_536  # event ids remembered to drop producer-side duplicates (retried XADDs)


class ArchiveError(StepupError):
    code = "audit-archive-error"


@dataclass
class ResumePoint:
    seq: int = 0
    hash: str = GENESIS
    stream_id: str = "0-0"
    torn_copy: Path | None = None
    recent_ids: list[str] = field(default_factory=list)
    # The producers' sequence account in the newest checkpoint (None: no checkpoint has
    # one, e.g. an archive written before producers were tracked) and the event lines
    # archived after that checkpoint, oldest first, to replay onto it.
    producers: dict[str, Any] | None = None
    replay: list[dict[str, Any]] = field(default_factory=list)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _writable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IWUSR)


class ArchiveWriter:
    def __init__(
        self,
        directory: Path,
        key: SigningKey,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float = 3600.0,
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 60.0,
        metrics: AuditMetrics | None = None,
        clock: Callable[[], float] = time.time,
        head_file: Path | None = None,
    ) -> None:
        self.dir = directory
        self.head_file = head_file
        # Set by the exporter: what each checkpoint also carries (the producers' account)
        # and who hears of each new head (the stream and the log).
        self.state: Callable[[], Mapping[str, Any]] | None = None
        self.on_checkpoint: Callable[[Mapping[str, Any]], None] | None = None
        self.key = key
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self.metrics = metrics
        self.clock = clock
        self.seq = 0
        self.hash = GENESIS
        self.stream_id = "0-0"
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._created = 0.0
        self._since_cp = 0
        self._last_cp = 0.0

    # -- lifecycle --------------------------------------------------------------------
    def open(self) -> ResumePoint:
        self.dir.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(lock_fd)
            raise ArchiveError(f"{self.dir}: another exporter holds the archive") from exc
        self._lock_fd = lock_fd
        try:
            rp = self._recover()
        except BaseException:
            self.close(seal=False)
            raise
        self._last_cp = self.clock()
        return rp

    def close(self, *, seal: bool = True) -> None:
        """Seal the tail with a checkpoint (graceful stop), close, release the lock."""
        if self._fd is not None:
            if seal:
                self.checkpoint(force=True)
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover(self) -> ResumePoint:
        rp = ResumePoint()
        segs = self._drop_unsealed_successor(list_segments([self.dir]))
        last_event: dict[str, Any] | None = None
        snapshot_found = False
        for i, path in enumerate(reversed(segs)):
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                if i != 0:
                    raise ArchiveError(
                        f"{path.name}: torn line in a closed segment; run "
                        "`audit verify` and investigate before exporting"
                    )
                data, rp.torn_copy = self._cut_torn(path, data)
            lines = data.split(b"\n")[:-1]
            if i == 0:
                self._adopt(path, lines)
            since_cp = 0
            seen_cp = False
            for raw in reversed(lines):
                try:
                    doc = json.loads(raw)
                except ValueError as exc:
                    raise ArchiveError(f"{path.name}: unreadable line in the archive") from exc
                if not isinstance(doc, dict):
                    raise ArchiveError(f"{path.name}: unreadable line in the archive")
                if doc.get("kind") == "checkpoint":
                    seen_cp = True
                    if not snapshot_found:
                        snapshot_found = True
                        prod = doc.get("producers")
                        rp.producers = prod if isinstance(prod, dict) else None
                elif doc.get("kind") == "event":
                    if last_event is None:
                        last_event = doc
                    if not seen_cp:
                        since_cp += 1
                    if not snapshot_found:
                        rp.replay.append(doc)
                    if len(rp.recent_ids) < RECENT_IDS and isinstance(doc.get("event_id"), str):
                        rp.recent_ids.append(doc["event_id"])
            if i == 0:
                self._since_cp = since_cp
            if last_event is not None and snapshot_found:
                break
        if last_event is not None:
            if record_hash(str(last_event["prev_hash"]), last_event) != last_event["hash"]:
                raise ArchiveError("the newest record's hash does not verify")
            rp.seq = int(last_event["seq"])
            rp.hash = str(last_event["hash"])
            rp.stream_id = str(last_event["stream_id"])
        rp.recent_ids.reverse()
        rp.replay.reverse()
        self.seq, self.hash, self.stream_id = rp.seq, rp.hash, rp.stream_id
        if self._fd is None and segs:
            self._open_named_successor(segs[-1])
        log.info(
            "archive opened",
            extra={"seq": rp.seq, "stream_id": rp.stream_id, "torn_copy": str(rp.torn_copy or "")},
        )
        return rp

    def _drop_unsealed_successor(self, segs: list[Path]) -> list[Path]:
        """A crash between creating the next segment and sealing the current one leaves an
        empty newest segment after an unsealed one: remove it and go on with the old one."""
        if len(segs) >= 2 and segs[-1].stat().st_size == 0 and _writable(segs[-2]):
            log.warning(
                "empty segment after an unsealed one removed", extra={"segment": segs[-1].name}
            )
            segs[-1].unlink()
            fsync_dir(self.dir)
            return segs[:-1]
        return segs

    def _open_named_successor(self, sealed: Path) -> None:
        """The newest segment is sealed: create the one its seal names, if a crash came
        between the seal and the creation (a legacy seal names none: created lazily)."""
        name = None
        for raw in reversed(sealed.read_bytes().split(b"\n")):
            if b'"kind":"checkpoint"' in raw:
                with contextlib.suppress(ValueError):
                    doc = json.loads(raw)
                    name = doc.get("next_segment") if isinstance(doc, dict) else None
                break
        if isinstance(name, str) and segment_created(Path(name)) is not None:
            self._new_segment(name)

    def _cut_torn(self, path: Path, data: bytes) -> tuple[bytes, Path]:
        cut = data.rfind(b"\n") + 1
        torn_dir = self.dir / "torn"
        torn_dir.mkdir(exist_ok=True)
        copy = torn_dir / f"{path.name}.{int(self.clock() * 1000)}.torn"
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o440)
        try:
            _write_all(fd, data[cut:])
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(torn_dir)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, cut)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.warning(
            "torn last line cut from the archive (a copy is kept)",
            extra={
                "segment": path.name,
                "line": data.count(b"\n") + 1,
                "copy": str(copy),
                "bytes": len(data) - cut,
            },
        )
        return data[:cut], copy

    def _adopt(self, path: Path, lines: list[bytes]) -> None:
        """Keep appending to the newest segment unless it was sealed by a rotation."""
        if not _writable(path):
            return
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._path = path
        self._size = path.stat().st_size
        self._created = segment_created(path) or self.clock()

    # -- writing ----------------------------------------------------------------------
    def append(self, entries: Sequence[tuple[str, Mapping[str, Any]]]) -> int:
        """Chain, write and fsync ``(stream id, event record)`` pairs, in order.

        Any OSError propagates: the process should exit and recover on restart (the
        in-memory chain head may be ahead of the disk after a failed write)."""
        if not entries:
            return 0
        self.maybe_rotate()
        if self._fd is None:
            self._new_segment()
        assert self._fd is not None
        buf: list[bytes] = []
        for stream_id, rec in entries:
            seq = self.seq + 1
            line, digest = chain_line(rec, seq=seq, stream_id=stream_id, prev_hash=self.hash)
            buf.append(line + b"\n")
            self.seq, self.hash, self.stream_id = seq, digest, stream_id
        data = b"".join(buf)
        _write_all(self._fd, data)
        os.fsync(self._fd)
        self._size += len(data)
        self._since_cp += len(entries)
        if self.metrics is not None:
            self.metrics.events.labels(sink="archive", result="ok").inc(len(entries))
        self.checkpoint()
        return len(entries)

    def checkpoint(self, *, force: bool = False, next_segment: str | None = None) -> bool:
        """Write a signed checkpoint when due (or ``force``) and there is something new; a
        seal (``next_segment``) is written whenever asked."""
        if self._fd is None or self._path is None:
            return False
        if self._since_cp == 0 and next_segment is None:
            return False
        now = self.clock()
        if not (
            force
            or next_segment is not None
            or self._since_cp >= self.checkpoint_every
            or now - self._last_cp >= self.checkpoint_interval_s
        ):
            return False
        extra: dict[str, Any] = {}
        if self.state is not None:
            extra["producers"] = dict(self.state())
        if next_segment is not None:
            extra["next_segment"] = next_segment
        cp = self.key.checkpoint(
            segment=self._path.name,
            seq=self.seq,
            hash_=self.hash,
            ts_ms=int(now * 1000),
            extra=extra,
        )
        data = canonical_bytes(cp) + b"\n"
        _write_all(self._fd, data)
        os.fsync(self._fd)
        self._size += len(data)
        self._since_cp = 0
        self._last_cp = now
        self._write_head(cp)
        if self.metrics is not None:
            self.metrics.checkpoints.inc()
        return True

    def maybe_rotate(self) -> bool:
        """Seal and close the current segment when it is too big or too old.

        The next segment is created first, then the seal names it: at every moment a seal
        that names a successor has one, so a deleted newest segment is always detectable
        (``audit verify``: the seal names a file that is not there)."""
        if self._fd is None or self._path is None or self._size == 0:
            return False
        now = self.clock()
        if self._size < self.max_bytes and now - self._created < self.max_age_s:
            return False
        old_fd, old_path = self._fd, self._path
        name = segment_name(self.seq + 1, now)
        new_fd = os.open(self.dir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640)
        fsync_dir(self.dir)
        self.checkpoint(next_segment=name)
        os.fsync(old_fd)
        os.close(old_fd)
        # Read-only from here on: the hint to ship it to WORM storage, and the marker
        # recovery uses to start a new segment rather than reopen this one.
        old_path.chmod(0o440)
        fsync_dir(self.dir)
        log.info("segment sealed", extra={"segment": old_path.name, "seq": self.seq})
        self._fd, self._path = new_fd, self.dir / name
        self._size, self._created, self._since_cp = 0, now, 0
        return True

    def _new_segment(self, name: str | None = None) -> None:
        now = self.clock()
        path = self.dir / (name or segment_name(self.seq + 1, now))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o640)
        fsync_dir(self.dir)
        created = segment_created(path) if name else None
        self._path, self._size, self._created, self._since_cp = path, 0, created or now, 0

    def _write_head(self, cp: Mapping[str, Any]) -> None:
        """HEAD.json: the latest checkpoint, replaced atomically; the same in ``head_file``
        (another volume) and to ``on_checkpoint`` (the stream, the log). The copies outside
        the archive are what catch a cut-off tail with its HEAD.json rolled back."""
        line = canonical_bytes(cp) + b"\n"
        targets = [self.dir / HEAD_FILE]
        if self.head_file is not None:
            targets.append(self.head_file)
        for target in targets:
            tmp = target.parent / f".{target.name}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
                try:
                    _write_all(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                tmp.replace(target)
                with contextlib.suppress(OSError):
                    fsync_dir(target.parent)
            except OSError:
                if target.parent == self.dir:
                    raise  # the archive's own disk: exit and recover
                log.error("head file not written", extra={"head_file": str(target)}, exc_info=True)
        if self.on_checkpoint is not None:
            self.on_checkpoint(cp)
