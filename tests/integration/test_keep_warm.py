"""The router keeps one health Watch open on each worker channel (service/client/cluster.py keep_warm), so grpc
Python's per-channel polling thread is not started for every forwarded call: the watch is open while the
worker serves, let go when it drains (its shutdown must not wait for it), taken again when it serves
after a restart, and never again once the channel is closed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from personalize_service.client.cluster import keep_warm
from personalize_service.net import find_free_port

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class CountingHealth(health_pb2_grpc.HealthServicer):
    """A health service that counts Watch calls and the ones still open; `drain()` says NOT_SERVING."""

    def __init__(self) -> None:
        self.status = SERVING
        self.watches = 0
        self.open = 0
        self.checks = 0
        self.changed = threading.Condition()

    def drain(self) -> None:
        with self.changed:
            self.status = NOT_SERVING
            self.changed.notify_all()

    def Check(self, request: Any, context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        with self.changed:
            self.checks += 1
        return health_pb2.HealthCheckResponse(status=self.status)

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[health_pb2.HealthCheckResponse]:
        with self.changed:
            self.watches += 1
            self.open += 1
        context.add_callback(self._wake)
        try:
            sent = None
            while context.is_active():
                if self.status != sent:
                    sent = self.status
                    yield health_pb2.HealthCheckResponse(status=sent)
                with self.changed:
                    self.changed.wait(0.1)
        finally:
            with self.changed:
                self.open -= 1

    def _wake(self) -> None:
        with self.changed:
            self.changed.notify_all()


def _serve(port: int, health: CountingHealth) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_watch_is_held_let_go_on_drain_retaken_after_a_restart_and_ends_with_the_channel() -> None:
    port = find_free_port()
    first, second = CountingHealth(), CountingHealth()
    server = _serve(port, first)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_reconnect_backoff_ms", 500)])
    try:
        thread = keep_warm(channel, poll_s=0.05)
        assert _until(lambda: first.open == 1)
        first.drain()
        assert _until(lambda: first.open == 0)  # let go while the worker drains ...
        checks = first.checks
        assert _until(lambda: first.checks >= checks + 3)  # three polls answered NOT_SERVING since
        assert first.watches == 1  # ... and not taken again while it says NOT_SERVING
        server.stop(0)  # the worker restarts and serves: watched again
        server = _serve(port, second)
        assert _until(lambda: second.open == 1), (first.watches, second.watches)
    finally:
        channel.close()
    assert _until(lambda: second.open == 0) and _until(lambda: not thread.is_alive())
    assert second.watches == 1  # a closed channel is not watched again
    server.stop(0)
