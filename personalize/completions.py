"""Completions remembered for a while, so feedback can name one by its id instead of resending its text.

Keys (in the registry's Valkey):
    {ns}:cmpl:<tenant>:<u>   hash of one user's completions: completion id -> JSON {user, prompt, messages,
                             completion}, each field expiring after ttl_s (HEXPIRE: Valkey >= 9.0, Redis >= 7.4)
`<u>` is the first 8 bytes (hex) of the user's digest, and every completion id carries it, so an id alone
finds its hash, the tenant of the caller is part of the key (another tenant's id is simply not found), and
DeleteUser drops the user's remembered text with one DEL.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from personalize import valkey
from personalize.adapters.store.keys import user_digest
from personalize.errors import NotFound

DEFAULT_TTL_S = 86_400
_ID_RE = re.compile(r"(?:chatcmpl|cmpl)-([0-9a-f]{16})[0-9a-f]{16}")


@dataclass(frozen=True)
class Remembered:
    """One completion as generated: the user it was for, its prompt (or chat messages), its text."""

    user_id: str
    prompt: str | None
    messages: list[dict[str, str]] | None
    completion: str


def _user_part(tenant: str, user_id: str) -> str:
    return user_digest(tenant, user_id)[:8].hex()


def new_completion_id(prefix: str, tenant: str, user_id: str) -> str:
    """`prefix-` + the user's 16 hex digits + 16 random hex digits (prefix: `cmpl` or `chatcmpl`)."""
    return f"{prefix}-{_user_part(tenant, user_id)}{uuid.uuid4().hex[:16]}"


class CompletionLog:
    """Remember / recall / forget completions over a binary `redis.Redis` client; thread-safe."""

    def __init__(self, client: Any, namespace: str = "pz", ttl_s: int = DEFAULT_TTL_S) -> None:
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1, got {ttl_s}")
        self.client, self.namespace, self.ttl_s = client, namespace, ttl_s

    def _key(self, tenant: str, user_part: str) -> str:
        return f"{self.namespace}:cmpl:{tenant}:{user_part}"

    def remember(self, tenant: str, completion_id: str, entry: Remembered) -> None:
        """Store `entry` under its id for ttl_s seconds. Raises Unavailable if Valkey cannot be reached."""
        key = self._key(tenant, _user_part(tenant, entry.user_id))
        value = json.dumps(
            {"user": entry.user_id, "prompt": entry.prompt, "messages": entry.messages, "completion": entry.completion}
        )

        def store() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(key, completion_id, value)
            pipe.execute_command("HEXPIRE", key, self.ttl_s, "FIELDS", 1, completion_id)
            pipe.execute()

        valkey.call(store, "completion log")

    def recall(self, tenant: str, completion_id: str) -> Remembered:
        """The completion of `tenant` with this id. Raises NotFound if it is unknown, expired or another
        tenant's, Unavailable if Valkey cannot be reached."""
        found = _ID_RE.fullmatch(completion_id)
        raw = None
        if found:
            raw = valkey.call(
                functools.partial(self.client.hget, self._key(tenant, found[1]), completion_id), "completion log"
            )
        if raw is None:
            raise NotFound(
                f"completion_id {completion_id!r} is unknown or expired (completions are kept {self.ttl_s} s)"
            )
        data = json.loads(raw)
        return Remembered(data["user"], data["prompt"], data["messages"], data["completion"])

    def forget_user(self, tenant: str, user_id: str) -> None:
        """Drop every remembered completion of the user."""
        key = self._key(tenant, _user_part(tenant, user_id))
        valkey.call(functools.partial(self.client.delete, key), "completion log")
