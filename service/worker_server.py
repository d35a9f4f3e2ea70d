"""The worker's gRPC server: Personalize and Admin handlers over a `personalize.worker.Worker`.

Handlers are thin: translate the request (service/convert.py, which also enforces the limits), call the
worker with the caller's tenant (`current_tenant()`, set by the auth interceptor), translate back. Domain
errors become status codes in the error interceptor, never here.

    server, port = create_server(ServiceConfig(port=0), worker)   # tests; health stays NOT_SERVING
    serve(ServiceConfig(), worker, stop=threading.Event())        # the CLI: until SIGTERM/SIGINT
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from personalize.errors import InvalidArgument
from personalize.feedback.events import FeedbackEvent
from personalize.worker import Generation, Worker
from personalize_service import convert
from personalize_service.announce import AnnounceConfig, Announcement, advertised_address
from personalize_service.auth import ApiKeys, current_tenant
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.interceptors import Drain, server_interceptors
from personalize_service.limits import (
    DEFAULT_LIMITS,
    MAX_QUEUED_PER_THREAD,
    ConcurrencyLimiter,
    Limits,
    RateLimiter,
    check_user_id,
    grpc_message_options,
)
from personalize_service.metrics import MetricsServer, ServiceMetrics, start_metrics_server
from personalize_service.tls import bind

log = logging.getLogger(__name__)

PERSONALIZE_SERVICE = pb.DESCRIPTOR.services_by_name["Personalize"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name
HEALTH_SERVICE = health.SERVICE_NAME
SERVICE_NAMES = (PERSONALIZE_SERVICE, ADMIN_SERVICE, HEALTH_SERVICE)
"""Services this server registers (and lists through reflection)."""


@dataclass(frozen=True)
class ServiceConfig:
    """How the worker's gRPC server listens and what it lets callers do."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 50051
    """TCP port; 0 picks a free one (create_server returns it)."""
    limits: Limits = DEFAULT_LIMITS
    """Request size, rate and concurrency limits."""
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    """API key -> tenant; empty = every caller is tenant `default`."""
    metrics_port: int = 0
    """Prometheus /metrics HTTP port on `host`; 0 = off."""
    grace_s: float = 10.0
    """On shutdown, seconds in-flight calls get to finish before they are cancelled."""
    threads: int = 1024
    """Handler threads, i.e. calls served at once (a Generate holds one until its result); started on demand,
    4x the per-tenant concurrency limit so one tenant never holds them all."""
    advertise: str = ""
    """host:port routers dial to reach this server; empty = host:port (the hostname for a wildcard host)."""
    tls_cert: str = ""
    """PEM certificate chain file; set with tls_key to serve TLS instead of plaintext."""
    tls_key: str = ""
    """PEM private key file of tls_cert."""
    tls_client_ca: str = ""
    """PEM CA file: callers must present a certificate it signed (mutual TLS); empty = no client certs."""
    upstream_ca: str = ""
    """Router: PEM CA that signed the workers' certificates; set = dial workers over TLS."""
    upstream_cert: str = ""
    """Router: PEM client certificate presented to workers (mutual TLS), with upstream_key."""
    upstream_key: str = ""
    """Router: PEM private key of upstream_cert."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise InvalidArgument(f"ports must be in [0, 65535], got port={self.port}, "
                                  f"metrics_port={self.metrics_port}")
        if not self.grace_s >= 0:
            raise InvalidArgument(f"grace_s must be >= 0 seconds, got {self.grace_s}")
        if self.threads < 1:
            raise InvalidArgument(f"threads must be >= 1, got {self.threads}")
        if not self.host:
            raise InvalidArgument("host must be an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_NO_DEADLINE_S = 365 * 24 * 3600.0
"""Beyond this, a call's remaining time means "no deadline" (grpc reports ~9e18 s, which waits reject)."""


def time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds until the call's deadline, None if it has none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


