"""Consistent hashing with bounded loads: which worker serves a user. Pure: no I/O, no clocks.

A `Ring` places `round(vnodes * weight)` points per node on a 64-bit circle; a key belongs to the
first point at or after its own hash, clockwise (Karger et al. 1997). Walking on from there gives the
key's *spill order*: its distinct nodes, nearest first. `pick` adds bounded loads (Mirrokni, Thorup,
Zadimoghaddam 2016; Envoy's `hash_balance_factor`, HAProxy's `hash-balance-factor`): it takes the
first node of the spill order that is not above its share of `(1 + eps)` times the average load.

Every hash is BLAKE2b-64 read big-endian, never Python's `hash()`, so every process, machine and
Python version maps a key to the same node. Point `j` of a node hashes `name, j`: a node's points
are a prefix-stable sequence, so changing its weight adds or removes only its last points.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType

from personalize.errors import InvalidArgument, Unavailable

DEFAULT_VNODES = 160
DEFAULT_EPS = 0.25
DEFAULT_STICKY_KEYS = 65_536
"""Spilled keys a BoundedLoadBalancer remembers (~150 bytes each)."""
MAX_POINTS_PER_NODE = 1 << 20
"""A weight that asks for more points than this is refused (memory, build time)."""

_KEY_PERSON = b"pz-ring-key"
_NODE_PERSON = b"pz-ring-node"


def route_key(tenant: str, user_id: str) -> str:
    """The routing key of a user: `<len(tenant)>:<tenant><user_id>`, lengths in code points.

    The length prefix makes the pair unambiguous: ("ab", "c") and ("a", "bc") give different keys.
    Routers, the client SDK and workers must all route on this one key.
    """
    if not isinstance(tenant, str) or not isinstance(user_id, str):
        raise TypeError(f"tenant and user_id must be str, got {type(tenant).__name__}, {type(user_id).__name__}")
    return f"{len(tenant)}:{tenant}{user_id}"


def key_hash(key: str) -> int:
    """The 64-bit position of `key` on the ring (BLAKE2b-64 of its UTF-8, big-endian)."""
    # surrogatepass: every Python str hashes, lone surrogates included, injectively.
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8, person=_KEY_PERSON).digest()
    return int.from_bytes(digest, "big")


@functools.lru_cache(maxsize=4096)
def node_points(name: str, count: int) -> tuple[int, ...]:
    """The first `count` ring positions of node `name`: BLAKE2b-64 of name, 0x00, j (4 bytes)."""
    prefix = name.encode("utf-8", "surrogatepass") + b"\0"
    return tuple(
        int.from_bytes(
            hashlib.blake2b(prefix + j.to_bytes(4, "big"), digest_size=8, person=_NODE_PERSON).digest(), "big"
        )
        for j in range(count)
    )


def load_bound(total_load: float, weight: float, total_weight: float, eps: float) -> int:
    """Most load a node may hold after taking one more request: `ceil((1+eps)(L+1) w / W)`.

    L is the load over all the ring's nodes before the request, w the node's weight, W the ring's
    total weight (with equal weights, `ceil((1+eps)(L+1)/N)`). The bounds sum to at least
    (1+eps)(L+1) > L, so some node always has room; a node never ends above `ceil((1+eps) L w / W)`.
    """
    return math.ceil((1.0 + eps) * (total_load + 1.0) * weight / total_weight)


def _check_weights(nodes: Mapping[str, float] | Iterable[str]) -> dict[str, float]:
    weights = dict(nodes) if isinstance(nodes, Mapping) else dict.fromkeys(nodes, 1.0)
    for name, weight in weights.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"node names must be non-empty str, got {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
            raise InvalidArgument(f"weight of node {name!r} must be a finite number > 0, got {weight!r}")
    return weights


def _check_eps(eps: float) -> None:
    if not math.isfinite(eps) or eps < 0:
        raise InvalidArgument(f"eps must be a finite number >= 0, got {eps!r}")


class Ring:
    """An immutable consistent-hash ring over weighted nodes named by stable ids (pod names, not IPs).

    A node of weight w gets `max(1, round(vnodes * w))` points, so weights are relative to 1.0 and
    shares of the circle are roughly proportional to them. Equal rings (same names, weights, vnodes)
    route every key identically everywhere. Lookups are O(log points); safe to share across threads.
    """

    __slots__ = ("_owner_of_point", "_points", "_total_weight", "_weights", "vnodes")

    def __init__(self, nodes: Mapping[str, float] | Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        if isinstance(vnodes, bool) or not isinstance(vnodes, int) or vnodes < 1:
            raise InvalidArgument(f"vnodes must be an int >= 1, got {vnodes!r}")
        self.vnodes = vnodes
        self._weights = _check_weights(nodes)
        self._total_weight = math.fsum(self._weights.values())  # exactly rounded: node order never matters
        placed: list[tuple[int, str]] = []
        for name, weight in self._weights.items():
            count = max(1, round(vnodes * weight))
            if count > MAX_POINTS_PER_NODE:
                raise InvalidArgument(
                    f"node {name!r}: vnodes * weight = {count} points, more than {MAX_POINTS_PER_NODE}"
                )
            placed.extend((point, name) for point in node_points(name, count))
        placed.sort()  # ties (a 2**-64 chance) break by name, so every process agrees
        self._points = [point for point, _ in placed]
        self._owner_of_point = [name for _, name in placed]

    @property
    def nodes(self) -> Mapping[str, float]:
        """Node name -> weight (read-only)."""
        return MappingProxyType(self._weights)

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, name: object) -> bool:
        return name in self._weights

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ring) and self.vnodes == other.vnodes and self._weights == other._weights

    def __hash__(self) -> int:
        return hash((self.vnodes, frozenset(self._weights.items())))

    def __repr__(self) -> str:
        return f"Ring({dict(sorted(self._weights.items()))!r}, vnodes={self.vnodes})"

    def owner(self, key: str) -> str:
        """The node owning `key` (plain consistent hashing, no load check). Unavailable if empty."""
        return self._owner_of_point[self._start(key)]

    def owners(self, key: str, n: int | None = None) -> list[str]:
        """The first `n` distinct nodes clockwise from `key` (all nodes when n is None; fewer when the
        ring has fewer): the key's spill order, `owners(key)[0] == owner(key)`."""
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InvalidArgument(f"n must be an int >= 1 or None, got {n!r}")
        want = len(self._weights) if n is None else min(n, len(self._weights))
        found: list[str] = []
        for name in self._walk(self._start(key)):
            found.append(name)
            if len(found) == want:
                break
        return found

    def pick(
        self,
        key: str,
        loads: Mapping[str, float],
        eps: float = DEFAULT_EPS,
        *,
        total_load: float | None = None,
        exclude: Collection[str] = (),
    ) -> str:
        """The first node of `owners(key)` whose load + 1 <= `load_bound(L, w, W, eps)` (bounded loads).

        `loads` maps node -> current load (missing = 0; nodes not on the ring are ignored); L is their
        sum over the ring's nodes, or `total_load` when the caller keeps it. Nodes in `exclude` are
        skipped (a retry after the owner failed); if then no node has room, the one with the least
        (load + 1) / weight wins. Unavailable when no node is left.
        """
        return self.pick_ranked(key, loads, eps, total_load=total_load, exclude=exclude)[0]

    def pick_ranked(
        self,
        key: str,
        loads: Mapping[str, float],
        eps: float = DEFAULT_EPS,
        *,
        total_load: float | None = None,
        exclude: Collection[str] = (),
    ) -> tuple[str, int]:
        """`pick`, and the chosen node's position in `owners(key)` (0: the owner, no spill)."""
        _check_eps(eps)
        start = self._start(key)
        total = math.fsum(loads.get(name, 0.0) for name in self._weights) if total_load is None else total_load
        best: tuple[str, int] | None = None
        best_ratio = math.inf
        for rank, name in enumerate(self._walk(start)):
            if name in exclude:
                continue
            weight = self._weights[name]
            load = loads.get(name, 0.0)
            if load + 1.0 <= load_bound(total, weight, self._total_weight, eps):
                return name, rank
            if (load + 1.0) / weight < best_ratio:  # only reached with `exclude` or inconsistent loads
                best, best_ratio = (name, rank), (load + 1.0) / weight
        if best is None:
            raise Unavailable(f"no worker left to route to ({len(self._weights)} on the ring, {len(exclude)} excluded)")
        return best

    def with_node(self, name: str, weight: float = 1.0) -> Ring:
        """A new ring with `name` added (or re-weighted); this one is unchanged."""
        return Ring({**self._weights, name: weight}, self.vnodes)

    def without_node(self, name: str) -> Ring:
        """A new ring without `name` (KeyError if absent); this one is unchanged."""
        if name not in self._weights:
            raise KeyError(name)
        return Ring({n: w for n, w in self._weights.items() if n != name}, self.vnodes)

    def _start(self, key: str) -> int:
        """Index of the first point at or after the key's hash, wrapping past the top."""
        if not self._points:
            raise Unavailable("no worker to route to: the ring is empty")
        index = bisect.bisect_left(self._points, key_hash(key))
        return 0 if index == len(self._points) else index

    def _walk(self, start: int) -> Iterator[str]:
        """Distinct nodes clockwise from point `start`, each once, nearest first."""
        owners = self._owner_of_point
        seen: set[str] = set()
        for index in range(start - len(owners), start):  # negative indexes wrap: start .. end, 0 .. start-1
            name = owners[index]
            if name not in seen:
                seen.add(name)
                yield name
                if len(seen) == len(self._weights):
                    return


