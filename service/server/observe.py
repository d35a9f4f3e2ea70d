"""Traces (OpenTelemetry) and access logs of the gRPC servers and the trainer.

One server span per call, named `<role> <Method>` (`router Generate`, `worker Generate`), a child of the
caller's W3C `traceparent` metadata; the router sends its own span on to the worker (`trace_metadata`), so
one Generate is one trace: router -> worker -> adapter.load, engine.queue, engine.prefill, engine.decode
(built from the engine's timestamps: the library never imports OpenTelemetry). A feedback event stores the
`traceparent` of the call that submitted it; the trainer's round and publish become spans of that trace.

Without an SDK tracer provider every span is a no-op, but the trace context still travels. `setup_tracing`
installs one that exports OTLP/HTTP (off unless an endpoint is set); tests install an in-memory exporter.

Access log: one JSON line per call on logger `personalize.access` with tenant, user (a keyed hash, never
the id), rpc, code, latency, adapter version, cache tier, node.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from personalize.engine.types import RequestTimings
from personalize.errors import InvalidArgument
from personalize_service.server.auth import ApiKeys
from personalize_service.server.errors import status_of
from personalize_service.server.interceptors import cached_wrapper, wrapper_cache
from personalize_service.server.metrics import TrainerMetrics

if TYPE_CHECKING:
    from personalize.feedback.trainer import RoundReport

log = logging.getLogger(__name__)
TRACER = "personalize"
ACCESS_LOGGER = "personalize.access"
_PUBLIC = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_TRACE_HEADERS = ("traceparent", "tracestate")
_OTEL_ENDPOINT_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER)


def tracing_on() -> bool:
    """Whether spans are recorded: an SDK tracer provider is installed (without one every span is a no-op,
    so a call need not build its span to pass the trace context on)."""
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


def setup_tracing(endpoint: str, service_name: str) -> None:
    """Export spans over OTLP/HTTP (protobuf) to `endpoint`; with "" the standard OTEL_EXPORTER_OTLP_ENDPOINT
    (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) environment variable decides, and without either tracing stays off.

    `endpoint` is a collector's base URL (http://host:4318; a bare host:port means http://) or a full
    .../v1/traces URL. The provider flushes its spans at interpreter exit."""
    if not endpoint and not any(os.environ.get(name) for name in _OTEL_ENDPOINT_ENV):
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = OTLPSpanExporter(endpoint=otlp_traces_url(endpoint) if endpoint else None)  # None: the env's
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def otlp_traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector, read like OTEL_EXPORTER_OTLP_ENDPOINT: a base URL gets
    /v1/traces appended (`host:port` means http://host:port), a URL already ending in /v1/traces is kept."""
    url = endpoint if "://" in endpoint else f"http://{endpoint}"
    if url.split("://", 1)[0] not in ("http", "https"):
        raise InvalidArgument(f"otlp endpoint {endpoint!r}: OTLP/HTTP needs an http:// or https:// URL")
    url = url.rstrip("/")
    return url if url.endswith("/v1/traces") else url + "/v1/traces"


# ---- context in and out ------------------------------------------------------------------------------


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """`traceparent`/`tracestate` of the current span, for an outgoing call (empty without a trace)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return ()  # what inject would give: no span to name as the parent
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple((k, v) for k, v in carrier.items() if k in _TRACE_HEADERS)


def current_traceparent() -> str:
    """The current span's W3C traceparent, "" without a trace (stored with a feedback event)."""
    return dict(trace_metadata()).get("traceparent", "")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _span(name: str, start: float, end: float, parent: Any = None, **attributes: Any) -> trace.Span:
    """A finished span over [start, end] (seconds since the epoch), child of `parent` (default: current)."""
    span = tracer().start_span(name, context=parent, start_time=_ns(start), attributes=attributes)
    span.end(end_time=_ns(max(start, end)))
    return span


