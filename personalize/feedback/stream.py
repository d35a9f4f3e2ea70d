"""The durable feedback stream: Redis Streams partitioned by user, read by trainers in a consumer group.

Keys of partition p share the hash tag `{fb<p>}`, so each script touches one Redis Cluster slot:
    {ns}:{fb<p>}:s           the stream (entries: FeedbackEvent fields)
    {ns}:{fb<p>}:dead        dead letters (event fields + reason + original id)
    {ns}:{fb<p>}:i:<user>    hash of the user's idempotency keys: hash(event_key) -> event id, each field
                             expiring after idempotency_ttl_s (HEXPIRE: Valkey >= 9.0, Redis >= 7.4)
    {ns}:{fb<p>}:p:<user>    set of the user's event ids not yet applied (pending count, DeleteUser)
DeleteUser drops the user's idempotency keys with the user: a key resent after the delete is a new event.
On a Redis Cluster the partitions spread over the shards by their hash tags; a read there is one XREADGROUP
per partition (a command may not cross slots), and with wait_replicas > 0 an append is acknowledged only
once that many replicas of its shard hold it (WAIT), so a failover that promotes one of them keeps it.
An event is acknowledged (XACK + XDEL + SREM) only after the adapter version that includes it is published.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from personalize import valkey
from personalize.adapters.store.keys import user_digest
from personalize.errors import InvalidArgument, ResourceExhausted, Unavailable
from personalize.feedback.events import FeedbackEvent, event_id_key

T = TypeVar("T")

# KEYS: stream, the user's idempotency hash, pending set. ARGV: ttl_s, key hash ("" = none), field, value, ...
_APPEND_LUA = """
if ARGV[2] ~= '' then
  local existing = redis.call('HGET', KEYS[2], ARGV[2])
  if existing then
    -- rewritten, so that a WAIT after a retried append waits for the original to reach the replicas too
    redis.call('HSET', KEYS[2], ARGV[2], existing)
    redis.call('HEXPIRE', KEYS[2], tonumber(ARGV[1]), 'FIELDS', 1, ARGV[2])
    return existing
  end
end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[2], id)
  redis.call('HEXPIRE', KEYS[2], tonumber(ARGV[1]), 'FIELDS', 1, ARGV[2])
end
redis.call('SADD', KEYS[3], id)
return id
"""

# KEYS: stream, pending set. ARGV: group, ids... Acknowledge, delete from the stream and the pending set.
_ACK_LUA = """
for i = 2, #ARGV do
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
  redis.call('SREM', KEYS[2], ARGV[i])
end
return #ARGV - 1
"""


@dataclass(frozen=True)
class StreamConfig:
    """Where feedback lives and how it is partitioned."""

    partitions: int = 4
    """Number of streams; a user's events always go to partition hash(tenant, user_id) % partitions."""
    namespace: str = "pz"
    """Key prefix shared with the registry."""
    group: str = "trainers"
    """Consumer group of the trainers."""
    idempotency_ttl_s: int = 7 * 24 * 3600
    """How long a client event_key is remembered."""
    max_len: int = 1_000_000
    """Cap on unapplied entries per partition: an append beyond it is refused RESOURCE_EXHAUSTED (never
    trimmed: an acknowledged event stays until it is trained). Checked before the append, so concurrent
    appenders may pass it by a few."""
    max_dead_letters: int = 100_000
    """Approximate cap on dead letters per partition; the oldest are trimmed beyond it."""
    wait_replicas: int = 0
    """An append is acknowledged only once this many replicas of its server (its shard, on a cluster) have
    it (WAIT), so a failover to one of them keeps every acked event; 0 = the primary's own fsync only."""
    wait_timeout_ms: int = 2000
    """How long an append waits for those replicas; past it the append fails UNAVAILABLE (the event may
    still be stored: a retry with the same event_key returns its id, no duplicate)."""
    wait_aof: bool = False
    """Wait for the replicas to fsync the event to their AOF (WAITAOF), not just to receive it (WAIT)."""

    def __post_init__(self) -> None:
        if not 0 <= self.wait_replicas <= 16 or not 1 <= self.wait_timeout_ms <= 600_000:
            raise InvalidArgument(
                f"feedback wait_replicas must be in [0, 16] and wait_timeout_ms in [1, 600000], "
                f"got {self.wait_replicas} and {self.wait_timeout_ms}"
            )
        if not 1 <= self.partitions <= 1024:
            raise InvalidArgument(f"feedback partitions must be in [1, 1024], got {self.partitions}")
        if self.max_len < 1 or self.max_dead_letters < 1:
            raise InvalidArgument("feedback max_len and max_dead_letters must be >= 1")


@dataclass(frozen=True)
class Delivered:
    """An event as a trainer received it."""

    partition: int
    event_id: str
    event: FeedbackEvent
    deliveries: int = 1


