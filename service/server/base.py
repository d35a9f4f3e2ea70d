"""What every gRPC server of this service shares: how it listens (`ServiceConfig`), whether it takes
calls (`NodeState`), and one create/serve/drain for the worker's and the router's servicers.

    server, port = create(config, register, metrics, state, "grpc")   # bound, not started
    serve(config, role, stop)                                          # until `stop`, then drain

A `Role` is what differs between the worker and the router: the servicers it registers and what it starts
and stops around the server (the worker and its announcement; the router's membership watch).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from personalize import valkey
from personalize.adapters.registry import RegistryConfig
from personalize.errors import InvalidArgument
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.server.auth import ApiKeys
from personalize_service.server.interceptors import Drain, server_interceptors
from personalize_service.server.leases import SharedConcurrencyLimiter
from personalize_service.server.limits import (
    DEFAULT_LIMITS,
    MAX_QUEUED_PER_THREAD,
    ConcurrencyLimiter,
    FeedbackQuota,
    Limits,
    RateLimiter,
    SharedRateLimiter,
    grpc_server_options,
)
from personalize_service.server.metrics import MetricsServer, ServiceMetrics, start_metrics_server
from personalize_service.server.observe import ObserveInterceptor, open_access_log, otlp_traces_url, setup_tracing
from personalize_service.server.tls import bind

log = logging.getLogger(__name__)

PERSONALIZE_SERVICE = pb.DESCRIPTOR.services_by_name["Personalize"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name
HEALTH_SERVICE = health.SERVICE_NAME
SERVICE_NAMES = (PERSONALIZE_SERVICE, ADMIN_SERVICE, HEALTH_SERVICE)
"""Services every server registers (and lists through reflection)."""
_ROLES = {"grpc": "worker"}
"""Span names by `create`'s thread prefix."""


@dataclass(frozen=True)
class ServiceConfig:
    """How a gRPC server (worker or router) listens and what it lets callers do."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 50051
    """TCP port; 0 picks a free one (create_server returns it)."""
    limits: Limits = DEFAULT_LIMITS
    """Request size, rate and concurrency limits."""
    shared_limits: RegistryConfig | None = None
    """Where tenants' rate and feedback buckets and concurrency leases are shared by every process (the
    registry's Valkey); None = per process."""
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
    access_log: str = ""
    """File of JSON access-log lines, one per call ("-" = stderr); empty = off."""
    access_log_key: str = ""
    """Secret key of the access log's user-id hash (HMAC); empty = a random one per process."""
    otlp_endpoint: str = ""
    """OTLP/HTTP collector (http://host:4318) that spans are exported to; empty = OTEL_EXPORTER_OTLP_ENDPOINT's."""

    def __post_init__(self) -> None:
        if self.otlp_endpoint:
            otlp_traces_url(self.otlp_endpoint)  # raises InvalidArgument naming a bad URL
        if not 0 <= self.port <= 65535 or not 0 <= self.metrics_port <= 65535:
            raise InvalidArgument(
                f"ports must be in [0, 65535], got port={self.port}, metrics_port={self.metrics_port}"
            )
        if not self.grace_s >= 0:
            raise InvalidArgument(f"grace_s must be >= 0 seconds, got {self.grace_s}")
        if self.threads < 1:
            raise InvalidArgument(f"threads must be >= 1, got {self.threads}")
        if not self.host:
            raise InvalidArgument("host must be an address to listen on, e.g. 127.0.0.1 or 0.0.0.0")

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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


# ---- one call ------------------------------------------------------------------------------------------

_NO_DEADLINE_S = 365 * 24 * 3600.0
"""Beyond this, a call's remaining time means "no deadline" (grpc reports ~9e18 s, which waits reject)."""


def time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds until the call's deadline, None if it has none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else remaining


def cancel_with_call(context: grpc.ServicerContext, cancel: Callable[[], object]) -> None:
    """Run `cancel` when the call ends early (client cancel, deadline, server stop): a generation is dropped
    at the engine's next step, an upstream call is cancelled. A call that already ended cancels now."""
    if not context.add_callback(cancel):
        cancel()


# ---- create, serve, drain ------------------------------------------------------------------------------

Register = Callable[[grpc.Server, int, NodeState], None]
"""Adds a role's servicers to a bound server, given its port and state."""


def _shared(config: ServiceConfig) -> dict[str, Any]:
    """The Valkey client and namespace a tenant limit shares its buckets through; {} = per process."""
    shared = config.shared_limits
    if shared is None or not shared.url:
        return {}
    timeout = config.limits.shared_timeout_s
    client = valkey.connect(shared.url, shared.cluster, socket_timeout=timeout, socket_connect_timeout=timeout)
    return {"client": client, "namespace": shared.namespace}


