"""Which live worker takes one call of a key, and how a failing worker is avoided. Pure policy: no I/O,
no gRPC; thread-safe. The router and the SDK's routing client hold one `Placement` each (through
`Cluster`, which adds a channel per worker).

    placement = Placement(RouteConfig())
    placement.set_nodes(nodes)                # the membership view
    node, on_owner = placement.acquire("acme/alice")
    ...                                       # the call on `node`
    placement.release(node, on_owner)

Placement: a key goes to its ring owner while fewer than `owner_share x capacity` calls of the owner's
own keys are in flight there from this placement, so at light load a user never leaves its worker (plain
bounded loads would spill the second concurrent call: with 3 workers and 1 call in flight the bound is
1). Past that floor, `BoundedLoadBalancer` places the overflow calls: bounded loads with sticky spill.

Suspects: a node that answered UNAVAILABLE is *suspect* for `suspect_s`: every call avoids it while
another node is left, so the users of a dead worker stop paying for a failed attempt before its
membership key expires.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from personalize.errors import InvalidArgument
from personalize.routing.membership import NodeInfo, ring_of
from personalize.routing.ring import DEFAULT_EPS, DEFAULT_STICKY_KEYS, DEFAULT_VNODES, BoundedLoadBalancer, Ring


@dataclass(frozen=True)
class RouteConfig:
    """How calls are spread over the workers and how fast a failing one is avoided."""

    eps: float = DEFAULT_EPS
    """Bounded loads: no worker takes more than (1 + eps) x the average of the overflow calls."""
    owner_share: float = 0.5
    """A worker's own keys stay on it until this fraction of its capacity (engine max_batch) is in flight
    from here; 0 = plain bounded loads from the first call."""
    sticky_keys: int = DEFAULT_STICKY_KEYS
    """Spilled keys remembered, so a hot user spills to one other worker, not several."""
    vnodes: int = DEFAULT_VNODES
    """Ring points per unit of weight; every router and client of a deployment must agree."""
    poll_s: float = 0.5
    """Membership poll interval."""
    suspect_s: float = 3.0
    """How long a worker that answered UNAVAILABLE is avoided (about the membership TTL)."""

    def __post_init__(self) -> None:
        for name in ("eps", "owner_share", "poll_s", "suspect_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InvalidArgument(f"{name} must be a finite number >= 0, got {value!r}")
        if self.poll_s <= 0:
            raise InvalidArgument(f"poll_s must be > 0, got {self.poll_s!r}")


class Placement:
    """The owner floor, the balancer and the suspects over one membership view; every method is
    thread-safe (one lock guards the state below; the balancer is only used under it)."""

    def __init__(self, config: RouteConfig = RouteConfig(), clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._balancer = BoundedLoadBalancer(Ring({}, config.vnodes), config.eps, config.sticky_keys)
        self._nodes: dict[str, NodeInfo] = {}
        self._on_owner: dict[str, int] = {}  # node -> calls in flight under its owner floor
        self._suspects: dict[str, float] = {}  # node -> clock reading until which it is avoided

    def set_nodes(self, nodes: Mapping[str, NodeInfo]) -> None:
        """Place on `nodes` from now on (the serving ones go on the ring)."""
        ring = ring_of(nodes, self.config.vnodes)
        with self._lock:
            self._nodes = dict(nodes)
            self._balancer.set_ring(ring)

    def nodes(self) -> dict[str, NodeInfo]:
        with self._lock:
            return dict(self._nodes)

    def node(self, node_id: str) -> NodeInfo | None:
        with self._lock:
            return self._nodes.get(node_id)

    def ring(self) -> Ring:
        return self._balancer.ring

    def acquire(self, key: str, exclude: Collection[str] = ()) -> tuple[str, bool]:
        """(node, on_owner) for one call of `key`, counted until `release(node, on_owner)`. Suspects are
        avoided unless only they are left; nodes in `exclude` never get it. Unavailable when none is left."""
        with self._lock:
            avoid = self._avoid(exclude)
            owner = next((n for n in self._balancer.ring.owners(key, len(avoid) + 1) if n not in avoid), None)
            if owner is not None and self._on_owner.get(owner, 0) < self._floor(owner):
                self._on_owner[owner] = self._on_owner.get(owner, 0) + 1
                return owner, True
            return self._balancer.acquire(key, avoid), False

    def release(self, node_id: str, on_owner: bool) -> None:
        with self._lock:
            if not on_owner:
                self._balancer.release(node_id)
            elif self._on_owner.get(node_id, 0) <= 1:
                self._on_owner.pop(node_id, None)
            else:
                self._on_owner[node_id] -= 1

    def suspect(self, node_id: str) -> None:
        """Avoid `node_id` for suspect_s (it answered UNAVAILABLE)."""
        with self._lock:
            self._suspects[node_id] = self._clock() + self.config.suspect_s

    def suspects(self) -> set[str]:
        with self._lock:
            now = self._clock()
            return {node for node, until in self._suspects.items() if until > now}

    def in_flight(self) -> dict[str, int]:
        """Calls from here in flight per node (owner floor and balancer together)."""
        with self._lock:
            counts = dict(self._balancer.loads())
            for node, count in self._on_owner.items():
                counts[node] = counts.get(node, 0) + count
            return {node: count for node, count in counts.items() if count}

    # -- internals (self._lock held) -------------------------------------------------------------------
    def _avoid(self, exclude: Collection[str]) -> set[str]:
        now = self._clock()
        self._suspects = {node: until for node, until in self._suspects.items() if until > now}
        avoid = set(exclude) | set(self._suspects)
        if all(node in avoid for node in self._balancer.ring.nodes):
            return set(exclude)  # only suspects left: trying one beats refusing the call
        return avoid

    def _floor(self, node_id: str) -> int:
        node = self._nodes.get(node_id)
        return 0 if node is None else int(self.config.owner_share * node.capacity)