def _cancel_with_call(context: grpc.ServicerContext, generation: Generation) -> None:
    """Cancel `generation` when the call ends early (client cancel, deadline, server stop): the engine
    drops it at its next step. A call that already ended cancels it now."""
    if not context.add_callback(generation.cancel):
        generation.cancel()


class PersonalizeServicer(pb_grpc.PersonalizeServicer):
    """The app-facing API over one worker."""

    def __init__(self, worker: Worker, limits: Limits = DEFAULT_LIMITS) -> None:
        self.worker = worker
        self.limits = limits
        self.concurrency = ConcurrencyLimiter(limits)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        args = convert.generate_args(request, self.limits)
        tenant = current_tenant()
        with self.concurrency.hold(tenant):
            generation = self.worker.generate(tenant, args.user_id, args.prompt, args.params, args.use_base_model)
            _cancel_with_call(context, generation)
            result = generation.result(timeout=time_remaining(context))
        return convert.generate_response(result, generation.info)

    def GenerateStream(self, request: pb.GenerateRequest,
                       context: grpc.ServicerContext) -> Iterator[pb.GenerateChunk]:
        args = convert.generate_args(request, self.limits)
        tenant = current_tenant()
        with self.concurrency.hold(tenant):
            generation = self.worker.generate(tenant, args.user_id, args.prompt, args.params, args.use_base_model)
            _cancel_with_call(context, generation)
            try:
                for piece in generation:
                    yield convert.text_chunk(piece)
            except GeneratorExit:  # grpc dropped the stream (client gone): stop generating at once
                generation.cancel()
                raise
            result = generation.result(timeout=time_remaining(context))
        yield convert.final_chunk(result, generation.info)

    def SubmitFeedback(self, request: pb.FeedbackRequest, context: grpc.ServicerContext) -> pb.FeedbackAck:
        a = convert.feedback_args(request, self.limits)
        event = FeedbackEvent(current_tenant(), a.user_id, a.kind, a.prompt, a.completion, a.correction,
                              a.rejected, a.event_key)
        event_id, partition = self.worker.submit_feedback(event)  # returns only after the durable append
        return convert.feedback_ack(event_id, partition)

    def GetAdapter(self, request: pb.GetAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterInfo:
        user_id = check_user_id(request.user_id, self.limits)
        return convert.adapter_info(self.worker.get_adapter(current_tenant(), user_id))

    def DeleteUser(self, request: pb.DeleteUserRequest,
                   context: grpc.ServicerContext) -> pb.DeleteUserResponse:
        user_id = check_user_id(request.user_id, self.limits)
        versions, events = self.worker.delete_user(current_tenant(), user_id)
        return convert.delete_response(versions, events)

    def ExportAdapter(self, request: pb.ExportAdapterRequest,
                      context: grpc.ServicerContext) -> pb.AdapterBundle:
        args = convert.export_args(request, self.limits)
        files, info = self.worker.export_adapter(current_tenant(), args.user_id, args.version)
        return convert.adapter_bundle(files, info)

    def ImportAdapter(self, request: pb.ImportAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterInfo:
        args = convert.import_args(request, self.limits)
        return convert.adapter_info(self.worker.import_adapter(current_tenant(), args.user_id, args.files))


class NodeState:
    """Whether this node takes calls: drives the gRPC health service, ListNodes' `state`, and the drain
    that refuses new calls (UNAVAILABLE) during shutdown."""

    def __init__(self) -> None:
        self.health = health.HealthServicer()
        self.drain = Drain()
        self.state = "starting"
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    def serving(self) -> None:
        """The model is loaded and the worker started."""
        self.state = "up"
        self._set(health_pb2.HealthCheckResponse.SERVING)

    def draining(self) -> None:
        """Shutting down: health says NOT_SERVING so balancers stop sending calls, new calls are refused,
        in-flight ones finish."""
        self.state = "draining"
        self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.drain.start()

    def _set(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)  # type: ignore[arg-type]


class AdminServicer(pb_grpc.AdminServicer):
    """Operator API for this one node (the router's Admin aggregates nodes)."""

    def __init__(self, worker: Worker, address: str, state: NodeState) -> None:
        self.worker = worker
        self.address = address
        self.state = state

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return convert.stats_response([self.worker.stats()])

    def ListNodes(self, request: pb.ListNodesRequest, context: grpc.ServicerContext) -> pb.ListNodesResponse:
        engine = self.worker.engine
        node = pb.Node(node_id=self.worker.node_id, address=self.address, state=self.state.state,
                       load=engine.running + engine.queue_depth, capacity=engine.config.max_batch)
        return pb.ListNodesResponse(nodes=[node])


def create_server(config: ServiceConfig, worker: Worker, metrics: ServiceMetrics | None = None,
                  state: NodeState | None = None) -> tuple[grpc.Server, int]:
    """A bound, not yet started server with both APIs, health checking and reflection; returns it and its
    port. Health answers NOT_SERVING until `state.serving()` (pass a NodeState to drive it).

    Raises OSError if the address cannot be bound (port taken).
    """
    state = state or NodeState()
    options = [*grpc_message_options(config.limits), ("grpc.so_reuseport", 0)]  # a taken port must fail
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="grpc"),
                         interceptors=server_interceptors(config.api_keys, RateLimiter(config.limits), metrics,
                                                          state.drain),
                         options=options, maximum_concurrent_rpcs=MAX_QUEUED_PER_THREAD * config.threads)
    port = bind(server, config.address, config.tls_cert, config.tls_key, config.tls_client_ca)
    pb_grpc.add_PersonalizeServicer_to_server(PersonalizeServicer(worker, config.limits), server)
    address = advertised_address(config.host, port, config.advertise)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(worker, address, state), server)
    health_pb2_grpc.add_HealthServicer_to_server(state.health, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME), server)
    return server, port


