"""Round trips to the Valkey/Redis server that holds the registry, the feedback stream and membership:
one translation of its failures into the library's errors."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.cluster

from personalize.errors import Unavailable

T = TypeVar("T")

MAX_CONNECTIONS = 4096
"""Connections one client may open: above any server's handler threads, since redis-py's default pool (100)
raises MaxConnectionsError instead of waiting once every connection is busy."""


def call(fn: Callable[[], T], what: str) -> T:
    """fn() (one round trip); Unavailable naming `what` when the server refuses the command (an error
    reply) or cannot be reached."""
    try:
        return fn()
    except redis.exceptions.ResponseError as exc:
        raise Unavailable(f"{what} refused a command: {exc}") from exc
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
        # RedisClusterException: a cluster client found no node for a slot (mid-failover, all seeds down)
        raise Unavailable(f"{what} unreachable ({type(exc).__name__}: {exc})") from exc


CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss", "valkey+cluster": "redis"}
"""URL schemes that select the Redis Cluster protocol; the URL names one seed node of the cluster."""


def is_cluster_url(url: str) -> bool:
    """Whether `url` asks for the Redis Cluster protocol (redis+cluster:// or rediss+cluster://)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def connect(url: str, cluster: bool = False, **options: Any) -> Any:
    """A client for the server at `url`: a `redis.cluster.RedisCluster` when the scheme is redis+cluster:// or
    rediss+cluster:// (or `cluster` is set), otherwise a `redis.Redis`. Every Valkey client of the library
    comes from here. A cluster client finds the other nodes from the seed, follows MOVED/ASK and refreshes
    its slot map after a failover; `health_check_interval` is dropped for it (it checks its nodes itself)."""
    scheme, sep, rest = url.partition("://")
    if scheme.lower() in CLUSTER_SCHEMES:
        url, cluster = CLUSTER_SCHEMES[scheme.lower()] + sep + rest, True
    if not cluster:
        return redis.Redis.from_url(url, **options)
    options.pop("health_check_interval", None)
    return redis.cluster.RedisCluster.from_url(url, **options)


def is_cluster(client: Any) -> bool:
    return isinstance(client, redis.cluster.RedisCluster)


def node_client(client: Any, key: str) -> Any:
    """The plain client of the server that owns `key`: `client` itself unless it is a cluster client. A
    pipeline on it runs on one connection, which WAIT needs (it counts that connection's writes)."""
    if not is_cluster(client):
        return client
    return client.get_redis_connection(client.get_node_from_key(key))


def refresh_slots(client: Any) -> None:
    """After a MOVED or a dead node: reload the cluster's slot map (no-op for a plain client)."""
    if is_cluster(client):
        with contextlib.suppress(redis.exceptions.RedisError, redis.exceptions.RedisClusterException):
            client.nodes_manager.initialize()  # mid-failover it may fail: the next command retries it
