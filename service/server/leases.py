"""The per-tenant concurrency limit shared by every process: generation places as leases in Valkey.

A tenant's places are one sorted set, `{<namespace>:cc:<tenant>}` (one key, hash-tagged, so on a Redis
Cluster it lives in one slot and every script touches one key), of lease ids scored by their expiry in the
Valkey server's milliseconds (its clock, never a client's). Taking a place is one script: drop the expired
leases, refuse when as many as the limit are left, else add the lease. Giving it back is ZREM. A lease lives
`lease_s` (30 s); while its holder runs, one renewer thread per limiter pushes every held lease's expiry
out every lease_s / 3 (one script call per tenant, all of its leases at once), so a long generation keeps
its place and a process that dies (SIGKILL, power) frees its places within lease_s.

When Valkey cannot be reached a limiter holds places in its own per-process ConcurrencyLimiter (fail open,
at the per-process limit), logged once per outage, as SharedBuckets does for the rate.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from personalize import valkey
from personalize.errors import InvalidArgument, ResourceExhausted, Unavailable
from personalize_service.server.limits import ConcurrencyLimiter, Limits, concurrency_refusal

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 30.0
"""How long a place outlives its last renewal: the most a crashed process's places stay taken."""

_NOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
"""Sets `now`, the server's clock in ms: every lease is scored and expired by it, never a client's clock."""

# KEYS: the tenant's lease set. ARGV: lease id, limit, lease ms. Returns {admitted 0/1, leases held}.
_ACQUIRE_LUA = (
    _NOW_LUA
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[2]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 1000)
return {1, held + 1}
"""
)

# KEYS: the tenant's lease set. ARGV: lease ms, lease ids. Pushes out each id still live (a lapsed or
# released one stays gone); returns how many were renewed.
_RENEW_LUA = (
    _NOW_LUA
    + """
local ms = tonumber(ARGV[1])
local renewed = 0
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], now + ms, ARGV[i])
    renewed = renewed + 1
  end
end
if renewed > 0 then
  redis.call('PEXPIRE', KEYS[1], ms + 1000)
end
return renewed
"""
)

# KEYS: the tenant's lease set. Returns the leases not yet expired.
_COUNT_LUA = (
    _NOW_LUA
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""
)


@dataclass
class SharedConcurrencyLimiter:
    """A ConcurrencyLimiter whose places are leases in Valkey: max_concurrent_generations holds for the
    tenant however many workers run its generations. Thread-safe; `close` stops the renewer."""

    limits: Limits
    client: Any
    """A redis.Redis or RedisCluster (decode_responses off)."""
    namespace: str = "pz"
    lease_s: float = DEFAULT_LEASE_S
    """A lease's life after its last renewal, seconds; renewed every lease_s / 3 while held."""
    _fallback: ConcurrencyLimiter = field(init=False)
    _held: dict[str, set[str]] = field(default_factory=dict, init=False)
    """Lease ids this process holds, by tenant (what the renewer renews). Guarded by _lock."""
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _renewer: threading.Thread | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.client is None:
            raise InvalidArgument("SharedConcurrencyLimiter needs a Valkey client")
        if not self.lease_s > 0:
            raise InvalidArgument(f"lease_s must be > 0, got {self.lease_s}")
        self._fallback = ConcurrencyLimiter(self.limits)
        self._acquire = self.client.register_script(_ACQUIRE_LUA)
        self._renew = self.client.register_script(_RENEW_LUA)
        self._count = self.client.register_script(_COUNT_LUA)
        self._warned = False

    def key(self, tenant: str) -> str:
        return f"{{{self.namespace}:cc:{tenant}}}"

    @property
    def _lease_ms(self) -> int:
        return max(1, round(self.lease_s * 1000))

    @contextmanager
    def hold(self, tenant: str) -> Iterator[None]:
        """Occupy one of `tenant`'s places cluster-wide for the `with` body; ResourceExhausted if none free."""
        lease = uuid.uuid4().hex
        limit = self.limits.max_concurrent_generations
        try:
            admitted, held = valkey.call(
                lambda: self._acquire(keys=[self.key(tenant)], args=[lease, limit, self._lease_ms]), "limits"
            )
        except Unavailable as exc:
            self._warn(exc)
            admitted = None
        if admitted is None:
            with self._fallback.hold(tenant):
                yield
            return
        self._warned = False
        if not admitted:
            raise ResourceExhausted(concurrency_refusal(tenant, held, limit, "; shared by every process"))
        self._add(tenant, lease)
        try:
            yield
        finally:
            self._release(tenant, lease)

    def running(self, tenant: str) -> int:
        """`tenant`'s live leases, every process's together."""
        return int(valkey.call(lambda: self._count(keys=[self.key(tenant)]), "limits"))

    def close(self) -> None:
        """Stop the renewer (held leases then lapse after lease_s)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)

    def renew(self) -> None:
        """Push out the expiry of every lease this process holds: one call per tenant."""
        with self._lock:
            held = {tenant: sorted(leases) for tenant, leases in self._held.items()}
        for tenant, leases in held.items():
            self._renew_tenant(tenant, leases)

    def _renew_tenant(self, tenant: str, leases: list[str]) -> None:
        try:
            valkey.call(lambda: self._renew(keys=[self.key(tenant)], args=[self._lease_ms, *leases]), "limits")
        except Unavailable as exc:
            self._warn(exc)

    def _add(self, tenant: str, lease: str) -> None:
        with self._lock:
            self._held.setdefault(tenant, set()).add(lease)
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._run, name="lease-renewer", daemon=True)
                self._renewer.start()

    def _release(self, tenant: str, lease: str) -> None:
        with self._lock:
            leases = self._held[tenant]
            leases.discard(lease)
            if not leases:
                del self._held[tenant]
        try:
            valkey.call(lambda: self.client.zrem(self.key(tenant), lease), "limits")
        except Unavailable as exc:  # the place frees itself when the lease lapses
            self._warn(exc)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except Exception:  # a renewal hiccup must never kill the renewer
                log.exception("renewing concurrency leases failed")

    def _warn(self, exc: Exception) -> None:
        if not self._warned:
            log.warning("shared concurrency limits unavailable, limiting per process: %s", exc)
            self._warned = True
