"""Serving the HTTP edge with uvicorn on a thread next to the gRPC server (`personalize up`) or on its own
(`personalize serve --role gateway`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import uvicorn

from personalize_service.client import PersonalizeClient
from personalize_service.http.app import create_app

START_TIMEOUT_S = 30.0


class _Clients:
    """One SDK client per API key seen (the key travels as the call's metadata); closed together."""

    def __init__(self, target: str, timeout: float) -> None:
        self._target, self._timeout = target, timeout
        self._clients: dict[str | None, PersonalizeClient] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str | None) -> PersonalizeClient:
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = PersonalizeClient(self._target, api_key=key, timeout=self._timeout)
            return client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
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


def serve_http(
    grpc_target: str,
    host: str,
    port: int,
    model_name: str,
    fingerprint: str = "",
    *,
    timeout: float = 120.0,
    client_for: Callable[[str | None], PersonalizeClient] | None = None,
) -> HttpServer:
    """Start the OpenAI-compatible edge on host:port calling `grpc_target`; returns once it listens.
    Raises RuntimeError if uvicorn cannot bind within START_TIMEOUT_S."""
    clients = _Clients(grpc_target, timeout)
    app = create_app(client_for or clients, model_name, fingerprint)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
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
