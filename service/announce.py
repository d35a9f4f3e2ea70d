"""A worker's place in the cluster: it heartbeats into the registry's Valkey so that routers (and routing
clients) put it on their ring, announces DRAINING before it stops taking calls, and leaves (deletes its
key) once it has stopped. It also watches membership itself, to know which users it owns: a trainer's
"user U is now version v" is loaded eagerly only by U's owner, not by every worker.

    announcement = Announcement(AnnounceConfig(registry_url), "worker-0", capacity=32,
                                load_fn=lambda: 3.0).start("10.0.0.5:50051")
    announcement.owns("acme", "alice")    # True if alice of acme hashes to this node
    announcement.drain()                  # routers stop sending new users; waits drain_notice_s
    announcement.leave()

Rebalancing is lazy: when a worker joins or leaves, the users that move are loaded by their new owner on
their first call (from its host RAM, disk or the store); nothing is pushed between workers.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from personalize.routing.membership import Heartbeat, Membership, MembershipConfig, NodeInfo, Watcher, ring_of
from personalize.routing.ring import DEFAULT_VNODES, Ring, route_key
from personalize_service.cluster import membership_client

log = logging.getLogger(__name__)

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


class Announcement:
    """Heartbeat + membership watch of one worker. Thread-safe; start() once, then drain() and leave()."""

    def __init__(self, config: AnnounceConfig, node_id: str, capacity: float,
                 load_fn: Callable[[], float] | None = None) -> None:
        self.config = config
        self.node_id = node_id
        self.capacity = capacity
        self._load_fn = load_fn
        self._client = membership_client(config.registry_url)
        self._heartbeat: Heartbeat | None = None
        self._watcher: Watcher | None = None
        self._ring: Ring | None = None
        self._lock = threading.Lock()  # guards _ring

    def start(self, address: str) -> Announcement:
        """Beat once (Unavailable if the registry cannot be reached), keep beating, and watch the ring."""
        node = NodeInfo(self.node_id, address, self.capacity)
        self._heartbeat = Heartbeat(self._client, self.config.membership, node, self._load_fn).start()
        membership = Membership(self._client, self.config.membership)
        self._watcher = membership.watch(self._on_change)
        log.info("announced %s at %s (capacity %g) in namespace %r", self.node_id, address, self.capacity,
                 self.config.membership.namespace)
        return self

    @property
    def ring(self) -> Ring | None:
        """The serving nodes' ring as last read (None before the first successful read)."""
        with self._lock:
            return self._ring

    def owns(self, tenant: str, user_id: str) -> bool:
        """Whether this node is the user's ring owner; True while the ring is unknown or empty."""
        ring = self.ring
        if ring is None or len(ring) == 0:
            return True
        return ring.owner(route_key(tenant, user_id)) == self.node_id

    def drain(self) -> None:
        """Announce DRAINING (routers stop sending new users here), then give them drain_notice_s to see it."""
        if self._heartbeat is None:
            return
        self._heartbeat.drain()
        if self.config.drain_notice_s > 0:
            time.sleep(self.config.drain_notice_s)

    def leave(self) -> None:
        """Stop beating and watching and delete the node's key. Never raises."""
        if self._watcher is not None:
            self._watcher.stop()
        if self._heartbeat is not None:
            self._heartbeat.stop(leave=True)
        self._client.close()

    def _on_change(self, nodes: dict[str, NodeInfo]) -> None:
        ring = ring_of(nodes, self.config.vnodes)
        with self._lock:
            self._ring = ring