# ---- metrics -----------------------------------------------------------------------------------------

class MetricsRefresher:
    """Copies the worker's counters (cache hits/misses, loads, tokens, batch occupancy, queue depth) into
    `metrics` every `period_s`, on a daemon thread, as increments since the previous copy."""

    def __init__(self, metrics: ServiceMetrics, worker: Worker, period_s: float = 1.0) -> None:
        self.metrics, self.worker, self.period_s = metrics, worker, period_s
        self._hits: dict[str, int] = {}
        self._misses: dict[str, int] = {}
        self._tokens = self._steps = self._occupancy = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-refresh", daemon=True)

    def start(self) -> MetricsRefresher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.refresh()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.refresh()
            except Exception:  # a metrics hiccup must never take the server down
                log.exception("metrics refresh failed")

    def refresh(self) -> None:
        """Apply the changes since the last call."""
        m, stats, engine = self.metrics, self.worker.stats(), self.worker.engine
        for tier, count in stats.hits.items():
            m.cache_hits.labels(tier=tier).inc(count - self._hits.get(tier, 0))
        for tier, count in stats.misses.items():
            m.cache_misses.labels(tier=tier).inc(count - self._misses.get(tier, 0))
        self._hits, self._misses = dict(stats.hits), dict(stats.misses)
        for tier, seconds in self.worker.cache.take_load_samples():
            m.adapter_load_seconds.labels(tier=tier).observe(seconds)
        tokens, steps, occupancy = engine.tokens_generated, engine.steps, engine.occupancy_sum
        m.tokens_generated.inc(tokens - self._tokens)
        if steps > self._steps:  # per-step values are not kept: each step of the period gets its mean
            mean = (occupancy - self._occupancy) / (steps - self._steps)
            for _ in range(steps - self._steps):
                m.batch_occupancy.observe(mean)
        self._tokens, self._steps, self._occupancy = tokens, steps, occupancy
        m.queue_depth.set(stats.queue_depth)
        m.feedback_stream_lag.set(stats.stream_lag)


# ---- running until a signal ----------------------------------------------------------------------------

