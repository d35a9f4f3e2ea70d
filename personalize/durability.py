"""Whether the registry's Valkey acknowledges a write only once it is on disk, checked at startup.

Feedback events, registry records and stream acks are durable only if the server fsyncs its AOF before it
replies (`appendonly yes`, `appendfsync always`, which the embedded server uses). With `everysec` or `no`
a power cut loses up to a second (or more) of acknowledged writes: an event the caller was told is safe,
or a record a worker already served. A SIGKILL of the server cannot show the difference (the page cache
survives it), so it is checked here, from the server's own settings, instead of trusted.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from personalize.errors import InvalidArgument

log = logging.getLogger(__name__)

ALLOW_HINT = "set --allow-unsynced-registry (PERSONALIZE_ALLOW_UNSYNCED_REGISTRY=true) to accept that risk"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def unsynced_reason(client: Any) -> str | None:
    """Why an acknowledged write may not be on disk yet, "" when it is (AOF fsynced before every reply),
    None when the server does not say (CONFIG is disabled, as on some managed services, or unreachable)."""
    try:
        reply = client.config_get("append*")
    except redis.exceptions.ResponseError as exc:  # CONFIG renamed or disabled
        log.warning(
            "the registry server refuses CONFIG GET (%s): cannot check that it fsyncs every write "
            "(appendonly yes, appendfsync always); make sure it does",
            exc,
        )
        return None
    except (redis.exceptions.RedisError, OSError) as exc:
        log.warning("the registry server is unreachable (%s): its appendfsync setting was not checked", exc)
        return None
    settings = {_text(k): _text(v) for k, v in reply.items()}
    appendonly, appendfsync = settings.get("appendonly", ""), settings.get("appendfsync", "")
    if appendonly != "yes":
        return f"appendonly is {appendonly or 'unset'!r}: no AOF, so acknowledged writes live only in memory"
    if appendfsync != "always":
        return (
            f"appendfsync is {appendfsync or 'unset'!r}, not 'always': the server acknowledges writes "
            "before they are on disk, so a power cut loses acknowledged feedback and adapter records"
        )
    return ""


def check_durability(client: Any, allow_unsynced: bool = False) -> None:
    """Raise InvalidArgument when the registry server may lose acknowledged writes, unless `allow_unsynced`
    (then log it as an error and go on). A server that does not say is accepted with a warning."""
    reason = unsynced_reason(client)
    if not reason:
        return
    if not allow_unsynced:
        raise InvalidArgument(
            f"registry server is not durable: {reason}. Configure it with "
            f"'appendonly yes' and 'appendfsync always', or {ALLOW_HINT}"
        )
    log.error("registry server is not durable, running anyway (allowed by the operator): %s", reason)


MIN_SERVER = {"valkey": (9, 0), "redis": (7, 4)}
"""Oldest server of each kind with every command the feedback scripts call (HEXPIRE: the per-field expiry of
idempotency keys). On an older one the append script fails after XADD and HSET, so an acked event is dropped."""


def parse_version(text: str) -> tuple[int, ...]:
    """`9.0.1` -> (9, 0, 1); a part that is not a number ends the tuple (`7.4.0-rc1` -> (7, 4))."""
    parts: list[int] = []
    for part in text.strip().split("."):
        digits = part.split("-")[0]
        if not (digits.isascii() and digits.isdigit()):
            break
        parts.append(int(digits))
        if not part.isdigit():
            break
    return tuple(parts)


def version_problem(server: str, version: str) -> str:
    """Why a `server` ("valkey" or "redis") at `version` cannot run the feedback scripts, "" when it can."""
    needed = MIN_SERVER.get(server)
    if needed is None:
        return f"unknown server {server!r} {version}: need Valkey >= 9.0 or Redis >= 7.4"
    found = parse_version(version)
    if not found or found < needed:
        return (
            f"{server} {version or '(no version)'} is too old: the feedback scripts need HEXPIRE, "
            f"{server} >= {'.'.join(map(str, needed))}"
        )
    return ""


def server_of(info: dict[str, Any]) -> tuple[str, str]:
    """(kind, version) from INFO server: Valkey also reports a redis_version for compatibility (7.2.4)."""
    if info.get("valkey_version"):
        return "valkey", _text(info["valkey_version"])
    return "redis", _text(info.get("redis_version", ""))


def check_server_version(client: Any) -> None:
    """Raise InvalidArgument naming the version found and needed when the registry server is too old for the
    feedback scripts. An unreachable server is left to the first real call (it fails there as Unavailable)."""
    try:
        info = client.info("server")
    except (redis.exceptions.RedisError, OSError) as exc:
        log.warning("the registry server did not answer INFO (%s): its version was not checked", exc)
        return
    kind, version = server_of({_text(k): v for k, v in info.items()})
    problem = version_problem(kind, version)
    if problem:
        raise InvalidArgument(f"registry server cannot run the feedback scripts: {problem}; upgrade it")
