"""The live workers as a router (or the SDK) sees them: membership -> ring -> balancer -> one channel per
worker, and the failover rule for one call. Shared by service/server/router.py and the SDK's RoutingClient.

    cluster = Cluster(Membership(membership_client(url), MembershipConfig()), open_channel).start()
    response = cluster.call(route_key(tenant, user_id),
                            lambda upstream: upstream.api.Generate(request, timeout=5), retry=True)
    cluster.stop()

Placement (the owner floor, bounded loads, suspects) is `personalize.routing.placement.Placement`; this
module adds a channel per worker and the failover rule: an idempotent call whose node answers UNAVAILABLE
(it died, or is draining) is sent once more, to the next node of the key's spill order (the first one
excluded), and the failed node becomes a suspect.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from personalize.errors import Unavailable
from personalize.routing.membership import DRAINING, Membership, NodeInfo, Watcher
from personalize.routing.placement import Placement, RouteConfig
from personalize.routing.ring import Ring
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_ROUTE = RouteConfig()


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` is a failed gRPC call with status UNAVAILABLE."""
    code = getattr(exc, "code", None)
    return isinstance(exc, grpc.RpcError) and callable(code) and code() == grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class Upstream:
    """One worker and the channel (with stubs) this process uses for it."""

    node_id: str
    address: str
    channel: grpc.Channel
    api: pb_grpc.PersonalizeStub
    admin: pb_grpc.AdminStub


@dataclass(frozen=True)
class Ticket:
    """A call counted as in flight on `upstream` until `Cluster.release(ticket)`."""

    upstream: Upstream
    on_owner: bool
    """Counted against the owner's floor (True) or by the balancer (False)."""


class Cluster:
    """Routing state over the live workers; thread-safe. `start()` watches membership; `apply(nodes)`
    sets a view directly (tests, or a caller with its own source of membership)."""

    def __init__(
        self,
        membership: Membership | None,
        open_channel: Callable[[str], grpc.Channel],
        config: RouteConfig = DEFAULT_ROUTE,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[dict[str, NodeInfo]], None] | None = None,
    ) -> None:
        self.config = config
        self.placement = Placement(config, clock)
        self._membership = membership
        self._open_channel = open_channel
        self._on_change = on_change
        self._lock = threading.Lock()  # guards _upstreams
        self._upstreams: dict[str, Upstream] = {}  # by address
        self._watcher: Watcher | None = None

    # -- membership ------------------------------------------------------------------------------------
    def start(self) -> Cluster:
        """Read membership now (a failed read leaves the view empty), then keep polling it."""
        if self._membership is None:
            raise RuntimeError("this cluster has no membership to watch; use apply()")
        self._watcher = Watcher(self._membership, self.apply, self.config.poll_s).start()
        return self

    def stop(self) -> None:
        """Stop watching and close every channel (calls still running on them are cancelled)."""
        if self._watcher is not None:
            self._watcher.stop()
        with self._lock:
            upstreams, self._upstreams = list(self._upstreams.values()), {}
        for upstream in upstreams:
            upstream.channel.close()

    def apply(self, nodes: Mapping[str, NodeInfo]) -> None:
        """Route on `nodes` (serving ones go on the ring) from now on; channels of addresses no node has
        any more are closed."""
        addresses = {node.address for node in nodes.values()}
        with self._lock:
            self.placement.set_nodes(nodes)
            gone = [self._upstreams.pop(a) for a in list(self._upstreams) if a not in addresses]
        for upstream in gone:
            upstream.channel.close()
        log.info("ring: %s", ", ".join(f"{n.node_id}={n.address} ({n.state})" for n in nodes.values()) or "empty")
        if self._on_change is not None:
            self._on_change(dict(nodes))

    def nodes(self) -> dict[str, NodeInfo]:
        """Every live node (serving or draining) with its latest announced load."""
        if self._watcher is not None:
            return self._watcher.current()
        return self.placement.nodes()

    def ring(self) -> Ring:
        return self.placement.ring()

    def upstream(self, node_id: str) -> Upstream:
        """The channel to a live node; Unavailable if it is not in the view."""
        node = self.placement.node(node_id)
        if node is None:
            raise Unavailable(f"worker {node_id!r} is not in the membership view")
        with self._lock:
            upstream = self._upstreams.get(node.address)
            if upstream is None or upstream.node_id != node_id:
                if upstream is not None:
                    channel = upstream.channel
                else:
                    channel = self._open_channel(node.address)
                    keep_warm(channel)
                upstream = Upstream(
                    node_id, node.address, channel, pb_grpc.PersonalizeStub(channel), pb_grpc.AdminStub(channel)
                )
                self._upstreams[node.address] = upstream
            return upstream

    # -- placement (personalize.routing.placement) -----------------------------------------------------
    def acquire(self, key: str, exclude: Collection[str] = ()) -> Ticket:
        """The worker for one call of `key`, counted until `release` (see Placement.acquire)."""
        node, on_owner = self.placement.acquire(key, exclude)
        try:
            return Ticket(self.upstream(node), on_owner)
        except Unavailable:  # it left the view between the two reads
            self.placement.release(node, on_owner)
            raise

    def release(self, ticket: Ticket) -> None:
        self.placement.release(ticket.upstream.node_id, ticket.on_owner)

    def suspect(self, node_id: str) -> None:
        self.placement.suspect(node_id)

    def suspects(self) -> set[str]:
        return self.placement.suspects()

    def in_flight(self) -> dict[str, int]:
        return self.placement.in_flight()

    # -- calls -----------------------------------------------------------------------------------------
    def attempts(self, key: str, *, retry: bool) -> Iterator[Attempt]:
        """The attempts of one call, used as `for attempt in ...: with attempt as upstream: ...; return`.

        An attempt whose body raises UNAVAILABLE before `commit()` swallows the error and the loop goes
        on to a second attempt on the next node (only when `retry`, only once); any other exit ends it.
        If no other node is left, the second attempt raises the first one's error.
        """
        tried: list[str] = []
        first = Attempt(self, key, tried, may_retry=retry)
        yield first
        if first.failed is not None:
            yield Attempt(self, key, tried, may_retry=False, first_error=first.failed)

    def call(self, key: str, fn: Callable[[Upstream], T], *, retry: bool) -> T:
        """fn(upstream) on the key's worker; once more on the next worker after UNAVAILABLE if `retry`."""
        for attempt in self.attempts(key, retry=retry):
            with attempt as upstream:
                return fn(upstream)
        raise AssertionError("unreachable: the last attempt never swallows its error")

    async def acall(self, key: str, fn: Callable[[Upstream], Awaitable[T]], *, retry: bool) -> T:
        """`call` for a call awaited on an event loop: the same attempts, each held until `fn` is done."""
        for attempt in self.attempts(key, retry=retry):
            with attempt as upstream:
                return await fn(upstream)
        raise AssertionError("unreachable: the last attempt never swallows its error")


