"""A worker's place in the cluster: it heartbeats into the registry's Valkey so that routers (and routing
clients) put it on their ring, announces DRAINING before it stops taking calls, and leaves (deletes its
key) once it has stopped. It also watches membership itself, to know which users it owns: a trainer's
"user U is now version v" is loaded eagerly only by U's owner, not by every worker.

    announcement = Announcement(AnnounceConfig(registry_url), "worker-0", capacity=32,
                                load_fn=lambda: 3.0).start("10.0.0.5:50051")
    announcement.owns("acme", "alice")    # True if alice of acme hashes to this node
    announcement.drain()                  # routers stop sending new users; waits drain_notice_s
    announcement.leave()

Rebalancing: every worker keeps a list of its hottest users in the registry (`{ns}:hot:<node>`, refreshed
each heartbeat-ish period, expiring a minute after its last refresh so a dead worker's list outlives it).
When the ring changes, each worker reads the other workers' lists and starts loading the adapters of the
listed users it now owns, so the hottest moved users find their adapter resident on their first call;
everyone else is loaded lazily on first call (host RAM, disk or the store). Nothing is pushed.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from personalize.routing.membership import (
    Heartbeat,
    Membership,
    MembershipConfig,
    NodeInfo,
    Watcher,
    membership_client,
    ring_of,
)
from personalize.routing.ring import DEFAULT_VNODES, Ring, route_key

log = logging.getLogger(__name__)

HOT_USERS = 64
"""Users each worker lists as its hottest, for new owners to warm when the ring changes."""
HOT_TTL_MS = 60_000
HOT_PERIOD_S = 2.0
_REPUBLISH = 4
"""Writes of a hot list per period at most, while users leave it between a write and the next listing."""
DRAIN_NOTICE_S = 1.0
"""Time between announcing DRAINING and refusing new calls: two polls of a router's watcher."""
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


def advertised_address(host: str, port: int, advertise: str = "") -> str:
    """Where routers reach this server: `advertise` if set, else host:port (a wildcard host becomes this
    machine's hostname, since 0.0.0.0 cannot be dialled from elsewhere)."""
    if advertise:
        return advertise
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class AnnounceConfig:
    """Where and how a worker announces itself."""

    registry_url: str
    """redis:// URL of the registry's Valkey/Redis, where membership lives."""
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    """Namespace, TTL and heartbeat interval (routers must use the same namespace)."""
    drain_notice_s: float = DRAIN_NOTICE_S
    """Seconds between announcing DRAINING and refusing new calls (0 when no router watches)."""
    vnodes: int = DEFAULT_VNODES
    """Ring points per unit of weight, as the routers use."""


def forget_hot(client: Any, namespace: str, tenant: str, user_id: str) -> int:
    """Remove the user from every worker's hot list (DeleteUser: the lists name users), keeping each list's
    expiry; returns how many lists named it. A list republished meanwhile no longer names a deleted user,
    whose adapter has left the caches."""
    changed = 0
    for key in client.scan_iter(match=f"{{{namespace}}}:hot:*", count=1000):
        raw = client.get(key)
        users = json.loads(raw) if raw else []
        kept = [u for u in users if u != [tenant, user_id]]
        if len(kept) != len(users):
            client.set(key, json.dumps(kept), keepttl=True)
            changed += 1
    return changed


def publish_hot(
    client: Any, key: str, hot_fn: Callable[[int], list[tuple[str, str]]], limit: int = HOT_USERS
) -> list[tuple[str, str]]:
    """Write `hot_fn(limit)` (users that still have a record) to `key`, even when empty, and return it.

    A DeleteUser (record deleted, then `forget_hot`) can fall between listing a user and writing the list:
    forget_hot would run before the write, and the write would name the deleted user again. So after each
    write the list is taken again; while it has lost a user that was written (deleted meanwhile, or just
    evicted), the newer list is written, up to _REPUBLISH times (the next period carries on)."""
    users = [(tenant, user_id) for tenant, user_id in hot_fn(limit)]
    for _ in range(_REPUBLISH):
        client.set(key, json.dumps(users), px=HOT_TTL_MS)
        now = [(tenant, user_id) for tenant, user_id in hot_fn(limit)]
        if set(users) <= set(now):  # no one written was gone by the time it was written
            return users
        users = now
    return users


class Ownership:
    """Which users a node owns, as of the last ring it was given; thread-safe. The worker holds one from
    construction (it loads new versions eagerly only for its own users); its Announcement feeds it."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._ring: Ring | None = None
        self._lock = threading.Lock()  # guards _ring

    @property
    def ring(self) -> Ring | None:
        """The serving nodes' ring as last set (None before the first membership read)."""
        with self._lock:
            return self._ring

    def set_ring(self, ring: Ring) -> Ring | None:
        """Own the users `ring` gives this node from now on; returns the previous ring."""
        with self._lock:
            old, self._ring = self._ring, ring
        return old

    def owns(self, tenant: str, user_id: str) -> bool:
        """Whether this node is the user's ring owner; True while the ring is unknown or empty (one node)."""
        ring = self.ring
        if ring is None or len(ring) == 0:
            return True
        return ring.owner(route_key(tenant, user_id)) == self.node_id


