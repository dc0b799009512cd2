"""OpenTelemetry tracing (authz/ops/tracing.py) exporting to a real OTLP/HTTP receiver.

The receiver is a small HTTP server on loopback that decodes what the SDK's exporter posts
(``ExportTraceServiceRequest``, protobuf) into spans, as a collector would. The spans are
parented on the W3C ``traceparent`` Envoy would send, and the JSON log lines written inside
a span carry its ids.
"""

from __future__ import annotations

import asyncio
import gzip
import http.server
import io
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from authz.config.settings import TracingSettings
from authz.ops import tracing
from authz.ops.logs import JsonFormatter

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@dataclass
class Received:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, object]
    service_name: str


class Receiver:
    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.paths.append(self.path)
                receiver._decode(body)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def _decode(self, body: bytes) -> None:
        req = ExportTraceServiceRequest.FromString(body)
        for rs in req.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs: dict[str, object] = {}
                    for a in s.attributes:
                        v = a.value
                        attrs[a.key] = getattr(v, v.WhichOneof("value"))
                    self.spans.append(
                        Received(
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            s.kind,
                            attrs,
                            resource.get("service.name", ""),
                        )
                    )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    thread = threading.Thread(target=r.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield r
    finally:
        tracing.shutdown_tracing()
        r.server.shutdown()
        r.server.server_close()


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("authz.test.tracing")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)


def on(receiver: Receiver, **kw: object) -> None:
    settings = TracingSettings.model_validate({"enabled": True, "endpoint": receiver.url, **kw})
    assert tracing.configure_tracing(settings)


async def test_a_check_span_joins_envoys_trace_and_the_logs_carry_its_ids(
    receiver: Receiver, json_log: io.StringIO
) -> None:
    on(receiver, service_name="stepup-authz-test")
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "x-other": "y"}
    with tracing.span_for_check(headers, **{"stepup.level": "elevated"}) as span:
        await asyncio.sleep(0)  # the span stays current across an await, as in the Check
        logging.getLogger("authz.test.tracing").info("decided")
        span.set_attribute("stepup.outcome", "allow")
        ids = tracing.current_ids()
    assert tracing.current_ids() is None
    assert tracing.force_flush()
    (got,) = receiver.spans
    assert receiver.paths == ["/v1/traces"]
    assert got.name == "stepup-authz Check"
    assert (got.trace_id, got.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert got.kind == Span.SpanKind.SPAN_KIND_SERVER
    assert got.attributes == {"stepup.level": "elevated", "stepup.outcome": "allow"}
    assert got.service_name == "stepup-authz-test"
    line = json.loads(json_log.getvalue().splitlines()[-1])
    assert ids == (TRACE_ID, got.span_id)
    assert (line["trace_id"], line["span_id"]) == (TRACE_ID, got.span_id)


def test_stepup_spans_and_new_traces(receiver: Receiver) -> None:
    on(receiver)
    with tracing.span_for_stepup("callback", {}):
        pass
    with tracing.span_for_check({"traceparent": "00-not-a-trace-01"}):  # malformed: new root
        pass
    with tracing.span_for_check({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"}):
        pass  # Envoy decided not to sample this request: neither do we
    assert tracing.force_flush()
    names = [(s.name, s.parent_span_id) for s in receiver.spans]
    assert names == [("stepup-authz /_stepup/callback", ""), ("stepup-authz Check", "")]
    assert all(s.trace_id != TRACE_ID for s in receiver.spans)


def test_an_error_in_the_span_is_recorded_and_raised(receiver: Receiver) -> None:
    on(receiver)
    with pytest.raises(RuntimeError), tracing.span_for_check({}):
        raise RuntimeError("boom")
    assert tracing.force_flush()
    assert [s.name for s in receiver.spans] == ["stepup-authz Check"]


def test_off_by_default_nothing_is_sent(receiver: Receiver, json_log: io.StringIO) -> None:
    assert not tracing.configure_tracing(TracingSettings())
    assert not tracing.enabled()
    with tracing.span_for_check({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}) as span:
        span.set_attribute("stepup.outcome", "allow")  # a no-op, not an error
        assert not span.is_recording()
        logging.getLogger("authz.test.tracing").info("decided")
    assert tracing.force_flush()
    assert receiver.spans == []
    assert "trace_id" not in json.loads(json_log.getvalue())


def test_a_collector_that_is_down_costs_spans_not_requests() -> None:
    settings = TracingSettings.model_validate(
        {"enabled": True, "endpoint": "http://127.0.0.1:1/v1/traces", "timeout_s": 0.5}
    )
    assert tracing.configure_tracing(settings)
    try:
        with tracing.span_for_check({}) as span:
            assert span.is_recording()
    finally:
        tracing.shutdown_tracing()  # the failed export is logged by the SDK, never raised


def test_settings_refuse_a_non_http_endpoint() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="OTLP/HTTP"):
        TracingSettings.model_validate({"endpoint": "grpc://collector:4317"})