@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT set `stop`; a second signal raises KeyboardInterrupt (so an
    impatient Ctrl-C still unwinds and cleans up). Main thread only; previous handlers are restored."""
    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_metrics_http(config: ServiceConfig, metrics: ServiceMetrics, server: grpc.Server) -> MetricsServer | None:
    """The /metrics endpoint if configured; OSError (after stopping `server`) if its port is taken."""
    if not config.metrics_port:
        return None
    try:
        return start_metrics_server(metrics.registry, config.metrics_port, config.host)
    except OSError as exc:
        server.stop(None)
        raise OSError(f"cannot serve metrics on {config.host}:{config.metrics_port}: {exc.strerror}") from exc


_REFUSAL_GRACE_S = 1.0
"""Time that refusals already in progress get to reach their callers when the server stops."""


def drain_and_stop(server: grpc.Server, state: NodeState, grace_s: float) -> None:
    """Graceful stop: health NOT_SERVING and new calls refused with UNAVAILABLE, calls in flight get up to
    `grace_s` to finish (the rest are cancelled), then the server stops listening."""
    state.draining()
    log.info("draining: refusing new calls, waiting up to %gs for %d in flight", grace_s, state.drain.active)
    idle = state.drain.wait_idle(grace_s)
    if not idle:
        log.warning("grace period over: cancelling %d calls still in flight", state.drain.active)
    server.stop(_REFUSAL_GRACE_S if idle else 0).wait()  # 0 cancels what is left


def serve(config: ServiceConfig, worker: Worker, stop: threading.Event, metrics: ServiceMetrics | None = None,
          on_ready: Callable[[int, int], None] | None = None, announce: AnnounceConfig | None = None) -> None:
    """Start the worker and the server, report SERVING, and block until `stop` is set; then shut down
    gracefully: announce DRAINING (with `announce`), health NOT_SERVING and new calls refused with
    UNAVAILABLE, calls in flight finish (those still running after grace_s are cancelled), the server stops
    listening, the node leaves membership, then the worker stops. `on_ready(port, metrics_port)` runs once
    SERVING (metrics_port 0 = off). The worker is stopped when this returns or raises.

    With `announce`, the node heartbeats into membership (node id = the worker's, address = the advertised
    one, capacity = engine max_batch, load = running + queued) so routers put it on their ring.

    Raises OSError if the port or metrics port cannot be bound (nothing is left running then), Unavailable
    if membership cannot be reached at start.
    """
    metrics = metrics or ServiceMetrics()
    state = NodeState()
    try:
        server, port = create_server(config, worker, metrics, state)
        http = start_metrics_http(config, metrics, server)
    except BaseException:
        worker.stop()
        raise
    refresher = MetricsRefresher(metrics, worker).start()
    worker.start()
    server.start()
    announcement: Announcement | None = None
    try:
        if announce is not None:
            announcement = _announce(announce, worker, advertised_address(config.host, port, config.advertise))
        state.serving()
        log.info("serving on %s:%d (node %s)", config.host, port, worker.node_id)
        if on_ready is not None:
            on_ready(port, http.port if http else 0)
        while not stop.wait(0.5):
            pass
    finally:
        if announcement is not None:
            announcement.drain()
        drain_and_stop(server, state, config.grace_s)
        if announcement is not None:
            announcement.leave()
        refresher.stop()
        worker.stop()
        if http is not None:
            http.stop()
        log.info("stopped")


def _announce(config: AnnounceConfig, worker: Worker, address: str) -> Announcement:
    """Join membership as `worker` at `address`; from then on only the users it owns are prefetched."""
    engine = worker.engine
    announcement = Announcement(config, worker.node_id, float(engine.config.max_batch),
                                load_fn=lambda: float(engine.running + engine.queue_depth))
    announcement.hot_fn = worker.cache.hottest
    announcement.warm_fn = worker.warm
    announcement.start(address)
    worker.owns = announcement.owns
    return announcement