class Announcement:
    """Heartbeat + membership watch of one worker. Thread-safe; start() once, then drain() and leave().

    `ownership` is updated on every ring change (a new one when not given); `hot_fn(limit)` lists this
    worker's hottest users, published for rebalancing; `warm_fn(tenant, user_id)` starts loading the
    adapter of a hot user that moved here."""

    def __init__(
        self,
        config: AnnounceConfig,
        node_id: str,
        capacity: float,
        load_fn: Callable[[], float] | None = None,
        *,
        ownership: Ownership | None = None,
        hot_fn: Callable[[int], list[tuple[str, str]]] | None = None,
        warm_fn: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config
        self.node_id = node_id
        self.capacity = capacity
        self.ownership = ownership or Ownership(node_id)
        self._load_fn = load_fn
        self._hot_fn = hot_fn
        self._warm_fn = warm_fn
        self._client = membership_client(config.registry_url)
        self._heartbeat: Heartbeat | None = None
        self._watcher: Watcher | None = None
        self._stop_hot = threading.Event()

    def start(self, address: str) -> Announcement:
        """Beat once (Unavailable if the registry cannot be reached), keep beating, and watch the ring."""
        node = NodeInfo(self.node_id, address, self.capacity)
        self._heartbeat = Heartbeat(self._client, self.config.membership, node, self._load_fn).start()
        membership = Membership(self._client, self.config.membership)
        self._watcher = membership.watch(self._on_change)
        if self._hot_fn is not None:
            threading.Thread(target=self._publish_hot, name="hot-users", daemon=True).start()
        log.info(
            "announced %s at %s (capacity %g) in namespace %r",
            self.node_id,
            address,
            self.capacity,
            self.config.membership.namespace,
        )
        return self

    @property
    def ring(self) -> Ring | None:
        """The serving nodes' ring as last read (None before the first successful read)."""
        return self.ownership.ring

    def owns(self, tenant: str, user_id: str) -> bool:
        return self.ownership.owns(tenant, user_id)

    def drain(self) -> None:
        """Announce DRAINING (routers stop sending new users here), then give them drain_notice_s to see it."""
        if self._heartbeat is None:
            return
        self._heartbeat.drain()
        if self.config.drain_notice_s > 0:
            time.sleep(self.config.drain_notice_s)

    def _hot_key(self, node_id: str) -> str:
        return f"{{{self.config.membership.namespace}}}:hot:{node_id}"

    def _publish_hot(self) -> None:
        while not self._stop_hot.wait(HOT_PERIOD_S):
            if self._hot_fn is None:
                return
            try:
                publish_hot(self._client, self._hot_key(self.node_id), self._hot_fn)
            except Exception as exc:  # registry briefly unreachable: the next period retries
                log.debug("publishing hot users failed: %s", exc)

    def _warm_moved(self, old: Ring | None, new: Ring) -> None:
        """Load the adapters of other workers' hottest users that `new` makes ours."""
        if self._warm_fn is None or old is None:
            return
        others = sorted((set(old.nodes) | set(new.nodes)) - {self.node_id})
        if not others:
            return
        try:
            lists = self._client.mget([self._hot_key(n) for n in others])
        except Exception as exc:
            log.debug("reading hot users failed: %s", exc)
            return
        for raw in lists:
            for tenant, user_id in json.loads(raw) if raw else []:
                key = route_key(tenant, user_id)
                if new.owner(key) == self.node_id and old.owner(key) != self.node_id:
                    self._warm_fn(tenant, user_id)

    def leave(self) -> None:
        """Stop beating and watching and delete the node's key. Never raises."""
        self._stop_hot.set()
        if self._watcher is not None:
            self._watcher.stop()
        if self._heartbeat is not None:
            self._heartbeat.stop(leave=True)
        self._client.close()

    def _on_change(self, nodes: dict[str, NodeInfo]) -> None:
        ring = ring_of(nodes, self.config.vnodes)
        old = self.ownership.set_ring(ring)
        if old is None and self.node_id in ring.nodes and len(ring.nodes) > 1:
            old = ring.without_node(self.node_id)  # just joined: the users we take over were the others'
        if old is not None and set(old.nodes) != set(ring.nodes):
            threading.Thread(target=self._warm_moved, args=(old, ring), name="warm-moved", daemon=True).start()
