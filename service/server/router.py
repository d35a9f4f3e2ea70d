"""The router: a gRPC front door with the workers' API that forwards each call to the worker owning its
user (docs/architecture.md, Routing). `personalize serve --role router`, and the front of `personalize up
--workers N`.

Per call: the router's own interceptors refuse it while draining, authenticate it (the tenant) and count
it against the tenant's rate; the handler (a generic one: request and responses stay bytes) takes the user
from `x-user-id` metadata if present, else from the body's `user_id` field alone (service/server/wire.py),
routes on `route_key(tenant, user_id)` (service/client/cluster.py: owner first, bounded loads past a floor),
and forwards the bytes with the caller's `authorization`, `x-user-id` and trace-context metadata
unchanged, so the worker authenticates the same tenant. With `x-user-id` the body is never parsed: its
first field is compared (a leading user_id that differs is INVALID_ARGUMENT) and the header's user_id is
appended, so whatever else the body holds, the worker serves the user the call was routed by.
The outgoing timeout is the incoming call's remaining time; a caller that goes away cancels the upstream
call. Idempotent calls (everything but ImportAdapter; GenerateStream until its first chunk;
SubmitFeedback because the router gives a key-less event an `event_key` first) are retried once on the
next worker when the first answers UNAVAILABLE. Upstream failures keep their status code, and their
details unless these name an address, a path or a URL (a transport error's "ipv4:10.0.0.7:50051: Connection
refused"): then the caller learns which component failed, and the router log the rest.

Admin: `Stats` fans out to every live worker and returns their nodes (degraded when some did not answer);
`ListNodes` shows the membership view: node id, address, state (up, draining, or down for a worker that
failed calls just now), announced load and capacity.
"""

from __future__ import annotations

import itertools
import logging
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from prometheus_client import Counter, Gauge, Histogram

from personalize.errors import DeadlineExceeded, InvalidArgument
from personalize.routing.ring import route_key
from personalize_service.client.cluster import Cluster, Upstream, gather_stats, node_list
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.server import base, wire
from personalize_service.server.auth import METADATA_KEY, current_tenant
from personalize_service.server.base import NodeState, ServiceConfig, cancel_with_call, create, time_remaining
from personalize_service.server.limits import (
    DEFAULT_LIMITS,
    USER_ID_METADATA_KEY,
    Limits,
    check_user_id,
    grpc_message_options,
)
from personalize_service.server.metrics import PREFIX, ServiceMetrics
from personalize_service.server.observe import trace_metadata
from personalize_service.server.tls import channel_credentials

log = logging.getLogger(__name__)
T = TypeVar("T")