class FeedbackStream:
    """Append, read, acknowledge, claim and delete feedback events. Thread-safe (redis-py pools)."""

    def __init__(self, client: Any, config: StreamConfig) -> None:
        self.client = client
        self.config = config
        self._append = client.register_script(_APPEND_LUA)
        self._ack = client.register_script(_ACK_LUA)

    # -- keys -------------------------------------------------------------------------------------------------
    def partition_of(self, tenant: str, user_id: str) -> int:
        return int.from_bytes(user_digest(tenant, user_id)[:8], "big") % self.config.partitions

    def _key(self, p: int, suffix: str) -> str:
        return f"{self.config.namespace}:{{fb{p}}}:{suffix}"

    def stream_key(self, p: int) -> str:
        return self._key(p, "s")

    def _pending_key(self, tenant: str, user_id: str) -> tuple[int, str]:
        p = self.partition_of(tenant, user_id)
        return p, self._key(p, "p:" + user_digest(tenant, user_id).hex())

    def _idempotency_key(self, tenant: str, user_id: str) -> str:
        p = self.partition_of(tenant, user_id)
        return self._key(p, "i:" + user_digest(tenant, user_id).hex())

    # -- producers --------------------------------------------------------------------------------------------
    def append(self, event: FeedbackEvent) -> tuple[str, int]:
        """Durably append; returns (event id, partition). A repeated event_key returns the first id."""
        p, pending = self._pending_key(event.tenant, event.user_id)
        key_hash = hashlib.sha256(event.event_key.encode()).hexdigest()[:32] if event.event_key else ""
        args: list[Any] = [self.config.idempotency_ttl_s, key_hash]
        for k, v in event.to_fields().items():
            args += [k, v]
        keys = [self.stream_key(p), self._idempotency_key(event.tenant, event.user_id), pending]
        if int(self._call(functools.partial(self.client.xlen, keys[0]))) >= self.config.max_len:
            raise ResourceExhausted(
                f"feedback partition {p} holds {self.config.max_len} untrained events "
                f"(feedback max_len); retry once the trainer catches up"
            )
        event_id = self._call(functools.partial(self._append_replicated, keys, args))
        return _s(event_id), p

    def _append_replicated(self, keys: list[str], args: list[Any]) -> Any:
        """The append script, then (wait_replicas > 0) WAIT on the same connection: one pipeline on the
        server that owns the partition."""
        n = self.config.wait_replicas
        if not n:
            return self._append(keys=keys, args=args)
        pipe = valkey.node_client(self.client, keys[0]).pipeline(transaction=False)
        self._append(keys=keys, args=args, client=pipe)
        if self.config.wait_aof:
            pipe.execute_command("WAITAOF", 0, n, self.config.wait_timeout_ms)
        else:
            pipe.execute_command("WAIT", n, self.config.wait_timeout_ms)
        try:
            event_id, acked = pipe.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.ResponseError):
            valkey.refresh_slots(self.client)  # MOVED or a dead primary: the caller retries on the new one
            raise
        replicas = int(acked[1] if isinstance(acked, list) else acked)
        if replicas < n:
            raise Unavailable(
                f"feedback event {_s(event_id)} reached {replicas} of {n} replicas within "
                f"{self.config.wait_timeout_ms} ms (feedback wait_replicas); retry with the same event_key"
            )
        return event_id

    # -- consumers --------------------------------------------------------------------------------------------
    def ensure_group(self) -> None:
        for p in range(self.config.partitions):
            key = self.stream_key(p)
            try:
                self._call(functools.partial(self.client.xgroup_create, key, self.config.group, id="0", mkstream=True))
            except Unavailable as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def read(self, consumer: str, count: int, block_ms: int) -> list[Delivered]:
        """New events for this consumer across all partitions (blocks up to block_ms when there are none)."""
        if valkey.is_cluster(self.client):
            return self._read_each(consumer, ">", count, block_ms)
        streams = {self.stream_key(p): ">" for p in range(self.config.partitions)}
        reply = self._call(
            lambda: self.client.xreadgroup(
                self.config.group, consumer, streams, count=self._per_stream(count), block=block_ms or None
            )
        )
        return self._parse(reply or [])

    def _read_each(self, consumer: str, start: str, count: int, block_ms: int) -> list[Delivered]:
        """A read on a cluster: one XREADGROUP per partition (each its own slot); when none has anything,
        block on each in turn for a share of block_ms."""
        per = self._per_stream(count)

        def one(p: int, block: int | None) -> list[Delivered]:
            reply = self._call(
                lambda: self.client.xreadgroup(
                    self.config.group, consumer, {self.stream_key(p): start}, count=per, block=block
                )
            )
            return self._parse(reply or [])

        out = [d for p in range(self.config.partitions) for d in one(p, None)]
        if out or not block_ms or start != ">":
            return out
        share = max(1, block_ms // self.config.partitions)
        for p in range(self.config.partitions):
            out = one(p, share)
            if out:
                return out
        return []

    def _per_stream(self, count: int) -> int:
        """XREADGROUP's COUNT applies to each stream: share `count` out so a read returns at most about it."""
        return max(1, -(-count // self.config.partitions))

    def read_own_pending(self, consumer: str, count: int) -> list[Delivered]:
        """Events delivered to this consumer name earlier and never acknowledged (it restarted mid-round)."""
        if valkey.is_cluster(self.client):
            return self._read_each(consumer, "0", count, 0)
        streams = {self.stream_key(p): "0" for p in range(self.config.partitions)}
        reply = self._call(
            lambda: self.client.xreadgroup(self.config.group, consumer, streams, count=self._per_stream(count))
        )
        return self._parse(reply or [])

    def claim(self, consumer: str, min_idle_ms: int, count: int = 1000) -> list[Delivered]:
        """Take over events left pending by a dead (or this, restarted) consumer for at least min_idle_ms."""
        count = self._per_stream(count)
        out: list[Delivered] = []
        for p in range(self.config.partitions):
            reply = self._call(
                functools.partial(
                    self.client.xautoclaim,
                    self.stream_key(p),
                    self.config.group,
                    consumer,
                    min_idle_ms,
                    "0-0",
                    count=count,
                )
            )
            entries = reply[1] if reply else []
            out += [Delivered(p, _s(i), FeedbackEvent.from_fields(f)) for i, f in entries if f]
        return out

    def ack(self, tenant: str, user_id: str, ids: Sequence[str]) -> int:
        """Acknowledge applied events: gone from the stream, the group's pending list and the user's set."""
        if not ids:
            return 0
        p, pending = self._pending_key(tenant, user_id)
        return int(self._call(lambda: self._ack(keys=[self.stream_key(p), pending], args=[self.config.group, *ids])))

    def dead_letter(self, delivered: Delivered, reason: str) -> None:
        """Move an event that cannot be applied to the dead-letter stream, with the reason."""
        fields = {**delivered.event.to_fields(), "id": delivered.event_id, "reason": reason}
        self._call(
            lambda: self.client.xadd(
                self._key(delivered.partition, "dead"), fields, maxlen=self.config.max_dead_letters, approximate=True
            )
        )
        self.ack(delivered.event.tenant, delivered.event.user_id, [delivered.event_id])

    def dead_letters(self, p: int) -> list[dict[str, str]]:
        rows = self._call(lambda: self.client.xrange(self._key(p, "dead")))
        return [{_s(k): _s(v) for k, v in f.items()} for _, f in rows]

    # -- per user -----------------------------------------------------------------------------------------------
    def pending_ids(self, tenant: str, user_id: str) -> set[str]:
        _, pending = self._pending_key(tenant, user_id)
        return {_s(i) for i in self._call(lambda: self.client.smembers(pending))}

    def pending_count(self, tenant: str, user_id: str) -> int:
        _, pending = self._pending_key(tenant, user_id)
        return int(self._call(lambda: self.client.scard(pending)))

    def delete_user(self, tenant: str, user_id: str) -> int:
        """Drop every not-yet-applied event of the user and the user's idempotency keys; returns how many
        events."""
        ids = sorted(self.pending_ids(tenant, user_id), key=event_id_key)
        self.ack(tenant, user_id, ids)
        self._call(functools.partial(self.client.delete, self._idempotency_key(tenant, user_id)))
        self._delete_dead_letters(tenant, user_id)
        return len(ids)

    def _delete_dead_letters(self, tenant: str, user_id: str) -> None:
        """XDEL the user's entries of their partition's dead-letter stream (scanned in pages)."""
        key = self._key(self.partition_of(tenant, user_id), "dead")
        start = "-"
        while True:
            rows = self._call(functools.partial(self.client.xrange, key, start, "+", 1000))
            mine = [i for i, f in rows if (_s(f.get(b"t", b"")), _s(f.get(b"u", b""))) == (tenant, user_id)]
            if mine:
                self._call(functools.partial(self.client.xdel, key, *mine))
            if len(rows) < 1000:
                return
            start = "(" + _s(rows[-1][0])

    def lag(self) -> int:
        """Events appended but not yet acknowledged, over all partitions."""
        return sum(
            int(self._call(functools.partial(self.client.xlen, self.stream_key(p))))
            for p in range(self.config.partitions)
        )

    def lag_by_partition(self) -> dict[int, int]:
        """Events appended but not yet acknowledged, per partition (what KEDA scales trainers on)."""
        return {
            p: int(self._call(functools.partial(self.client.xlen, self.stream_key(p))))
            for p in range(self.config.partitions)
        }

    # -- plumbing -----------------------------------------------------------------------------------------------
    def _parse(self, reply: list[Any]) -> list[Delivered]:
        out = []
        for stream, entries in reply:
            p = int(_s(stream).split("{fb", 1)[1].split("}", 1)[0])
            out += [Delivered(p, _s(i), FeedbackEvent.from_fields(f)) for i, f in entries if f]
        return out

    def _call(self, fn: Callable[[], T]) -> T:
        return valkey.call(fn, "feedback stream")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
