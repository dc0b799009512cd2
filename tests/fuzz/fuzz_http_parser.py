"""atheris harness: the HTTP ext_authz listener's HTTP/1.1 parser and its stream framing.

Two ways in, chosen by the first byte:

- one request head: ``parse_head`` then ``attributes_from_http``. Expected:
  ``_Unframeable`` and ``RequestError``. Accepted heads keep their invariants: header
  names lower-case tokens, values without CR/LF/NUL, no body; accepted attributes have a
  canonical path, a normalised host and an upper-case method.
- a byte stream cut into fuzzed chunks, fed to a listener connection (``_Conn``) over a
  fake transport, with an authorizer that never allows. Expected: nothing raised. Every
  answer is a complete HTTP/1.1 response and none is a 200 (fail closed); no more answers
  than request heads (plus one refusal of an oversize head); nothing written after a
  ``connection: close`` answer; a closed connection leaves the listener's books.

    python tests/fuzz/fuzz_http_parser.py CORPUS_DIR -max_total_time=60
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from pathlib import Path
from typing import Any

import atheris

# Not under test, and heavy (Redis, OpenTelemetry, protobuf): imported before the block so
# that only the listener's own modules are instrumented.
from authz.check.authorizer import CheckResult
from authz.check.response import HttpResponseBuilder
from authz.config.settings import HttpAuthzSettings
from authz.core.attributes import RequestAttributes, canonicalize_path, normalize_host
from authz.core.decision import Decision, Outcome
from authz.core.reasons import Reason
from authz.errors import RequestError
from authz.ops import tls  # noqa: F401 - imported by the listener

with atheris.instrument_imports(enable_loader_override=False):
    from authz.check.http_server import HttpAuthzServer, _Conn, _Unframeable, parse_head
    from authz.check.request import attributes_from_http

logging.disable(logging.WARNING)  # every refusal logs one line: noise at 1000 inputs/s
PEER = "x-stepup-peer-address"
SETTINGS = HttpAuthzSettings(
    enabled=True, port=0, max_header_bytes=1024, max_headers=16, max_connections=4
)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")


class _Authorizer:
    """Never allows: every answer the listener writes must be a denial."""

    def unread(
        self, decision: Decision, attrs: RequestAttributes | None = None, elapsed: float = 0.0
    ) -> CheckResult:
        return CheckResult(decision, "01JFUZZ0000000000000000000")

    async def check(self, attrs: RequestAttributes) -> CheckResult:
        await asyncio.sleep(0)
        return CheckResult(Decision(Outcome.DENY, Reason.NO_CREDENTIALS), "01JFUZZ1")


class _Transport:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.out = bytearray()
        self.closed = False
        self.written_after_close = False
        self.protocol: _Conn | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        if self.closed:
            self.written_after_close = True
        self.out += data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                self.loop.call_soon(self.protocol.connection_lost, None)

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _one_head(data: bytes) -> None:
    head = data.decode("latin-1")
    try:
        method, target, headers, _ = parse_head(head, 16)
    except _Unframeable:
        return
    for name, value in headers.items():
        assert _TOKEN.fullmatch(name), name
        assert not {"\r", "\n", "\x00"} & set(value), value
    assert "transfer-encoding" not in headers
    assert headers.get("content-length", "0") == "0"
    try:
        attrs = attributes_from_http(
            method, target, headers, path_prefix="/check", peer_header=PEER, trusted_hops=0
        )
    except RequestError:
        return
    assert canonicalize_path(attrs.path)[0] == attrs.path, attrs.path
    assert attrs.host and normalize_host(attrs.host) == attrs.host, attrs.host
    assert attrs.method.isalpha() and attrs.method.isupper(), attrs.method


def _responses(out: bytes) -> list[tuple[int, bool]]:
    """(status, closes) of each answer in ``out``; asserts each is complete."""
    answers = []
    rest = out
    while rest:
        m = _STATUS.match(rest)
        assert m is not None, rest[:80]
        end = rest.index(b"\r\n\r\n")
        head = rest[:end].decode()
        length = int(re.search(r"\r\ncontent-length: (\d+)", head).group(1))  # type: ignore[union-attr]
        assert len(rest) >= end + 4 + length, "a truncated answer"
        answers.append((int(m.group(1)), "\r\nconnection: close" in head))
        rest = rest[end + 4 + length :]
    return answers


async def _stream(chunks: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    server = HttpAuthzServer(
        _Authorizer(),  # type: ignore[arg-type]
        HttpResponseBuilder(),
        SETTINGS,
        clock=lambda: 0.0,
    )
    transport = _Transport(loop)
    conn = _Conn(server)
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    for chunk in chunks:
        if transport.closed:
            break
        conn.data_received(chunk)
        for _ in range(3):
            await asyncio.sleep(0)
    for _ in range(3):
        await asyncio.sleep(0)
    if not transport.closed:
        conn.eof_received()
        for _ in range(3):
            await asyncio.sleep(0)
    assert not transport.written_after_close
    answers = _responses(bytes(transport.out))
    data = b"".join(chunks)
    assert len(answers) <= data.count(b"\r\n\r\n") + 1, (len(answers), data[:200])
    assert all(status != 200 for status, _ in answers), answers
    assert all(not closes for _, closes in answers[:-1]), "an answer after connection: close"
    if transport.closed:
        await asyncio.sleep(0)
        assert conn not in server.conns and not server.by_source


_LOOP = asyncio.new_event_loop()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        _one_head(fdp.ConsumeBytes(fdp.remaining_bytes()))
        return
    chunks = []
    while fdp.remaining_bytes():
        chunks.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 600)))
    _LOOP.run_until_complete(_stream(chunks))


def seed(corpus: Path) -> None:
    """Real-looking heads and pipelined streams, so mutation starts from valid input."""
    corpus.mkdir(parents=True, exist_ok=True)
    if any(corpus.iterdir()):
        return
    req = (
        b"GET /check/accounts/1 HTTP/1.1\r\nhost: app.example.com\r\n"
        b"authorization: Bearer a.b.c\r\nx-stepup-peer-address: 10.1.2.3\r\n"
        b"content-length: 0\r\n\r\n"
    )
    bad = b"GET /check/a%2Fb HTTP/1.1\r\nhost: h\r\nx-stepup-peer-address: 10.0.0.1\r\n\r\n"
    samples = [b"\x01" + req[:-4], b"\x00" + req + bad + req, b"\x00" + bad * 8 + req[:30]]
    for i, sample in enumerate(samples):
        (corpus / f"seed-{i}").write_bytes(sample)


def main() -> None:
    corpus = next((Path(a) for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus is not None and not corpus.is_file():  # a file: reproduce one input
        seed(corpus)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