def generation_spans(call_start: float, timings: RequestTimings | None, cache_tier: str, version: int) -> None:
    """adapter.load, engine.queue, engine.prefill and engine.decode spans of one generation, under the
    current span. `call_start` is when the worker began (registry lookup and adapter load come first)."""
    if timings is None or not timings.submitted:
        return
    t = timings
    _span("adapter.load", call_start, t.submitted, cache_tier=cache_tier, adapter_version=version)
    if t.admitted:
        _span("engine.queue", t.submitted, t.admitted)
    if t.first_token:
        _span("engine.prefill", t.admitted, t.first_token)
        _span("engine.decode", t.first_token, t.finished, tokens=len(t.token_gaps) + 1)


def round_spans(report: RoundReport) -> None:
    """For every traced event of the round: a `trainer.round` span in the event's trace, and under it the
    user's `trainer.publish` when the round published that user."""
    end = report.started_at + report.seconds
    published = {(t, u): v for t, u, v in report.published}
    for user, parents in report.traces.items():
        for traceparent in dict.fromkeys(parents):
            parent = propagate.extract({"traceparent": traceparent})
            attrs = {"events": report.events, "users": report.users, "user.published": user in published}
            round_span = _span("trainer.round", report.started_at, end, parent, **attrs)
            if user in report.publish_times:
                start, stop = report.publish_times[user]
                inner = trace.set_span_in_context(round_span)
                _span("trainer.publish", start, stop, inner, adapter_version=published.get(user, 0))


class TrainerObserver:
    """A trainer's `on_round` hook: round metrics and spans, and the per-partition stream lag (read at most
    every `lag_every_s`, from `lag`, e.g. `stream.lag_by_partition`)."""

    def __init__(
        self, metrics: TrainerMetrics, lag: Callable[[], dict[int, int]] | None = None, lag_every_s: float = 1.0
    ) -> None:
        self.metrics, self.lag, self.lag_every_s = metrics, lag, lag_every_s
        self._next_lag = 0.0

    def __call__(self, report: RoundReport) -> None:
        if report.events:
            self.metrics.observe_round(report)
            round_spans(report)
        now = time.monotonic()
        if self.lag is not None and now >= self._next_lag:
            self._next_lag = now + self.lag_every_s
            self.metrics.set_lag(self.lag())


# ---- the server interceptor ----------------------------------------------------------------------------


class AccessLog:
    """Writes one JSON line per call to logger `personalize.access`; user ids as a keyed hash (HMAC-SHA256
    with `key`; a random key per process when empty, so hashes then join only within one process)."""

    def __init__(self, key: str = "") -> None:
        self._key = key.encode() if key else secrets.token_bytes(32)
        self.logger = logging.getLogger(ACCESS_LOGGER)

    def user_hash(self, tenant: str, user_id: str) -> str:
        if not user_id:
            return ""
        return hmac.new(self._key, f"{tenant}\0{user_id}".encode(), hashlib.sha256).hexdigest()[:16]

    def write(self, fields: dict[str, Any]) -> None:
        self.logger.info(json.dumps(fields, separators=(",", ":")))


_ACCESS_HANDLERS: dict[str, logging.Handler] = {}
"""One handler per destination however many servers a process creates."""


def open_access_log(path: str, key: str = "") -> AccessLog | None:
    """The access log writing to `path` ("-" = stderr); "" = off (None)."""
    if not path:
        return None
    logger = logging.getLogger(ACCESS_LOGGER)
    if path not in _ACCESS_HANDLERS:
        handler = logging.StreamHandler(sys.stderr) if path == "-" else logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        _ACCESS_HANDLERS[path] = handler
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the lines are the log, not messages of the server's own log
    return AccessLog(key)