def rate_limiter(config: ServiceConfig) -> RateLimiter:
    """The tenant rate limiter of a server: shared through Valkey when `config.shared_limits` says where."""
    shared = _shared(config)
    return SharedRateLimiter(config.limits, **shared) if shared else RateLimiter(config.limits)


def feedback_quota(config: ServiceConfig) -> FeedbackQuota:
    """The tenant feedback quota of a worker: shared through Valkey when `config.shared_limits` says where."""
    return FeedbackQuota(config.limits, **_shared(config))


def concurrency_limiter(config: ServiceConfig) -> ConcurrencyLimiter | SharedConcurrencyLimiter:
    """The tenant concurrency limiter of a worker: leases in Valkey when `config.shared_limits` says where."""
    shared = _shared(config)
    return SharedConcurrencyLimiter(config.limits, **shared) if shared else ConcurrencyLimiter(config.limits)


def create(
    config: ServiceConfig,
    register: Register,
    metrics: ServiceMetrics | None = None,
    state: NodeState | None = None,
    thread_prefix: str = "grpc",
) -> tuple[grpc.Server, int]:
    """A bound, not yet started server with the interceptors, `register`'s servicers, health checking and
    reflection; returns it and its port. Health answers NOT_SERVING until `state.serving()`.

    Raises OSError if the address cannot be bound (port taken).
    """
    state = state or NodeState()
    access = open_access_log(config.access_log, config.access_log_key)
    options = [*grpc_server_options(config.limits), ("grpc.so_reuseport", 0)]  # a taken port must fail
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix=thread_prefix),
        interceptors=[
            ObserveInterceptor(_ROLES.get(thread_prefix, thread_prefix), socket.gethostname(), config.api_keys, access),
            *server_interceptors(config.api_keys, rate_limiter(config), metrics, state.drain),
        ],
        options=options,
        maximum_concurrent_rpcs=MAX_QUEUED_PER_THREAD * config.threads,
    )
    port = bind(server, config.address, config.tls_cert, config.tls_key, config.tls_client_ca)
    register(server, port, state)
    health_pb2_grpc.add_HealthServicer_to_server(state.health, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, reflection.SERVICE_NAME), server)
    return server, port


class Role(Protocol):
    """What a worker or a router adds around the shared server lifecycle (`serve`)."""

    name: str
    """For logs: "worker", "router"."""

    def create(self, config: ServiceConfig, metrics: ServiceMetrics, state: NodeState) -> tuple[grpc.Server, int]:
        """The bound server (see `create`)."""

    def start(self) -> None:
        """Before the server starts (the worker's engine; the router's membership watch)."""

    def started(self, port: int) -> None:
        """After the server starts, before SERVING (the worker joins membership)."""

    def tick(self) -> None:
        """Just before on_ready, then every 0.5 s while serving."""

    def draining(self) -> None:
        """Before new calls are refused (the worker announces DRAINING)."""

    def stop(self) -> None:
        """After the server stopped, or when it could not be created."""


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


def serve(
    config: ServiceConfig,
    role: Role,
    stop: threading.Event,
    metrics: ServiceMetrics | None = None,
    on_ready: Callable[[int, int], None] | None = None,
) -> None:
    """Create the server, start the role and the server, report SERVING, and block until `stop` is set;
    then shut down gracefully: `role.draining()`, health NOT_SERVING and new calls refused with UNAVAILABLE,
    calls in flight finish (those still running after grace_s are cancelled), the server stops listening,
    then `role.stop()`. `on_ready(port, metrics_port)` runs once SERVING (metrics_port 0 = off).

    Raises OSError if the port or metrics port cannot be bound (the role is stopped then).
    """
    metrics = metrics or ServiceMetrics()
    state = NodeState()
    setup_tracing(config.otlp_endpoint, f"personalize-{role.name}")
    try:
        server, port = role.create(config, metrics, state)
        http = start_metrics_http(config, metrics, server)
    except BaseException:
        role.stop()
        raise
    role.start()
    server.start()
    try:
        role.started(port)
        state.serving()
        log.info("%s serving on %s:%d", role.name, config.host, port)
        role.tick()  # before anyone is told it serves: gauges are never a stale 0
        if on_ready is not None:
            on_ready(port, http.port if http else 0)
        while not stop.wait(0.5):
            role.tick()
    finally:
        role.draining()
        drain_and_stop(server, state, config.grace_s)
        role.stop()
        if http is not None:
            http.stop()
        log.info("%s stopped", role.name)


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
