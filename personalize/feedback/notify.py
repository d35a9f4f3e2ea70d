""" "User U is now version v": trainers publish it, workers listen and load the new version at once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis

from personalize import valkey

log = logging.getLogger(__name__)


def redis_client(url: str, cluster: bool = False) -> Any:
    """A binary-safe client with bounded timeouts (the stream and notifications share it); a cluster client
    for a redis+cluster:// URL or `cluster`."""
    return valkey.connect(
        url,
        cluster,
        socket_timeout=10.0,
        socket_connect_timeout=2.0,
        decode_responses=False,
        health_check_interval=30,
        max_connections=valkey.MAX_CONNECTIONS,
    )


def channel(namespace: str) -> str:
    return f"{namespace}:updates"


def publish_update(client: Any, namespace: str, tenant: str, user_id: str, version: int) -> None:
    """Announce a new version (best effort: a missed message only costs the worker a lazy load later)."""
    try:
        client.publish(channel(namespace), f"{tenant}\0{user_id}\0{version}".encode("utf-8", "surrogatepass"))
    except redis.exceptions.RedisError as exc:
        log.warning("could not announce %s v%d: %s", user_id, version, exc)


class UpdateListener:
    """Calls `on_update(tenant, user_id, version)` for every announced version, on its own thread."""

    def __init__(self, client: Any, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, on_update: Callable[[str, str, int], None]) -> None:
        self._thread = threading.Thread(target=self._run, args=(on_update,), name="updates", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def _run(self, on_update: Callable[[str, str, int], None]) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(channel(self.namespace))
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg and msg.get("type") == "message":
                        self._dispatch(msg["data"], on_update)
                pubsub.close()
            except redis.exceptions.RedisError as exc:  # registry restarting: resubscribe shortly
                log.warning("update listener lost its connection: %s", exc)
                self._stop.wait(1.0)

    @staticmethod
    def _dispatch(data: bytes, on_update: Callable[[str, str, int], None]) -> None:
        try:
            tenant, user_id, version = data.decode("utf-8", "surrogatepass").split("\0")
            on_update(tenant, user_id, int(version))
        except Exception:
            log.exception("bad update message or prefetch failure")