class _Call:
    """One call's span (current in `ctx`) and what its access-log line needs."""

    def __init__(self, role: str, node: str, method: str, context: grpc.ServicerContext, request: Any) -> None:
        self.method, self.context, self.start = method, context, time.perf_counter()
        self.metadata = dict(context.invocation_metadata() or ())
        carrier = {k: self.metadata[k] for k in _TRACE_HEADERS if k in self.metadata}
        self.rpc = method.rsplit("/", 1)[-1]
        self.ctx = contextvars.copy_context()
        if tracing_on():
            parent = propagate.extract(carrier)
            self.span = tracer().start_span(
                f"{role} {self.rpc}",
                context=parent,
                kind=trace.SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.method": method.lstrip("/"), "personalize.node": node},
            )
            self.ctx.run(otel_context.attach, trace.set_span_in_context(self.span, parent))
        elif carrier:  # no spans are recorded, but the caller's trace context still travels on
            parent = propagate.extract(carrier)
            self.span = trace.get_current_span(parent)
            self.ctx.run(otel_context.attach, parent)
        else:  # nothing to record, nothing to pass on: what a no-op tracer's span would be
            self.span = trace.INVALID_SPAN
        self.user_id = str(getattr(request, "user_id", "") or self.metadata.get("x-user-id", ""))

    def code(self, error: BaseException | None) -> grpc.StatusCode:
        if isinstance(error, GeneratorExit):
            return grpc.StatusCode.CANCELLED
        get = getattr(self.context, "code", None)
        code = get() if callable(get) else None
        if isinstance(code, grpc.StatusCode):
            return code
        if error is None:
            return grpc.StatusCode.OK
        if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
            return error.code()  # type: ignore[no-any-return]
        return status_of(error) or grpc.StatusCode.UNKNOWN


class ObserveInterceptor(grpc.ServerInterceptor):
    """The server span of every call (health and reflection excepted) and, with `access`, its access-log
    line. Install it outermost, so it sees the status code the error interceptor settles on."""

    def __init__(self, role: str, node: str, keys: ApiKeys, access: AccessLog | None = None) -> None:
        self.role, self.node, self.keys, self.access = role, node, keys, access

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        method = details.method
        if handler is None or method.startswith(_PUBLIC) or handler.request_streaming:
            return handler
        return cached_wrapper(wrapper_cache(self), handler, method, lambda: self._observed(handler, method))

    def _observed(self, handler: Any, method: str) -> Any:
        """`handler` with its calls traced and logged."""
        if handler.response_streaming:
            behavior, factory, wrap = handler.unary_stream, grpc.unary_stream_rpc_method_handler, self._stream
        else:
            behavior, factory, wrap = handler.unary_unary, grpc.unary_unary_rpc_method_handler, self._unary

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            return wrap(behavior, request, context, method)

        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, behavior: Callable[..., Any], request: Any, context: grpc.ServicerContext, method: str) -> Any:
        call = _Call(self.role, self.node, method, context, request)
        try:
            response = call.ctx.run(behavior, request, context)
        except BaseException as exc:
            self._end(call, exc, None)
            raise
        self._end(call, None, response)
        return response

    def _stream(
        self, behavior: Callable[..., Any], request: Any, context: grpc.ServicerContext, method: str
    ) -> Iterator[Any]:
        call = _Call(self.role, self.node, method, context, request)
        error: BaseException | None = None
        last = responses = None
        try:
            responses = call.ctx.run(behavior, request, context)
            while True:
                try:
                    item = call.ctx.run(next, responses)
                except StopIteration:
                    break
                last = item
                yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                call.ctx.run(close)
            self._end(call, error, last)

    def _end(self, call: _Call, error: BaseException | None, response: Any) -> None:
        try:
            code = call.code(error)
            final = getattr(response, "final", response)  # a stream's last chunk holds the response
            fields: dict[str, str | int] = {
                "adapter_version": int(getattr(final, "adapter_version", 0) or 0),
                "cache_tier": str(getattr(final, "cache_tier", "") or ""),
                "node": str(getattr(final, "node_id", "") or self.node),
            }
            span = call.span
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            for k, v in fields.items():
                span.set_attribute(f"personalize.{k}", v)
            if code != grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            span.end()
            if self.access is not None:
                tenant = self._tenant(call)
                self.access.write(
                    {
                        "ts": round(time.time(), 3),
                        "role": self.role,
                        "rpc": call.method.lstrip("/"),
                        "code": code.name,
                        "latency_ms": round((time.perf_counter() - call.start) * 1000, 3),
                        "tenant": tenant,
                        "user": self.access.user_hash(tenant, call.user_id),
                        **fields,
                        "trace_id": format(span.get_span_context().trace_id, "032x"),
                    }
                )
        except Exception:  # observing a call must never fail it
            log.exception("tracing or access log of %s failed", call.method)

    def _tenant(self, call: _Call) -> str:
        try:
            return self.keys.tenant_of(tuple(call.metadata.items()))
        except Exception:  # the key was refused: the line still records the call, tenant unknown
            return ""
