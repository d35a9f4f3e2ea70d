"""The router: a gRPC front door with the workers' API that forwards each call to the worker owning its
user (docs/architecture.md, Routing). `personalize serve --role router`, and the front of `personalize up
--workers N`.

Per call: the router's own interceptors refuse it while draining, authenticate it (the tenant) and count
it against the tenant's rate; the handler takes the user from `x-user-id` metadata if present, else the
request's `user_id` (a request without `user_id` gets the header's), routes on `route_key(tenant,
user_id)` (service/client/cluster.py: owner first, bounded loads past a floor), and forwards the request with the
caller's `authorization` and `x-user-id` metadata unchanged, so the worker authenticates the same tenant.
The outgoing timeout is the incoming call's remaining time; a caller that goes away cancels the upstream
call. Idempotent calls (everything but ImportAdapter; GenerateStream until its first chunk;
SubmitFeedback because the router gives a key-less event an `event_key` first) are retried once on the
next worker when the first answers UNAVAILABLE. Upstream failures keep their status code and details.

Admin: `Stats` fans out to every live worker and returns their nodes (degraded when some did not answer);
`ListNodes` shows the membership view: node id, address, state (up, draining, or down for a worker that
failed calls just now), announced load and capacity.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter, Gauge, Histogram

from personalize.errors import DeadlineExceeded
from personalize.routing.ring import route_key
from personalize_service.client.cluster import Cluster, Upstream, gather_stats, node_list
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.server import base
from personalize_service.server.auth import METADATA_KEY, current_tenant
from personalize_service.server.base import NodeState, ServiceConfig, cancel_with_call, create, time_remaining
from personalize_service.server.limits import (
    DEFAULT_LIMITS,
    USER_ID_METADATA_KEY,
    Limits,
    grpc_message_options,
    user_id_of,
)
from personalize_service.server.metrics import PREFIX, ServiceMetrics
from personalize_service.server.observe import trace_metadata
from personalize_service.server.tls import channel_credentials

log = logging.getLogger(__name__)
T = TypeVar("T")

FORWARDED_METADATA = (METADATA_KEY, USER_ID_METADATA_KEY)
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

    def attempt(self, rpc: str, node: str, number: int, code: grpc.StatusCode, seconds: float) -> None:
        """Record one attempt (number 0 = first, 1 = retry) of `rpc` on `node`."""
        if number:
            self.retries.labels(rpc=rpc).inc()
        self.forwarded.labels(rpc=rpc, node=node, code=code.name).inc()
        self.upstream_seconds.labels(rpc=rpc).observe(seconds)


def forwarded_metadata(context: grpc.ServicerContext) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata that travels on to the worker: `authorization` and `x-user-id`, and the router's
    own span as `traceparent` (so the worker's spans are its children)."""
    caller = tuple((k, v) for k, v in context.invocation_metadata() or () if k in FORWARDED_METADATA)
    return (*caller, *trace_metadata())


def _code_of(exc: BaseException | None) -> grpc.StatusCode:
    if exc is None:
        return grpc.StatusCode.OK
    code = getattr(exc, "code", None)
    return code() if isinstance(exc, grpc.RpcError) and callable(code) else grpc.StatusCode.UNKNOWN


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


class RouterServicer(pb_grpc.PersonalizeServicer):
    """The app-facing API, forwarded to the owning worker."""

    def __init__(self, cluster: Cluster, limits: Limits = DEFAULT_LIMITS, metrics: RouterMetrics | None = None) -> None:
        self.cluster = cluster
        self.limits = limits
        self.metrics = metrics

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        return self._forward("Generate", request, context, retry=True)

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateChunk]:
        key, metadata = self._route(request, context)
        for attempt in self.cluster.attempts(key, retry=True):
            with attempt as upstream:
                start, error = time.perf_counter(), None
                call = upstream.api.GenerateStream(request, timeout=time_remaining(context), metadata=metadata)
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

    def SubmitFeedback(self, request: pb.FeedbackRequest, context: grpc.ServicerContext) -> pb.FeedbackAck:
        if not request.event_key:  # a retry on the next worker must not store the event twice
            request.event_key = uuid.uuid4().hex
        return self._forward("SubmitFeedback", request, context, retry=True)

    def GetAdapter(self, request: pb.GetAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterInfo:
        return self._forward("GetAdapter", request, context, retry=True)

    def DeleteUser(self, request: pb.DeleteUserRequest, context: grpc.ServicerContext) -> pb.DeleteUserResponse:
        return self._forward("DeleteUser", request, context, retry=True)

    def ExportAdapter(self, request: pb.ExportAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterBundle:
        return self._forward("ExportAdapter", request, context, retry=True)

    def ImportAdapter(self, request: pb.ImportAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterInfo:
        return self._forward("ImportAdapter", request, context, retry=False)  # each import is a new version

    def _route(self, request: Any, context: grpc.ServicerContext) -> tuple[str, tuple[tuple[str, Any], ...]]:
        """(routing key, metadata to forward); InvalidArgument for a bad or contradictory user id."""
        user_id = user_id_of(request, context, self.limits)
        if not request.user_id:
            request.user_id = user_id
        return route_key(current_tenant(), user_id), forwarded_metadata(context)

    def _forward(self, rpc: str, request: Any, context: grpc.ServicerContext, *, retry: bool) -> Any:
        key, metadata = self._route(request, context)
        for attempt in self.cluster.attempts(key, retry=retry):
            with attempt as upstream:
                start, error = time.perf_counter(), None
                future = getattr(upstream.api, rpc).future(request, timeout=time_remaining(context), metadata=metadata)
                cancel_with_call(context, future.cancel)
                try:
                    return future.result()
                except grpc.RpcError as exc:
                    error = exc
                    raise
                except grpc.FutureCancelledError:  # the caller went away or ran out of time: nobody waits
                    raise DeadlineExceeded(
                        f"{rpc} was cancelled: the caller went away or its deadline passed"
                    ) from None
                finally:
                    self._observe(rpc, upstream, attempt.number, error, start)
        raise AssertionError("unreachable: the last attempt never swallows its error")

    def _observe(self, rpc: str, upstream: Upstream, number: int, error: BaseException | None, start: float) -> None:
        if self.metrics is not None:
            self.metrics.attempt(rpc, upstream.node_id, number, _code_of(error), time.perf_counter() - start)


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
    servicer = RouterServicer(cluster, config.limits, router_metrics)

    def register(server: grpc.Server, port: int, state: NodeState) -> None:
        pb_grpc.add_PersonalizeServicer_to_server(servicer, server)
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


def worker_channel_opener(router: RouterConfig, limits: Limits = DEFAULT_LIMITS) -> Callable[[str], grpc.Channel]:
    """How the router dials a worker: messages as large as an import may be (`limits`); TLS when
    `router.upstream_ca` is set (mutual with upstream_cert/upstream_key), else plaintext."""
    options: Sequence[tuple[str, Any]] = [*grpc_message_options(limits), *RECONNECT_OPTIONS]
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