FORWARDED_METADATA = (METADATA_KEY, USER_ID_METADATA_KEY, "traceparent", "tracestate")
"""Metadata the router passes on to the worker, unchanged."""
STATS_TIMEOUT_S = 10.0
"""Longest a Stats fan-out waits for the workers (less when the caller's deadline is nearer)."""
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouterMetrics:
    """The router's own metrics, in the registry of its ServiceMetrics (whose requests_total and
    request_seconds already count the calls as the router's callers see them):

        router_forwarded_total{rpc,node,code}   attempts sent to a worker, by its answer's status
        router_retries_total{rpc}               calls sent again to the next worker after UNAVAILABLE
        router_upstream_seconds{rpc}            one attempt's time, router to worker and back
        router_workers                          serving workers on the ring
    """

    def __init__(self, metrics: ServiceMetrics) -> None:
        r = metrics.registry
        self.forwarded = Counter(
            f"{PREFIX}_router_forwarded",
            "Calls the router sent to a worker, by status.",
            ["rpc", "node", "code"],
            registry=r,
        )
        self.retries = Counter(
            f"{PREFIX}_router_retries", "Calls retried on the next worker after UNAVAILABLE.", ["rpc"], registry=r
        )
        self.upstream_seconds = Histogram(
            f"{PREFIX}_router_upstream_seconds",
            "Seconds of one forwarded attempt, router to worker and back.",
            ["rpc"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.workers = Gauge(f"{PREFIX}_router_workers", "Serving workers on the router's ring.", registry=r)
        self._children: dict[tuple[str, str, grpc.StatusCode], tuple[Any, Any]] = {}
        """(rpc, node, code) -> the forwarded and upstream_seconds children `attempt` counts in."""

    def attempt(self, rpc: str, node: str, number: int, code: grpc.StatusCode, seconds: float) -> None:
        """Record one attempt (number 0 = first, 1 = retry) of `rpc` on `node`."""
        if number:
            self.retries.labels(rpc=rpc).inc()
        children = self._children.get((rpc, node, code))
        if children is None:  # labels() takes a lock and builds a key each call: look each triple up once
            forwarded = self.forwarded.labels(rpc=rpc, node=node, code=code.name)
            children = (forwarded, self.upstream_seconds.labels(rpc=rpc))
            self._children[(rpc, node, code)] = children
        children[0].inc()
        children[1].observe(seconds)


def forwarded_metadata(context: grpc.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata that travels on to the worker: `authorization`, `x-user-id` and trace context —
    the router's own span as `traceparent` when it has one (so the worker's spans are its children), else
    the caller's."""
    caller = tuple((k, v) for k, v in context.invocation_metadata() or () if k in FORWARDED_METADATA)
    own = trace_metadata()
    if own:
        caller = tuple((k, v) for k, v in caller if k not in ("traceparent", "tracestate"))
    return (*caller, *own)


def _code_of(exc: BaseException | None) -> grpc.StatusCode:
    if exc is None:
        return grpc.StatusCode.OK
    code = getattr(exc, "code", None)
    return code() if isinstance(exc, grpc.RpcError) and callable(code) else grpc.StatusCode.UNKNOWN


_INTERNAL_DETAIL = re.compile(
    r"ipv[46]:|unix:|dns:|\w+://|\b\d{1,3}(?:\.\d{1,3}){3}\b|\[[0-9a-fA-F]*:[0-9a-fA-F:]*\]|[\w.-]+:\d{2,5}\b|(?:^|\s)/\w"
)
"""What must not reach a caller: addresses (ipv4:, [::1], host:port), socket paths, URLs, absolute paths."""
_COMPONENT_FAILED = {
    grpc.StatusCode.UNAVAILABLE: "the worker serving this user is unreachable; retry shortly",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the worker serving this user did not answer before the deadline",
}


class UpstreamError(grpc.RpcError):
    """A worker's failure as the router's caller gets it: the worker's code, details fit for the caller."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def public_error(rpc: str, exc: grpc.RpcError) -> UpstreamError:
    """`exc` (a forwarded call's failure) with its details replaced by the failing component when they name
    internal addresses, paths or URLs; the original goes to the log."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if callable(getattr(exc, "details", None)) else "") or ""
    if not _INTERNAL_DETAIL.search(details):
        return UpstreamError(code, details)
    log.warning("%s: upstream %s: %s", rpc, code.name, details)
    generic = f"the worker serving this user failed the call ({code.name}); the router log has the details"
    return UpstreamError(code, _COMPONENT_FAILED.get(code, generic))


_END = object()


def _relay(call: Any, context: grpc.ServicerContext, poll_s: float = 0.05) -> Iterator[Any]:
    """The upstream stream's messages, read on a helper thread so that a caller going away is noticed while
    the worker is still thinking (grpc does not always run termination callbacks of a handler blocked on
    another call): then the upstream call is cancelled and the relay ends."""
    messages: queue.Queue[Any] = queue.Queue()

    def pump() -> None:
        try:
            for message in call:
                messages.put(message)
            messages.put(_END)
        except grpc.RpcError as exc:
            messages.put(exc)

    threading.Thread(target=pump, name="relay", daemon=True).start()
    while True:
        try:
            item = messages.get(timeout=poll_s)
        except queue.Empty:
            if not context.is_active():
                call.cancel()
                return
            continue
        if item is _END:
            return
        if isinstance(item, grpc.RpcError):
            raise item
        yield item


SERVICE = pb.DESCRIPTOR.services_by_name["Personalize"].full_name
"""The app-facing service the router forwards, method by method, as bytes."""
RETRIED = {
    "Generate": True,
    "GenerateStream": True,
    "SubmitFeedback": True,
    "GetAdapter": True,
    "DeleteUser": True,
    "ExportAdapter": True,
    "ImportAdapter": False,  # each import is a new version
}
"""Whether a method is sent again to the next worker after UNAVAILABLE (a stream only before its first chunk)."""
IMPORT_STREAM = "ImportAdapterStream"
"""The client-streaming import: forwarded chunk by chunk, never retried (RouterHandler._import_stream)."""
USER_ID_FIELD = 1
"""`user_id`'s field number in every request of the Personalize service."""
EVENT_KEY_FIELD = pb.FeedbackRequest.DESCRIPTOR.fields_by_name["event_key"].number


class RouterHandler(grpc.GenericRpcHandler):
    """The app-facing API, forwarded to the owning worker as bytes: the request body is never
    deserialized (no deserializer, no serializer: grpc hands over and takes raw bytes). The routing key
    comes from `x-user-id` metadata when present, else from the body's user_id field alone (`wire`)."""

    def __init__(self, cluster: Cluster, limits: Limits = DEFAULT_LIMITS, metrics: RouterMetrics | None = None) -> None:
        self.cluster = cluster
        self.limits = limits
        self.metrics = metrics
        self._callables: dict[tuple[int, str], tuple[grpc.Channel, Any]] = {}
        self._handlers = {f"/{SERVICE}/{rpc}": self._handler(rpc) for rpc in RETRIED}
        self._handlers[f"/{SERVICE}/{IMPORT_STREAM}"] = grpc.stream_unary_rpc_method_handler(self._import_stream)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self._handlers.get(handler_call_details.method)

    def _handler(self, rpc: str) -> grpc.RpcMethodHandler:
        if rpc == "GenerateStream":
            return grpc.unary_stream_rpc_method_handler(self._public_stream)
        retry = RETRIED[rpc]
        return grpc.unary_unary_rpc_method_handler(lambda body, context: self._public(rpc, body, context, retry))

    def _public(self, rpc: str, body: bytes, context: grpc.ServicerContext, retry: bool) -> bytes:
        try:
            return self._forward(rpc, body, context, retry)
        except grpc.RpcError as exc:
            raise public_error(rpc, exc) from None

    def _public_stream(self, body: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            yield from self._stream(body, context)
        except grpc.RpcError as exc:
            raise public_error("GenerateStream", exc) from None

    def _route(self, rpc: str, body: bytes, context: grpc.ServicerContext) -> tuple[str, bytes, tuple[Any, ...]]:
        """(routing key, body to send, metadata to forward); InvalidArgument for a bad or contradictory
        user id. With `x-user-id`, the body gets that user_id appended (protobuf: the last value wins), so
        the worker serves exactly the user the call was routed by, whatever the body said further on."""
        metadata = forwarded_metadata(context)
        from_metadata = next((v for k, v in metadata if k == USER_ID_METADATA_KEY), None)
        if from_metadata is not None:
            user_id = check_user_id(str(from_metadata), self.limits)
            leading = wire.leading_string(body, USER_ID_FIELD)
            if leading is not None and leading != user_id:
                raise InvalidArgument(
                    f"{USER_ID_METADATA_KEY} metadata {user_id!r} differs from the request's user_id {leading!r}"
                )
            body += wire.string_field(USER_ID_FIELD, user_id)
        else:
            user_id = check_user_id(wire.last_string(body, USER_ID_FIELD), self.limits)
        if rpc == "SubmitFeedback":
            body = _with_event_key(body)
        return route_key(current_tenant(), user_id), body, metadata

    def _callable(self, upstream: Upstream, rpc: str) -> Any:
        """The channel's bytes-in, bytes-out method `rpc` (made once per channel), always as a unary-stream
        call: on a channel opened with SingleThreadedUnaryStream (worker_channel_opener) such a call runs
        on the thread that reads it, with no hand-off to grpc's channel thread (a unary `future` costs one
        each way), and stays cancellable from the caller's termination callback. The wire does not tell a
        unary answer from a stream of one message, so a unary method is called the same way."""
        key = (id(upstream.channel), rpc)
        entry = self._callables.get(key)
        if entry is None or entry[0] is not upstream.channel:  # an id is reused once its channel is gone
            entry = (upstream.channel, upstream.channel.unary_stream(f"/{SERVICE}/{rpc}"))
            self._callables[key] = entry
        return entry[1]

    def _stream(self, body: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        key, body, metadata = self._route("GenerateStream", body, context)
        for attempt in self.cluster.attempts(key, retry=True):
            with attempt as upstream:
                start, error = time.perf_counter(), None
                method = self._callable(upstream, "GenerateStream")
                call = method(body, timeout=time_remaining(context), metadata=metadata)
                cancel_with_call(context, call.cancel)
                try:
                    for chunk in _relay(call, context):
                        attempt.commit()  # part of the answer went out: never resend
                        yield chunk
                    return
                except grpc.RpcError as exc:
                    error = exc
                    raise
                finally:
                    call.cancel()  # a no-op once finished; stops the worker when the caller went away
                    self._observe("GenerateStream", upstream, attempt.number, error, start)

    def _forward(self, rpc: str, body: bytes, context: grpc.ServicerContext, retry: bool) -> bytes:
        key, body, metadata = self._route(rpc, body, context)
        for attempt in self.cluster.attempts(key, retry=retry):
            with attempt as upstream:
                start, error = time.perf_counter(), None
                method = self._callable(upstream, rpc)
                call = method(body, timeout=time_remaining(context), metadata=metadata)
                cancel_with_call(context, call.cancel)
                try:
                    return _only(call, rpc)
                except grpc.RpcError as exc:
                    error = exc
                    raise
                finally:
                    self._observe(rpc, upstream, attempt.number, error, start)
        raise AssertionError("unreachable: the last attempt never swallows its error")

    def _observe(self, rpc: str, upstream: Upstream, number: int, error: BaseException | None, start: float) -> None:
        if self.metrics is not None:
            self.metrics.attempt(rpc, upstream.node_id, number, _code_of(error), time.perf_counter() - start)

    def _import_stream(self, chunks: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """ImportAdapterStream to the user's worker, each chunk passed on as it arrives (never held whole):
        routed by `x-user-id`, else by the first chunk's user_id (read before anything is sent). The worker
        holds every chunk to the header, as it does a unary call's body. Never retried: a new version."""
        try:
            metadata = forwarded_metadata(context)
            header = next((v for k, v in metadata if k == USER_ID_METADATA_KEY), None)
            first: list[bytes] = []
            if header is None:
                first = [next(chunks, b"")]
                user_id = check_user_id(wire.last_string(first[0], USER_ID_FIELD), self.limits)
            else:
                user_id = check_user_id(str(header), self.limits)
            key = route_key(current_tenant(), user_id)
            for attempt in self.cluster.attempts(key, retry=False):
                with attempt as upstream:
                    start, error = time.perf_counter(), None
                    method = upstream.channel.stream_unary(f"/{SERVICE}/{IMPORT_STREAM}")
                    future = method.future(
                        itertools.chain(first, chunks), timeout=time_remaining(context), metadata=metadata
                    )
                    cancel_with_call(context, future.cancel)
                    try:
                        return cast(bytes, future.result())
                    except grpc.RpcError as exc:
                        error = exc
                        raise
                    except grpc.FutureCancelledError:
                        raise DeadlineExceeded(f"{IMPORT_STREAM} was cancelled: the caller went away") from None
                    finally:
                        self._observe(IMPORT_STREAM, upstream, attempt.number, error, start)
        except grpc.RpcError as exc:
            raise public_error(IMPORT_STREAM, exc) from None
        raise AssertionError("unreachable: the only attempt never swallows its error")


def _only(call: Iterator[bytes], rpc: str) -> bytes:
    """The one answer of a unary method called as a stream (RouterHandler._callable), read on this thread."""
    answers = list(call)
    if len(answers) != 1:
        raise UpstreamError(grpc.StatusCode.INTERNAL, f"the worker answered {rpc} with {len(answers)} messages, not 1")
    return answers[0]


def _with_event_key(body: bytes) -> bytes:
    """`body` with a fresh event_key appended when it has none, so a retry on the next worker cannot store
    the event twice; a body that does not parse goes on unchanged (the worker refuses it)."""
    try:
        if wire.last_string(body, EVENT_KEY_FIELD):
            return body
    except InvalidArgument:
        return body
    return body + wire.string_field(EVENT_KEY_FIELD, uuid.uuid4().hex)


class RouterAdminServicer(pb_grpc.AdminServicer):
    """Operator API over every worker."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        remaining = time_remaining(context)
        timeout = STATS_TIMEOUT_S if remaining is None else min(remaining, STATS_TIMEOUT_S)
        return gather_stats(self.cluster, timeout, forwarded_metadata(context))

    def ListNodes(self, request: pb.ListNodesRequest, context: grpc.ServicerContext) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=node_list(self.cluster))


def create_router(
    config: ServiceConfig,
    cluster: Cluster,
    metrics: ServiceMetrics | None = None,
    state: NodeState | None = None,
    router_metrics: RouterMetrics | None = None,
) -> tuple[grpc.Server, int]:
    """A bound, not yet started router server (Personalize, Admin, health, reflection) over `cluster`;
    returns it and its port. Health answers NOT_SERVING until `state.serving()`. `router_metrics` defaults
    to new ones in `metrics`' registry (when given).

    Raises OSError if the address cannot be bound.
    """
    if router_metrics is None and metrics is not None:
        router_metrics = RouterMetrics(metrics)
    handler = RouterHandler(cluster, config.limits, router_metrics)

    def register(server: grpc.Server, port: int, state: NodeState) -> None:
        server.add_generic_rpc_handlers((handler,))
        pb_grpc.add_AdminServicer_to_server(RouterAdminServicer(cluster), server)

    return create(config, register, metrics, state, "router")


@dataclass(frozen=True)
class RouterConfig:
    """How the router dials its workers (how it listens is its ServiceConfig, as for a worker)."""

    upstream_ca: str = ""
    """PEM CA that signed the workers' certificates; set = dial workers over TLS."""
    upstream_cert: str = ""
    """PEM client certificate presented to workers (mutual TLS), with upstream_key."""
    upstream_key: str = ""
    """PEM private key of upstream_cert."""


RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
"""A worker the router could not reach (restarting, partitioned) is tried again within 2 s, not gRPC's
default of up to 120 s of backoff: its users go back to it soon after it answers again."""


LATENCY_OPTIONS = ((grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),)
"""Unary-stream calls (how the router forwards every method, RouterHandler._callable) run on the calling
thread: a forwarded call never waits for grpc's channel thread to pass its answer on (0.36 ms of the
router's hop on the 2-core VM, docs/benchmarks.md)."""


def worker_channel_opener(router: RouterConfig, limits: Limits = DEFAULT_LIMITS) -> Callable[[str], grpc.Channel]:
    """How the router dials a worker: messages as large as an import may be (`limits`); TLS when
    `router.upstream_ca` is set (mutual with upstream_cert/upstream_key), else plaintext."""
    options: Sequence[tuple[str, Any]] = [*grpc_message_options(limits), *RECONNECT_OPTIONS, *LATENCY_OPTIONS]
    if not router.upstream_ca and not router.upstream_cert and not router.upstream_key:
        return lambda address: grpc.insecure_channel(address, options=list(options))
    credentials = channel_credentials(router.upstream_ca, router.upstream_cert, router.upstream_key)
    return lambda address: grpc.secure_channel(address, credentials, options=list(options))


class RouterRole:
    """The router around the shared server lifecycle (base.serve): the membership watch and its gauge."""

    name = "router"

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.metrics: RouterMetrics | None = None

    def create(self, config: ServiceConfig, metrics: ServiceMetrics, state: NodeState) -> tuple[grpc.Server, int]:
        self.metrics = RouterMetrics(metrics)
        return create_router(config, self.cluster, metrics, state, self.metrics)

    def start(self) -> None:
        self.cluster.start()

    def started(self, port: int) -> None:
        log.info("router over %d workers", len(self.cluster.ring()))

    def tick(self) -> None:
        if self.metrics is not None:
            self.metrics.workers.set(len(self.cluster.ring()))

    def draining(self) -> None:
        pass

    def stop(self) -> None:
        self.cluster.stop()


def serve_router(
    config: ServiceConfig,
    cluster: Cluster,
    stop: threading.Event,
    metrics: ServiceMetrics | None = None,
    on_ready: Callable[[int, int], None] | None = None,
) -> None:
    """Start watching membership and serving, report SERVING, block until `stop` is set, then drain (like
    a worker: new calls refused, calls in flight get grace_s) and stop watching (base.serve). `on_ready(port,
    metrics_port)` runs once SERVING.

    Raises OSError if a port cannot be bound.
    """
    base.serve(config, RouterRole(cluster), stop, metrics, on_ready)
