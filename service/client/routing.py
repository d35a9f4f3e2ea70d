"""Client-side routing: the SDK sends each call straight to the worker that owns its user, skipping the
router hop (docs/architecture.md, Routing).

    from personalize_service.client.sdk import PersonalizeClient
    with PersonalizeClient.discover("redis://valkey:6379/0", api_key=KEY, tenant="acme") as client:
        print(client.generate("alice", "Say hi").text)

A RoutingClient watches the membership the workers announce in the registry's Valkey and routes exactly
as the router does (service/client/cluster.py: the same ring on `route_key(tenant, user_id)`, owner first,
bounded loads past a floor): an idempotent call whose worker answers UNAVAILABLE is sent once more, to the
next worker of the user's spill order. It has PersonalizeClient's methods and errors; `stats()` asks every
worker and `list_nodes()` shows the membership it routes on.

The tenant is part of the routing key, and the client cannot learn it from its API key: pass the tenant
your key selects (`default` when the servers run without keys). A wrong tenant still gets correct
answers (each worker authenticates the key itself), only from a worker that is not the user's owner.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import grpc

from personalize import errors
from personalize.routing.membership import Membership, MembershipConfig, membership_client
from personalize.routing.placement import RouteConfig
from personalize.routing.ring import route_key
from personalize_service.client.cluster import Cluster, Upstream, gather_stats, node_list
from personalize_service.client.sdk import (
    GenerationStream,
    PersonalizeClient,
    RetryPolicy,
    UnavailableError,
    await_future,
    error_from,
    open_channel,
    time_left,
)
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.server.auth import DEFAULT_TENANT


class RoutingClient(PersonalizeClient):
    """PersonalizeClient over every worker of a deployment, routing each call to its user's owner.

    registry_url: redis:// URL of the registry where workers heartbeat. api_key, timeout, tls: as for
    PersonalizeClient (tls applies to the workers' channels). tenant: the tenant the key selects (required
    with a key; `default` without). route, membership: must match the deployment's routers (defaults do).
    """

    def __init__(
        self,
        registry_url: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        tls: bool | bytes | grpc.ChannelCredentials | None = None,
        *,
        tenant: str | None = None,
        route: RouteConfig | None = None,
        membership: MembershipConfig | None = None,
    ) -> None:
        if tenant is None and api_key:
            raise ValueError("tenant= is needed to route with an API key: pass the tenant your key selects")
        self._configure(api_key, timeout, RetryPolicy(retries=1, backoff=0.0))
        self.tenant = tenant or DEFAULT_TENANT
        self._cluster = Cluster(
            Membership(membership_client(registry_url), membership or MembershipConfig()),
            lambda address: open_channel(address, tls),
            route or RouteConfig(),
        ).start()
        self._owns_cluster = True

    def for_key(self, api_key: str | None, tenant: str | None) -> RoutingClient:
        """A client sending `api_key` (which selects `tenant`) over this client's cluster: the same membership
        watch and worker channels, so a process serving many keys holds one set of them. Closing it leaves the
        cluster running; closing this client stops it."""
        if tenant is None and api_key:
            raise ValueError("tenant= is needed to route with an API key: pass the tenant your key selects")
        view = RoutingClient.__new__(RoutingClient)
        view._configure(api_key, self.timeout, self._retry)
        view.tenant = tenant or DEFAULT_TENANT
        view._cluster, view._owns_cluster = self._cluster, False
        return view

    @property
    def cluster(self) -> Cluster:
        """The routing state (ring, in-flight calls, suspects)."""
        return self._cluster

    def stats(self) -> pb.StatsResponse:
        """Stats of every live worker; `degraded` when some did not answer."""
        return gather_stats(self._cluster, self.timeout, self._metadata)

    def list_nodes(self) -> pb.ListNodesResponse:
        """The membership this client routes on."""
        return pb.ListNodesResponse(nodes=node_list(self._cluster))

    def close(self) -> None:
        if self._owns_cluster:
            self._cluster.stop()

    def _call(self, rpc: str, request: Any, *, idempotent: bool) -> Any:
        deadline = time.monotonic() + self.timeout

        def send(upstream: Upstream) -> Any:
            return getattr(upstream.api, rpc)(request, timeout=time_left(deadline), metadata=self._call_metadata())

        with _typed_errors():
            return self._cluster.call(route_key(self.tenant, request.user_id), send, retry=idempotent)

    async def _acall(self, rpc: str, request: Any, *, idempotent: bool) -> Any:
        deadline = time.monotonic() + self.timeout
        metadata = self._call_metadata()

        async def send(upstream: Upstream) -> Any:
            method = getattr(upstream.api, rpc)
            return await await_future(method.future(request, timeout=time_left(deadline), metadata=metadata))

        with _typed_errors():
            return await self._cluster.acall(route_key(self.tenant, request.user_id), send, retry=idempotent)

    def _stream(self, request: pb.GenerateRequest) -> GenerationStream:
        """A stream on the owner; restarted once on the next worker if UNAVAILABLE before its first chunk."""
        deadline = time.monotonic() + self.timeout
        key = route_key(self.tenant, request.user_id)
        tried: list[str] = []

        def start() -> Any:
            if tried:
                self._cluster.suspect(tried[-1])
            try:
                ticket = self._cluster.acquire(key, tried)
            except errors.Unavailable as exc:
                raise UnavailableError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            tried.append(ticket.upstream.node_id)
            call = ticket.upstream.api.GenerateStream(
                request, timeout=time_left(deadline), metadata=self._call_metadata()
            )
            call.add_done_callback(lambda _call: self._cluster.release(ticket))
            return call

        return GenerationStream(start, self._retry)


@contextlib.contextmanager
def _typed_errors() -> Iterator[None]:
    """A forwarded call's failure as the SDK's typed error: grpc's status, or UNAVAILABLE for an empty ring."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from(exc) from None
    except errors.Unavailable as exc:  # no worker on the ring
        raise UnavailableError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
