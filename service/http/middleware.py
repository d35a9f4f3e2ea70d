"""ASGI middleware of the edge: the request body limit, Prometheus metrics and a trace span of every request.

Trace: one SERVER span per request, `gateway <METHOD> <route>` (`gateway POST /v1/completions`), a child of the
request's W3C `traceparent` header and current while the request runs, so the SDK sends it on as the parent
of the worker's span (service/server/observe.py); a streamed response's span ends with its last chunk.

Metrics (own CollectorRegistry per app, served at /metrics; names in the style of the gRPC servers'):
    personalize_http_requests_total{route,status}     requests finished, by route template and HTTP status
    personalize_http_request_seconds{route}           latency until the last byte of the response
    personalize_http_time_to_first_token_seconds{route}  streaming: request start -> first token chunk sent
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from prometheus_client import CollectorRegistry, Counter, Histogram

from personalize_service.http.errors import error_body
from personalize_service.server.observe import tracer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

PREFIX = "personalize_http"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TTFT_KEY = "personalize.ttft_start"
"""Scope key holding the request's start time, read by the streaming response for its first token."""


class HttpMetrics:
    """The edge's metric objects, registered in `registry` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            f"{PREFIX}_requests_total", "HTTP requests finished", ["route", "status"], registry=self.registry
        )
        self.latency = self._per_route("request_seconds", "HTTP request latency until the last byte")
        self.ttft = self._per_route(
            "time_to_first_token_seconds", "streaming: request start until the first token chunk is sent"
        )

    def _per_route(self, name: str, doc: str) -> Histogram:
        return Histogram(f"{PREFIX}_{name}", doc, ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)


def _route_of(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"  # unknown paths share one label: no cardinality from scanners


_TRACE_HEADERS = (b"traceparent", b"tracestate")


class MetricsMiddleware:
    """Counts each request by its route template and final status, times it to its last byte, and traces it:
    its span (see the module docstring) is current while the app runs."""

    def __init__(self, app: Asgi, metrics: HttpMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope[TTFT_KEY] = start
        span, parent = _start_span(scope)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        status = [500]

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = _route_of(scope)
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
            _end_span(span, scope["method"], route, status[0])
            otel_context.detach(token)


def _start_span(scope: Scope) -> tuple[trace.Span, otel_context.Context]:
    """The request's span, a child of its `traceparent` header (a new trace without one), and that parent."""
    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in _TRACE_HEADERS}
    parent = propagate.extract(carrier)
    method = scope["method"]
    span = tracer().start_span(
        f"gateway {method}",
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": method, "url.path": scope["path"]},
    )
    return span, parent


def _end_span(span: trace.Span, method: str, route: str, status: int) -> None:
    span.update_name(f"gateway {method} {route}")  # the route template is known only once routed
    span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(status)))
    span.end()


def too_large(declared: int | None, limit: int) -> JSONResponse:
    size = f"{declared} bytes" if declared is not None else "over the limit"
    return JSONResponse(
        error_body(
            f"request body is {size}; the limit is {limit} bytes", "invalid_request_error", None, "request_too_large"
        ),
        413,
    )


class BodyLimit:
    """A request body over `limit_of(path)` bytes is 413: a declared Content-Length over it before a byte is
    read, a chunked body (no Content-Length) as soon as what arrived passes it; so the edge holds at most
    the limit plus one chunk of any request."""

    def __init__(self, app: Asgi, limit_of: Callable[[str], int]) -> None:
        self.app, self.limit_of = app, limit_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_of(scope["path"])
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > limit:
                await too_large(int(length), limit)(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:  # no length declared: read (and count) the whole body before the app sees any of it
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large(None, limit)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)
