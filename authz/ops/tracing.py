"""OpenTelemetry tracing: a span per Check and per step-up request, exported over OTLP/HTTP.

Off unless ``tracing.enabled``. ``stepup-authz serve`` calls :func:`configure_tracing`
once at start and :func:`shutdown_tracing` at exit (which flushes what is queued). The
request paths wrap their work in a context manager:

    with span_for_check(headers) as span:          # the Check path (gRPC or HTTP mode)
        decision = await decide(...)
        span.set_attribute("stepup.outcome", decision.outcome.value)

    with span_for_stepup("callback", request.headers):   # /_stepup/* handlers
        ...

``headers`` is a mapping with lower-case names: the CheckRequest's HTTP headers, or the
gRPC invocation metadata, where Envoy (with tracing on: ``stepup-authz render envoy
--tracing-otlp URL``) puts the W3C ``traceparent`` of its ext_authz span. The new span is
that span's child, so the service's work shows inside Envoy's trace; with no (or a
malformed) ``traceparent`` it starts a trace of its own. Sampling follows the parent's
``sampled`` flag, and ``tracing.sample_ratio`` for traces that start here.

Disabled, both context managers yield OpenTelemetry's non-recording ``INVALID_SPAN``
(``set_attribute`` is a no-op) and cost one attribute read. While a span is current,
:func:`current_ids` gives its ids, and the JSON log lines carry them (``trace_id``,
``span_id``: authz/ops/logs.py), so a log line leads to its trace and back.

The provider is this module's own, not OpenTelemetry's global one, so a library's
instrumentation cannot start exporting behind the settings' back, and tests can configure
it more than once in one process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from authz.config.settings import TracingSettings

log = logging.getLogger("authz.tracing")

_propagator = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None
_DISABLED: contextlib.nullcontext[trace.Span] = contextlib.nullcontext(trace.INVALID_SPAN)


def configure_tracing(settings: TracingSettings | None) -> bool:
    """Install the exporter when ``settings.enabled``; returns whether tracing is on.
    Replaces (and flushes) a provider configured before."""
    global _provider, _tracer
    shutdown_tracing()
    if settings is None or not settings.enabled:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from authz import version

    resource = Resource.create(
        {"service.name": settings.service_name, "service.version": version()}
    )
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio))
    )
    exporter = OTLPSpanExporter(endpoint=settings.endpoint, timeout=settings.timeout_s)
    # Spans leave in a background thread, in batches: the event loop never waits on the
    # collector, and a collector that is down costs dropped spans, never a slower Check.
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=settings.max_queue_size,
            schedule_delay_millis=int(settings.export_interval_s * 1000),
        )
    )
    _provider, _tracer = provider, provider.get_tracer("authz", version())
    log.info(
        "tracing on: OTLP/HTTP",
        extra={"endpoint": settings.endpoint, "sample_ratio": settings.sample_ratio},
    )
    return True


def shutdown_tracing() -> None:
    """Flush queued spans and stop exporting (idempotent)."""
    global _provider, _tracer
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def force_flush(timeout_s: float = 5.0) -> bool:
    """Export every finished span now (tests; a graceful stop)."""
    return _provider is None or _provider.force_flush(int(timeout_s * 1000))


def enabled() -> bool:
    return _tracer is not None


def _span(name: str, headers: Mapping[str, str], attributes: Mapping[str, Any]) -> Any:
    tracer = _tracer
    if tracer is None:
        return _DISABLED
    parent = _propagator.extract(carrier=headers)
    return tracer.start_as_current_span(
        name, context=parent, kind=trace.SpanKind.SERVER, attributes=dict(attributes)
    )


def span_for_check(
    headers: Mapping[str, str], **attributes: str | int | float | bool
) -> contextlib.AbstractContextManager[trace.Span]:
    """A SERVER span ``stepup-authz Check`` for one ext_authz Check (see the module doc)."""
    result: contextlib.AbstractContextManager[trace.Span] = _span(
        "stepup-authz Check", headers, attributes
    )
    return result


def span_for_stepup(
    endpoint: str, headers: Mapping[str, str], **attributes: str | int | float | bool
) -> contextlib.AbstractContextManager[trace.Span]:
    """A SERVER span ``stepup-authz /_stepup/<endpoint>`` for one step-up request."""
    result: contextlib.AbstractContextManager[trace.Span] = _span(
        f"stepup-authz /_stepup/{endpoint}", headers, attributes
    )
    return result


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, when there is a valid one."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
