"""Who the live workers are: workers heartbeat into the registry's Valkey/Redis, routers watch it.

Layout, in namespace `ns`:

    {ns}:node:<node_id>   string, JSON {"address", "capacity", "load", "state"}, PX = ttl_s
    {ns}:nodes            sorted set of node ids (score: last beat, unix ms; informative only)

A node is live while its key exists: the server expires the key `ttl_s` after the last beat, so a
crashed worker drops out with no one's help, and a clean leave deletes it at once. The sorted set only
lists candidates; readers drop ids whose key is gone. Redis Cluster: every key carries the hash tag
`{ns}`, so all of them live in one slot and a beat (SET + ZADD) or a read (ZRANGE + MGET) never
crosses slots. The data is a few hundred bytes per worker, so one slot is never a hot spot.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, TypeVar

from personalize import valkey
from personalize.errors import InvalidArgument, Unavailable
from personalize.routing.ring import DEFAULT_VNODES, Ring

log = logging.getLogger(__name__)
T = TypeVar("T")


def membership_client(registry_url: str, cluster: bool = False) -> Any:
    """A binary-safe redis client for membership reads and beats, with short timeouts (a beat that
    hangs longer than the TTL is worthless); a cluster client for a redis+cluster:// URL or `cluster`."""
    return valkey.connect(
        registry_url,
        cluster,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        decode_responses=False,
        max_connections=valkey.MAX_CONNECTIONS,
    )


SERVING = "serving"
DRAINING = "draining"
STATES = (SERVING, DRAINING)

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,253}$")  # k8s pod names, host:port, uuids


@dataclass(frozen=True)
class MembershipConfig:
    """Where workers announce themselves and how fast a dead one is forgotten."""

    namespace: str = "pz"
    """Key prefix (and Redis Cluster hash tag) shared by the workers and routers of one deployment."""
    ttl_s: float = 3.0
    """A node drops out this long after its last beat (a crash, a partition)."""
    heartbeat_s: float = 1.0
    """Interval between beats; well under ttl_s so one late beat does not drop a live node."""

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not _NAMESPACE_RE.match(self.namespace):
            raise InvalidArgument(f"namespace must match {_NAMESPACE_RE.pattern}, got {self.namespace!r}")
        if not math.isfinite(self.ttl_s) or self.ttl_s < 0.01:
            raise InvalidArgument(f"ttl_s must be a finite number >= 0.01, got {self.ttl_s!r}")
        if not math.isfinite(self.heartbeat_s) or not 0 < self.heartbeat_s < self.ttl_s:
            raise InvalidArgument(f"heartbeat_s must be in (0, ttl_s={self.ttl_s}), got {self.heartbeat_s!r}")

    @property
    def index_key(self) -> str:
        return f"{{{self.namespace}}}:nodes"

    def node_key(self, node_id: str) -> str:
        return f"{{{self.namespace}}}:node:{node_id}"


@dataclass(frozen=True)
class NodeInfo:
    """One worker as it announces itself."""

    node_id: str
    """Stable name, hashed onto the ring: the StatefulSet pod name, never the pod IP."""
    address: str
    """Where routers send its calls (host:port)."""
    capacity: float
    """Relative serving capacity (> 0), e.g. its adapter slots; the node's ring weight is proportional."""
    load: float = 0.0
    """Current load (>= 0), e.g. requests in flight; refreshed on every beat."""
    state: str = SERVING
    """SERVING, or DRAINING: about to leave, so routers send it no new users."""

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not _NODE_ID_RE.match(self.node_id):
            raise InvalidArgument(f"node_id must match {_NODE_ID_RE.pattern}, got {self.node_id!r:.80}")
        if not isinstance(self.address, str) or not 0 < len(self.address) <= 1024:
            raise InvalidArgument(f"address must be a non-empty str, got {self.address!r:.80}")
        if not _finite(self.capacity) or self.capacity <= 0:
            raise InvalidArgument(f"capacity must be a finite number > 0, got {self.capacity!r}")
        if not _finite(self.load) or self.load < 0:
            raise InvalidArgument(f"load must be a finite number >= 0, got {self.load!r}")
        if self.state not in STATES:
            raise InvalidArgument(f"state must be one of {STATES}, got {self.state!r:.40}")