class BoundedLoadBalancer:
    """In-flight requests per node, routed by `Ring.pick` with sticky spill: a router's state machine.

    `acquire(key)` picks a node under the bound and counts the request on it; `release(node)` ends it.
    Sticky spill: when a key spills off its owner, the node it landed on is remembered (up to
    `sticky_keys` keys, least recently used forgotten first) and preferred while it has room, so a hot
    user moves to one other worker instead of being split across two; every node chosen still obeys
    the bound. Keys on their owner are never remembered. `sticky_keys=0` walks the ring every time.
    `set_ring` swaps in a new membership view: requests still running on a node that left are tracked
    until released but no longer count towards the ring's total load.
    """

    def __init__(self, ring: Ring, eps: float = DEFAULT_EPS, sticky_keys: int = DEFAULT_STICKY_KEYS) -> None:
        _check_eps(eps)
        if isinstance(sticky_keys, bool) or not isinstance(sticky_keys, int) or sticky_keys < 0:
            raise InvalidArgument(f"sticky_keys must be an int >= 0, got {sticky_keys!r}")
        self.eps = eps
        self.sticky_keys = sticky_keys
        self._lock = threading.Lock()
        self._ring = ring
        self._loads: dict[str, int] = {}  # node -> in-flight; only nodes with requests or on the ring
        self._total = 0  # in-flight over the ring's nodes only
        self._spilled: OrderedDict[str, str] = OrderedDict()  # key -> node it spilled to, LRU order

    @property
    def ring(self) -> Ring:
        return self._ring

    def set_ring(self, ring: Ring) -> None:
        """Route new requests on `ring` from now on; remembered spills to nodes that left are dropped."""
        with self._lock:
            self._ring = ring
            self._loads = {name: load for name, load in self._loads.items() if load > 0 or name in ring}
            self._total = sum(self._loads.get(name, 0) for name in ring.nodes)
            self._spilled = OrderedDict((key, node) for key, node in self._spilled.items() if node in ring)

    def acquire(self, key: str, exclude: Collection[str] = ()) -> str:
        """The node to send one request for `key` to, counted as in flight until `release(node)`."""
        with self._lock:
            node = self._sticky_node(key, exclude)
            if node is None:
                node, rank = self._ring.pick_ranked(key, self._loads, self.eps, total_load=self._total, exclude=exclude)
                self._remember(key, node, spilled=rank > 0)
            self._loads[node] = self._loads.get(node, 0) + 1
            self._total += 1
            return node

    def release(self, node: str) -> None:
        """One request on `node` finished. ValueError if none was in flight there."""
        with self._lock:
            load = self._loads.get(node, 0)
            if load <= 0:
                raise ValueError(f"release({node!r}) without a matching acquire")
            if node in self._ring:
                self._total -= 1
                self._loads[node] = load - 1
            elif load == 1:
                del self._loads[node]
            else:
                self._loads[node] = load - 1

    @contextmanager
    def lease(self, key: str, exclude: Collection[str] = ()) -> Iterator[str]:
        """`with balancer.lease(key) as node:` acquire on entry, release on exit (errors included)."""
        node = self.acquire(key, exclude)
        try:
            yield node
        finally:
            self.release(node)

    def loads(self) -> dict[str, int]:
        """A snapshot: node -> requests in flight."""
        with self._lock:
            return dict(self._loads)

    @property
    def total_load(self) -> int:
        """Requests in flight on the current ring's nodes."""
        return self._total

    def spilled(self) -> dict[str, str]:
        """A snapshot of the remembered spills: key -> node."""
        with self._lock:
            return dict(self._spilled)

    def _sticky_node(self, key: str, exclude: Collection[str]) -> str | None:
        """The remembered spill node of `key` if it is still on the ring, allowed and has room."""
        node = self._spilled.get(key)
        if node is None or node in exclude or node not in self._ring:
            return None
        weight = self._ring.nodes[node]
        if self._loads.get(node, 0) + 1 > load_bound(self._total, weight, self._ring.total_weight, self.eps):
            return None
        self._spilled.move_to_end(key)
        return node

    def _remember(self, key: str, node: str, spilled: bool) -> None:
        if self.sticky_keys == 0:
            return
        if not spilled:  # on its owner: the ring finds it without help
            self._spilled.pop(key, None)
            return
        self._spilled[key] = node
        self._spilled.move_to_end(key)
        if len(self._spilled) > self.sticky_keys:
            self._spilled.popitem(last=False)
