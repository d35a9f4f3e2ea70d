"""Serving the HTTP edge with uvicorn on a thread next to the gRPC server (`personalize up`) or on its own
(`personalize serve --role gateway`)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import uvicorn

from personalize.completions import DEFAULT_TTL_S, CompletionLog
from personalize.feedback.notify import redis_client
from personalize.routing.membership import MembershipConfig
from personalize_service.client import PersonalizeClient
from personalize_service.client.routing import RoutingClient
from personalize_service.http.app import Caller, create_app
from personalize_service.server.auth import ApiKeys

START_TIMEOUT_S = 30.0
PROBE = object()


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

    def __post_init__(self) -> None:
        if not (self.registry_url or self.target):
            raise ValueError("the gateway needs a registry_url to route on or a gRPC target")


class _Clients:
    """One SDK client per API key seen (the key travels as the call's metadata); closed together."""

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        self._clients: dict[str | object | None, Caller] = {}
        self._lock = threading.Lock()

    def _open(self, key: str | None) -> Caller:
        config = self._config
        if not config.registry_url:
            tenant = config.api_keys.authenticate(key) if config.api_keys.enabled else None
            return Caller(PersonalizeClient(config.target, api_key=key, timeout=config.timeout), tenant)
        tenant = config.api_keys.authenticate(key)
        client = RoutingClient(
            config.registry_url,
            api_key=key,
            timeout=config.timeout,
            tenant=tenant,
            membership=MembershipConfig(namespace=config.namespace),
        )
        return Caller(client, tenant)

    def probe(self) -> PersonalizeClient:
        """A keyless client (for /readyz: with routing it reads the ring, calling nobody)."""
        with self._lock:
            caller = self._clients.get(PROBE)
            if caller is None:
                caller = self._clients[PROBE] = self._open_keyless()
            return caller.client

    def _open_keyless(self) -> Caller:
        config = self._config
        if not config.registry_url:
            return Caller(PersonalizeClient(config.target, timeout=config.timeout))
        membership = MembershipConfig(namespace=config.namespace)
        return Caller(RoutingClient(config.registry_url, timeout=config.timeout, membership=membership))

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
            self._clients.clear()


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
    app = create_app(clients, model_name, fingerprint, completions=completions, probe=clients.probe)
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