def keep_warm(channel: grpc.Channel, poll_s: float = 0.5) -> threading.Thread:
    """Hold one long-lived call (a health Watch, read on a daemon thread) open on `channel` while the
    worker serves; returns the thread.

    grpc Python polls a channel's calls on a thread it starts when the first call begins and ends when
    the last one finishes, so a forwarded call at low concurrency paid for starting a thread (in the
    router, contending for the GIL). With a call always open the thread stays. When the worker says
    NOT_SERVING (it drains) the watch is let go, so its shutdown never waits for it, and health is polled
    with plain Checks until it serves again (a restart); everything ends when the channel is closed.
    """
    serving = health_pb2.HealthCheckResponse.SERVING

    def watch() -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        while True:
            let_go = False
            try:
                if stub.Check(request, wait_for_ready=True).status == serving:
                    call = stub.Watch(request)
                    for reply in call:
                        if reply.status != serving:
                            let_go = True
                            call.cancel()
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and not let_go:  # the channel was closed
                    return
            except ValueError:  # "Cannot invoke RPC on closed channel"
                return
            time.sleep(poll_s)

    thread = threading.Thread(target=watch, name="upstream-watch", daemon=True)
    thread.start()
    return thread


class Attempt:
    """One try of a call on one worker: a context manager yielding its Upstream (see Cluster.attempts)."""

    def __init__(
        self, cluster: Cluster, key: str, tried: list[str], *, may_retry: bool, first_error: BaseException | None = None
    ) -> None:
        self._cluster = cluster
        self._key = key
        self._tried = tried
        self._may_retry = may_retry
        self._first_error = first_error
        self._ticket: Ticket | None = None
        self._committed = False
        self.failed: BaseException | None = None
        """The error this attempt swallowed so that the next one runs."""

    @property
    def number(self) -> int:
        """0 for the first attempt, 1 for the retry."""
        return 0 if self._first_error is None else 1

    def commit(self) -> None:
        """Part of the answer went out (a stream chunk): an error from now on is never retried."""
        self._committed = True

    def __enter__(self) -> Upstream:
        try:
            self._ticket = self._cluster.acquire(self._key, self._tried)
        except Unavailable:
            if self._first_error is not None:  # nobody left to retry on: the caller gets the real failure
                raise self._first_error from None
            raise
        return self._ticket.upstream

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self._ticket is not None
        self._cluster.release(self._ticket)
        node = self._ticket.upstream.node_id
        if exc is None or not is_unavailable(exc):
            return False
        self._cluster.suspect(node)
        if not self._may_retry or self._committed:
            return False
        log.info("worker %s unavailable (%s); retrying on the next worker", node, _details(exc))
        self._tried.append(node)
        self.failed = exc
        return True


def _details(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    return str(details()) if callable(details) else str(exc)


# ---- Admin over every worker -------------------------------------------------------------------------


def gather_stats(cluster: Cluster, timeout: float, metadata: Sequence[tuple[str, Any]] = ()) -> pb.StatsResponse:
    """Admin.Stats of every live worker, asked in parallel, their nodes in one response; `degraded` when
    some did not answer within `timeout` seconds."""
    response = pb.StatsResponse()
    calls: dict[str, Any] = {}
    for node_id in sorted(cluster.nodes()):
        try:
            calls[node_id] = cluster.upstream(node_id).admin.Stats.future(
                pb.StatsRequest(), timeout=timeout, metadata=metadata
            )
        except Unavailable:  # it left between the two reads
            response.degraded = True
    for node_id, call in calls.items():
        try:
            response.nodes.extend(call.result().nodes)
        except grpc.RpcError as exc:
            log.warning("Stats: worker %s did not answer: %s", node_id, _details(exc))
            response.degraded = True
    return response


def node_list(cluster: Cluster) -> list[pb.Node]:
    """ListNodes' view of membership by node id: state up, draining, or down for a node that failed calls
    just now; load as the node last announced it."""
    suspects = cluster.suspects()
    return [
        pb.Node(
            node_id=node_id,
            address=node.address,
            state="down" if node_id in suspects else "draining" if node.state == DRAINING else "up",
            load=round(node.load),
            capacity=round(node.capacity),
        )
        for node_id, node in sorted(cluster.nodes().items())
    ]
