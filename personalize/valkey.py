"""Round trips to the Valkey/Redis server that holds the registry, the feedback stream and membership:
one translation of its failures into the library's errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis

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
    except (redis.exceptions.RedisError, OSError) as exc:
        raise Unavailable(f"{what} unreachable ({type(exc).__name__}: {exc})") from exc
