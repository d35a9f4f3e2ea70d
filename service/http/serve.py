"""Serving the HTTP edge with uvicorn on a thread next to the gRPC server (`personalize up`) or on its own
(`personalize serve --role gateway`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
import uvicorn

from personalize.completions import DEFAULT_TTL_S, CompletionLog
from personalize.feedback.notify import redis_client
from personalize.routing.membership import MembershipConfig
from personalize_service.client import PersonalizeClient
from personalize_service.client.routing import RoutingClient
from personalize_service.http.app import Caller, create_app
from personalize_service.server.auth import OPERATOR, ApiKeys
from personalize_service.server.router import RouterConfig
from personalize_service.server.tls import channel_credentials

START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class GatewayConfig:
    """What the edge calls and what it checks itself."""

    registry_url: str = ""
    """redis:// URL of the registry: route each call straight to its user's worker on the ring the workers
    heartbeat there (no router hop), and remember completions there. Empty = call `target`."""
    target: str = ""
    """host:port of one router or worker every call goes to when there is no registry_url."""
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    """The deployment's tenant keys: the edge learns each key's tenant (its routing key and completion
    namespace) and answers an unknown key 401 itself. Empty = every caller is tenant `default`."""
    namespace: str = "pz"
    """The registry's (and membership's) key prefix."""
    completion_ttl_s: int = DEFAULT_TTL_S
    """How long a completion id can be named in feedback."""
    timeout: float = 120.0
    """Deadline of each gRPC call, in seconds."""
    upstream: RouterConfig = field(default_factory=RouterConfig)
    """How workers (or `target`) are dialed: the router's TLS settings, so the edge reaches TLS workers as
    the router does."""

    def __post_init__(self) -> None:
        if not (self.registry_url or self.target):
            raise ValueError("the gateway needs a registry_url to route on or a gRPC target")


class _Clients:
    """The SDK client of each API key seen, its key sent as each call's metadata. Routing on the ring, every
    key's client shares one RoutingClient's cluster (one membership watch, one channel per worker); with a
    single target, each key has a PersonalizeClient. Closed together."""

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        self._tls = upstream_credentials(config.upstream)
        self._clients: dict[str | None, Caller] = {}
        self._operators: dict[str | None, PersonalizeClient] = {}
        self._lock = threading.Lock()
        self._shared: RoutingClient | None = None
        self._probe: PersonalizeClient | None = None

    def _ring(self) -> RoutingClient:
        """The keyless RoutingClient owning the shared cluster (opened on first use); the lock is held."""
        if self._shared is None:
            config = self._config
            membership = MembershipConfig(namespace=config.namespace)
            self._shared = RoutingClient(
                config.registry_url, timeout=config.timeout, tls=self._tls, membership=membership
            )
        return self._shared

    def _open(self, key: str | None) -> Caller:
        config = self._config
        if not config.registry_url:
            tenant = config.api_keys.authenticate(key) if config.api_keys.enabled else None
            return Caller(PersonalizeClient(config.target, api_key=key, timeout=config.timeout, tls=self._tls), tenant)
        tenant = config.api_keys.authenticate(key)
        return Caller(self._ring().for_key(key, tenant), tenant)

    def probe(self) -> PersonalizeClient:
        """A keyless client (for /readyz: with routing it reads the ring, calling nobody)."""
        with self._lock:
            if self._config.registry_url:
                return self._ring()
            if self._probe is None:
                self._probe = PersonalizeClient(self._config.target, timeout=self._config.timeout, tls=self._tls)
            return self._probe

    def operator(self, key: str | None) -> PersonalizeClient:
        """The client for an operator route (/v1/stats) called with `key`, which the edge checks itself:
        PermissionDenied for a tenant's key, Unauthenticated for a missing or unknown one (keys configured)."""
        config = self._config
        config.api_keys.authorize_operator(key)
        with self._lock:
            client = self._operators.get(key)
            if client is None:
                if config.registry_url:
                    client = self._ring().for_key(key, OPERATOR)
                else:
                    client = PersonalizeClient(
                        config.target, timeout=config.timeout, tls=self._tls, operator_key=key or None
                    )
                self._operators[key] = client
            return client

    def __call__(self, key: str | None) -> Caller:
        with self._lock:
            caller = self._clients.get(key)
            if caller is None:  # only keys that authenticated are kept: no unbounded growth from bad keys
                caller = self._clients[key] = self._open(key)
            return caller

    def close(self) -> None:
        with self._lock:
            for caller in self._clients.values():
                caller.client.close()
            for client in (*self._operators.values(), self._shared, self._probe):
                if client is not None:
                    client.close()
            self._clients.clear()
            self._operators.clear()
            self._shared = self._probe = None


def upstream_credentials(upstream: RouterConfig) -> grpc.ChannelCredentials | None:
    """The credentials the edge dials workers (or its target) with: the router's TLS settings
    (`--upstream-ca`, and `--upstream-cert`/`--upstream-key` for mutual TLS); None = plaintext."""
    if not (upstream.upstream_ca or upstream.upstream_cert or upstream.upstream_key):
        return None
    return channel_credentials(upstream.upstream_ca, upstream.upstream_cert, upstream.upstream_key)


class HttpServer:
    """uvicorn serving the app on a daemon thread; `stop()` ends it and closes the gRPC channels."""

    def __init__(self, server: uvicorn.Server, thread: threading.Thread, clients: _Clients) -> None:
        self._server, self._thread, self._clients = server, thread, clients

    @property
    def port(self) -> int:
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._clients.close()


def serve_http(config: GatewayConfig, host: str, port: int, model_name: str, fingerprint: str = "") -> HttpServer:
    """Start the OpenAI-compatible edge on host:port; returns once it listens.
    Raises RuntimeError if uvicorn cannot bind within START_TIMEOUT_S."""
    clients = _Clients(config)
    completions = (
        CompletionLog(redis_client(config.registry_url), config.namespace, config.completion_ttl_s)
        if config.registry_url
        else None
    )
    app = create_app(
        clients, model_name, fingerprint, completions=completions, probe=clients.probe, operator=clients.operator
    )
    uvicorn_config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(uvicorn_config)
    thread = threading.Thread(target=server.run, name="http-edge", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            clients.close()
            raise RuntimeError(f"the HTTP server could not listen on {host}:{port}")
        time.sleep(0.02)
    return HttpServer(server, thread, clients)