def _finite(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def pack_node(node: NodeInfo) -> bytes:
    """The stored value of a node (its id is in the key)."""
    return json.dumps(
        {"address": node.address, "capacity": node.capacity, "load": node.load, "state": node.state},
        separators=(",", ":"),
    ).encode()


def unpack_node(node_id: str, raw: bytes) -> NodeInfo:
    """Inverse of pack_node; InvalidArgument when the value is not a node record."""
    try:
        fields = json.loads(raw)
        return NodeInfo(node_id, fields["address"], fields["capacity"], fields["load"], fields["state"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"membership record of {node_id!r} is malformed: {exc}") from exc


def ring_of(nodes: Mapping[str, NodeInfo], vnodes: int = DEFAULT_VNODES) -> Ring:
    """The ring of the serving nodes, weight = capacity / the largest serving capacity.

    Equal capacities all weigh exactly 1.0, so joins and leaves move only the joiner's or leaver's
    share; a new largest capacity re-weights the others (their last points come or go).
    """
    serving = {node_id: node.capacity for node_id, node in nodes.items() if node.state == SERVING}
    largest = max(serving.values(), default=1.0)
    return Ring({node_id: capacity / largest for node_id, capacity in serving.items()}, vnodes)


def _call(fn: Callable[[], T]) -> T:
    """Run one server round trip; Unavailable when the server cannot be reached or refuses."""
    return valkey.call(fn, "membership server")


def _check_binary_client(client: Any) -> None:
    pool = getattr(client, "connection_pool", None) or getattr(client, "nodes_manager", None)
    if getattr(pool, "connection_kwargs", {}).get("decode_responses"):
        raise InvalidArgument("membership needs a redis client with decode_responses=False")


class Heartbeat:
    """A worker's announcement: beats `node` every `heartbeat_s` on its own thread until stopped.

    `load_fn`, if given, is called before every beat and its value published as the node's load.
    Beats that fail are logged and retried on the next tick; the node drops out if none lands
    within ttl_s. The node info is owned by this object (drain() and load_fn change it).
    """

    def __init__(
        self, client: Any, config: MembershipConfig, node: NodeInfo, load_fn: Callable[[], float] | None = None
    ) -> None:
        _check_binary_client(client)
        self._client = client
        self.config = config
        self._node = node
        self._load_fn = load_fn
        self._lock = threading.Lock()  # guards _node
        self._beat_lock = threading.Lock()  # one beat at a time: a snapshot is written before the next is taken
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    @property
    def node(self) -> NodeInfo:
        with self._lock:
            return self._node

    def beat(self) -> None:
        """Announce the node now (SET with PX ttl + ZADD to the index). Unavailable on failure.

        Beats are serialized from snapshot to write, so the last write is of the newest state: the periodic
        beat's SERVING, taken just before drain(), cannot land after drain()'s DRAINING."""
        with self._beat_lock:
            self._refresh_load()
            node = self.node
            key, ttl_ms = self.config.node_key(node.node_id), max(1, round(self.config.ttl_s * 1000))

            def write() -> None:
                pipe = self._client.pipeline(transaction=False)
                pipe.set(key, pack_node(node), px=ttl_ms)
                pipe.zadd(self.config.index_key, {node.node_id: int(time.time() * 1000)})
                pipe.execute()

            _call(write)

    def start(self) -> Heartbeat:
        """Beat once now (Unavailable if the server cannot be reached), then keep beating. Once only."""
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError("a heartbeat starts once: make a new one after stop()")
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self._node.node_id}", daemon=True)
        self._thread.start()
        return self

    def drain(self) -> None:
        """Mark the node draining (routers stop sending it new users) and announce that at once;
        if the server is unreachable the next beat carries it."""
        with self._lock:
            self._node = replace(self._node, state=DRAINING)
        try:
            self.beat()
        except Unavailable as exc:
            log.warning("could not announce that %s is draining: %s", self._node.node_id, exc)

    def stop(self, leave: bool = True) -> None:
        """Stop beating. leave=True deletes the node's key (a clean leave, seen by the next poll);
        leave=False lets it expire after ttl_s, as a crash would. Best effort: never raises."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # no beat may land after the delete below
            self._thread = None
        if not leave:
            return
        node_id = self._node.node_id

        def delete() -> None:
            pipe = self._client.pipeline(transaction=False)
            pipe.delete(self.config.node_key(node_id))
            pipe.zrem(self.config.index_key, node_id)
            pipe.execute()

        try:
            _call(delete)
        except Unavailable as exc:
            log.warning("%s could not leave cleanly (it expires in %.1fs): %s", node_id, self.config.ttl_s, exc)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(leave=True)

    def _refresh_load(self) -> None:
        if self._load_fn is None:
            return
        try:
            load = float(self._load_fn())
            with self._lock:
                self._node = replace(self._node, load=load)
        except Exception as exc:  # a broken gauge must not stop the node from announcing itself
            log.warning("load of %s not refreshed: %s", self._node.node_id, exc)

    def _run(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            try:
                self.beat()
            except Unavailable as exc:
                if not self._failing:
                    log.warning("heartbeat of %s failing: %s", self._node.node_id, exc)
                self._failing = True
                continue
            if self._failing:
                log.info("heartbeat of %s recovered", self._node.node_id)
            self._failing = False


class Membership:
    """The live nodes as the server sees them: `nodes()` reads now, `watch()` keeps a view current."""

    def __init__(self, client: Any, config: MembershipConfig) -> None:
        _check_binary_client(client)
        self._client = client
        self.config = config

    def forget_all(self) -> None:
        """Delete every node record of the namespace (for a deployment's own, just started server, where any
        record is a previous run's persisted in the AOF: no one must route to it)."""
        ids = [raw.decode() for raw in self._client.zrange(self.config.index_key, 0, -1)]
        self._client.delete(self.config.index_key, *(self.config.node_key(node_id) for node_id in ids))

    def nodes(self) -> dict[str, NodeInfo]:
        """Every live node (serving or draining), by id. Unavailable if the server is unreachable.

        Ids whose key expired are removed from the index as a side effect (a re-join re-adds itself
        on its next beat, so this race costs at most one heartbeat of invisibility).
        """
        ids = [raw.decode() for raw in _call(lambda: self._client.zrange(self.config.index_key, 0, -1))]
        if not ids:
            return {}
        values = _call(lambda: self._client.mget([self.config.node_key(node_id) for node_id in ids]))
        found: dict[str, NodeInfo] = {}
        gone: list[str] = []
        for node_id, raw in zip(ids, values, strict=True):
            if raw is None:
                gone.append(node_id)
                continue
            try:
                found[node_id] = unpack_node(node_id, raw)
            except InvalidArgument as exc:  # one bad record must not hide the other workers
                log.warning("skipping node: %s", exc)
        if gone:
            _call(lambda: self._client.zrem(self.config.index_key, *gone))
        return found

    def ring(self, vnodes: int = DEFAULT_VNODES) -> Ring:
        """A ring of the serving nodes read now, weighted by capacity (see `ring_of`)."""
        return ring_of(self.nodes(), vnodes)

    def watch(self, on_change: Callable[[dict[str, NodeInfo]], None] | None = None, poll_s: float = 0.5) -> Watcher:
        """Start a thread polling `nodes()` every `poll_s`; see Watcher."""
        return Watcher(self, on_change, poll_s).start()


def _shape(nodes: Mapping[str, NodeInfo]) -> dict[str, tuple[str, float, str]]:
    """What routing depends on: loads change every beat and are not a membership change."""
    return {node_id: (node.address, node.capacity, node.state) for node_id, node in nodes.items()}


class Watcher:
    """A router's view of membership, refreshed by a polling thread.

    `on_change(nodes)` runs on that thread with the first view read, then whenever a node joins,
    leaves, or changes address, capacity or state (load alone is not a change). While the server is
    unreachable the last view is kept, not emptied: routing on a stale view beats routing nowhere.
    """

    def __init__(
        self,
        membership: Membership,
        on_change: Callable[[dict[str, NodeInfo]], None] | None = None,
        poll_s: float = 0.5,
    ) -> None:
        if not math.isfinite(poll_s) or poll_s <= 0:
            raise InvalidArgument(f"poll_s must be a finite number > 0, got {poll_s!r}")
        self.membership = membership
        self.poll_s = poll_s
        self._on_change = on_change
        self._view: dict[str, NodeInfo] = {}
        self._shape: dict[str, tuple[str, float, str]] | None = None  # None until a poll succeeded
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: Unavailable | None = None
        """The error of the latest poll, None when it succeeded."""

    def current(self) -> dict[str, NodeInfo]:
        """The latest view (a copy): live nodes by id; empty until a poll has succeeded."""
        return dict(self._view)

    def ring(self, vnodes: int = DEFAULT_VNODES) -> Ring:
        """A ring of the serving nodes of the latest view."""
        return ring_of(self._view, vnodes)

    def poll(self) -> bool:
        """Read membership now; True when the view changed (on_change has then run). A failed read
        keeps the last view and records `last_error`."""
        try:
            nodes = self.membership.nodes()
        except Unavailable as exc:
            if self.last_error is None:
                log.warning("membership unreachable, keeping the last view of %d nodes: %s", len(self._view), exc)
            self.last_error = exc
            return False
        self.last_error = None
        self._view = nodes  # replaced whole: readers never see a half-updated dict
        shape = _shape(nodes)
        if shape == self._shape:
            return False
        self._shape = shape
        if self._on_change is not None:
            try:
                self._on_change(dict(nodes))
            except Exception:  # a failing callback must not stop the watcher
                log.exception("membership on_change callback failed")
        return True

    def start(self) -> Watcher:
        """Poll once now, then every poll_s on a daemon thread. Once only."""
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError("a watcher starts once: make a new one after stop()")
        self.poll()
        self._thread = threading.Thread(target=self._run, name="membership-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (waits for a poll in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Watcher:
        return self if self._thread is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()
