"""The router (and the SDK's routing client) against real gRPC servers on loopback standing in for workers.

Each stand-in answers with its node id and records what reached it (request, metadata, deadline), so the
tests see the routing decision, the failover to the next owner when a worker is dead (a port nobody
listens on) or answers UNAVAILABLE, and what the router passes on. The membership view is applied
directly (`Cluster.apply`), except for the routing client, which reads real heartbeats from Valkey.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from personalize.adapters.registry import AdapterRecord, Registry
from personalize.routing.announce import AnnounceConfig, Announcement
from personalize.routing.membership import (
    DRAINING,
    Heartbeat,
    Membership,
    MembershipConfig,
    NodeInfo,
    membership_client,
    ring_of,
)
from personalize.routing.placement import RouteConfig
from personalize.routing.ring import route_key
from personalize_service.client import NotFoundError, PersonalizeClient, UnavailableError
from personalize_service.client.cluster import Cluster
from personalize_service.client.routing import RoutingClient
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.net import find_free_port
from personalize_service.server import convert, wire
from personalize_service.server.auth import ApiKeys
from personalize_service.server.base import ServiceConfig
from personalize_service.server.interceptors import ErrorInterceptor
from personalize_service.server.limits import IMPORT_CHUNK_BYTES, Limits
from personalize_service.server.metrics import ServiceMetrics
from personalize_service.server.router import RouterConfig, create_router, worker_channel_opener
from personalize_service.server.worker import add_personalize

LIVE = ("w0", "w1", "w2")
DEAD = "dead"
KEYS = ApiKeys.from_mapping({"acme": "key-acme", "globex": "key-globex"})


@dataclass
class Received:
    method: str
    request: Any
    metadata: dict[str, str]
    remaining: float | None


@dataclass
class FakeWorker(pb_grpc.PersonalizeServicer, pb_grpc.AdminServicer):
    """A worker stand-in: every answer names `node_id`; `fail[method]` makes that method abort with the
    code; a stream sends `chunks` pieces, aborting UNAVAILABLE after `stream_fail_after` of them, or holding
    after the first one until its caller goes away when `hold_stream` (then `stream_cancelled` is set)."""

    node_id: str
    received: list[Received] = field(default_factory=list)
    fail: dict[str, grpc.StatusCode] = field(default_factory=dict)
    chunks: tuple[str, ...] = ("Hel", "lo", "!")
    stream_fail_after: int | None = None
    hold_stream: bool = False
    stream_cancelled: threading.Event = field(default_factory=threading.Event)
    hold_generate: bool = False
    generate_held: threading.Event = field(default_factory=threading.Event)
    generate_cancelled: threading.Event = field(default_factory=threading.Event)

    def _enter(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        remaining = context.time_remaining()
        self.received.append(
            Received(
                method,
                request,
                dict(context.invocation_metadata()),
                None if remaining is None or remaining > 1e6 else remaining,
            )
        )
        code = self.fail.get(method)
        if code is not None:
            context.abort(code, f"{self.node_id} says {code.name}")

    def methods(self) -> list[str]:
        return [r.method for r in self.received]

    def Generate(self, request: Any, context: Any) -> pb.GenerateResponse:
        self._enter("Generate", request, context)
        if self.hold_generate:  # until the caller goes away
            self.generate_held.set()
            while context.is_active():
                time.sleep(0.01)
            self.generate_cancelled.set()
        return pb.GenerateResponse(text=f"{self.node_id}:{request.user_id}", node_id=self.node_id)

    def GenerateStream(self, request: Any, context: Any) -> Iterator[pb.GenerateChunk]:
        self._enter("GenerateStream", request, context)
        for index, piece in enumerate(self.chunks):
            if self.stream_fail_after == index:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.node_id} died mid-stream")
            yield pb.GenerateChunk(text=piece)
            if self.hold_stream:
                while context.is_active():
                    time.sleep(0.01)
                self.stream_cancelled.set()
                return
        yield pb.GenerateChunk(done=True, final=pb.GenerateResponse(text="".join(self.chunks), node_id=self.node_id))

    def SubmitFeedback(self, request: Any, context: Any) -> pb.FeedbackAck:
        self._enter("SubmitFeedback", request, context)
        return pb.FeedbackAck(event_id=f"{self.node_id}:{request.event_key}", partition=1)

    def GetAdapter(self, request: Any, context: Any) -> pb.AdapterInfo:
        self._enter("GetAdapter", request, context)
        return pb.AdapterInfo(user_id=request.user_id, version=1, owner_node=self.node_id)

    def DeleteUser(self, request: Any, context: Any) -> pb.DeleteUserResponse:
        self._enter("DeleteUser", request, context)
        return pb.DeleteUserResponse(versions_deleted=1)

    def ExportAdapter(self, request: Any, context: Any) -> pb.AdapterBundle:
        self._enter("ExportAdapter", request, context)
        return pb.AdapterBundle(info=pb.AdapterInfo(user_id=request.user_id, owner_node=self.node_id))

    def ImportAdapter(self, request: Any, context: Any) -> pb.AdapterInfo:
        self._enter("ImportAdapter", request, context)
        return pb.AdapterInfo(user_id=request.user_id, version=2, owner_node=self.node_id)

    def ImportAdapterStream(self, chunks: Iterator[pb.ImportAdapterChunk], context: Any) -> pb.AdapterInfo:
        request = convert.import_request(chunks, Limits())  # the worker's own reassembly
        self._enter("ImportAdapterStream", request, context)
        return pb.AdapterInfo(user_id=request.user_id, version=3, owner_node=self.node_id)

    def Stats(self, request: Any, context: Any) -> pb.StatsResponse:
        self._enter("Stats", request, context)
        return pb.StatsResponse(nodes=[pb.NodeStats(node_id=self.node_id)])


@dataclass
class Fleet:
    """Live stand-ins by node id, their addresses, and a dead address."""

    workers: dict[str, FakeWorker]
    addresses: dict[str, str]

    def view(self, nodes: tuple[str, ...] = (*LIVE, DEAD)) -> dict[str, NodeInfo]:
        return {n: NodeInfo(n, self.addresses[n], 4.0) for n in nodes}

    def reset(self) -> None:
        for worker in self.workers.values():
            worker.received.clear()
            worker.fail.clear()
            worker.stream_fail_after, worker.hold_stream = None, False
            worker.stream_cancelled.clear()
            worker.hold_generate = False
            worker.generate_held.clear()
            worker.generate_cancelled.clear()

    def answered(self) -> dict[str, list[str]]:
        return {n: w.methods() for n, w in self.workers.items() if w.received}


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    servers, workers, addresses = [], {}, {}
    for node_id in LIVE:
        worker = FakeWorker(node_id)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_PersonalizeServicer_to_server(worker, server)
        pb_grpc.add_AdminServicer_to_server(worker, server)
        addresses[node_id] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
        servers.append(server)
        workers[node_id] = worker
    addresses[DEAD] = f"127.0.0.1:{find_free_port()}"  # nothing listens there: connection refused
    yield Fleet(workers, addresses)
    for server in servers:
        server.stop(None)


@dataclass
class Router:
    cluster: Cluster
    api: pb_grpc.PersonalizeStub
    admin: pb_grpc.AdminStub
    channel: grpc.Channel
    address: str

    def owners(self, user_id: str, tenant: str = "default") -> list[str]:
        return self.cluster.ring().owners(route_key(tenant, user_id))


def _start_router(fleet: Fleet, keys: ApiKeys | None = None) -> Iterator[Router]:
    fleet.reset()
    cluster = Cluster(None, worker_channel_opener(RouterConfig()))
    cluster.apply(fleet.view())
    server, port = create_router(ServiceConfig(port=0, api_keys=keys or ApiKeys()), cluster, ServiceMetrics())
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        api, admin = pb_grpc.PersonalizeStub(channel), pb_grpc.AdminStub(channel)
        yield Router(cluster, api, admin, channel, f"127.0.0.1:{port}")
    server.stop(None)
    cluster.stop()


@pytest.fixture
def router(fleet: Fleet) -> Iterator[Router]:
    yield from _start_router(fleet)


@pytest.fixture
def keyed_router(fleet: Fleet) -> Iterator[Router]:
    yield from _start_router(fleet, KEYS)


def user_owned_by(router: Router, node_id: str, tenant: str = "default") -> str:
    """A user id whose ring owner is `node_id`."""
    return next(u for u in (f"user-{i}" for i in range(10_000)) if router.owners(u, tenant)[0] == node_id)


# ---- routing ---------------------------------------------------------------------------------------


def test_each_user_goes_to_its_ring_owner_every_time(router: Router, fleet: Fleet) -> None:
    router.cluster.apply(fleet.view(LIVE))
    landed: dict[str, set[str]] = {}
    for _ in range(2):
        for i in range(30):
            user = f"u{i}"
            reply = router.api.Generate(pb.GenerateRequest(user_id=user, prompt="hi"), timeout=10)
            assert reply.node_id == router.owners(user)[0]
            landed.setdefault(user, set()).add(reply.node_id)
    assert all(len(nodes) == 1 for nodes in landed.values())
    assert len(set().union(*landed.values())) == len(LIVE)  # 30 users spread over all 3 workers


def test_tenant_is_part_of_the_key_and_the_callers_key_is_forwarded(keyed_router: Router, fleet: Fleet) -> None:
    keyed_router.cluster.apply(fleet.view(LIVE))
    differ = 0
    for i in range(20):
        user = f"u{i}"
        for tenant in ("acme", "globex"):
            reply = keyed_router.api.Generate(
                pb.GenerateRequest(user_id=user, prompt="hi"),
                timeout=10,
                metadata=[("authorization", f"Bearer key-{tenant}")],
            )
            assert reply.node_id == keyed_router.owners(user, tenant)[0]
            seen = fleet.workers[reply.node_id].received[-1].metadata
            assert seen["authorization"] == f"Bearer key-{tenant}"
        differ += keyed_router.owners(user, "acme")[0] != keyed_router.owners(user, "globex")[0]
    assert differ > 0
    with pytest.raises(grpc.RpcError) as raised:
        keyed_router.api.Generate(pb.GenerateRequest(user_id="u0", prompt="hi"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert sum(len(w.received) for w in fleet.workers.values()) == 40  # the refused call went nowhere


def test_x_user_id_routes_and_fills_an_empty_user_id(router: Router, fleet: Fleet) -> None:
    router.cluster.apply(fleet.view(LIVE))
    reply = router.api.GetAdapter(pb.GetAdapterRequest(), metadata=[("x-user-id", "bob")], timeout=10)
    assert reply.owner_node == router.owners("bob")[0] and reply.user_id == "bob"
    assert fleet.workers[reply.owner_node].received[-1].metadata["x-user-id"] == "bob"
    with pytest.raises(grpc.RpcError) as raised:
        router.api.GetAdapter(pb.GetAdapterRequest(user_id="alice"), metadata=[("x-user-id", "bob")], timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "differs" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        router.api.GetAdapter(pb.GetAdapterRequest(), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sum(len(w.received) for w in fleet.workers.values()) == 1


GENERATE = "/personalize.v1.Personalize/Generate"


def test_with_x_user_id_the_body_is_never_parsed_and_reaches_the_worker_as_sent(fleet: Fleet) -> None:
    """A body no parser accepts, with a valid x-user-id: the router forwards it to bob's owner, whose own
    parse refuses it (INVALID_ARGUMENT, in the worker's words), so the router never read the body."""
    worker = FakeWorker("strict")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[ErrorInterceptor()])
    add_personalize(worker, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    cluster = Cluster(None, worker_channel_opener(RouterConfig()))
    cluster.apply({"strict": NodeInfo("strict", address, 4.0)})
    router, port = create_router(ServiceConfig(port=0), cluster, ServiceMetrics())
    router.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            raw = channel.unary_unary(GENERATE)
            with pytest.raises(grpc.RpcError) as raised:
                raw(b"\xff\xff\xff garbage", metadata=[("x-user-id", "bob")], timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a personalize.v1.GenerateRequest message" in raised.value.details()
            with pytest.raises(grpc.RpcError) as raised:  # without x-user-id the router reads user_id: refused there
                raw(b"\xff\xff\xff garbage", timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert raised.value.details().startswith("request body is not a proto")
            assert worker.received == []
            reply = pb.GenerateResponse.FromString(
                raw(pb.GenerateRequest(prompt="hi").SerializeToString(), metadata=[("x-user-id", "bob")], timeout=10)
            )
            assert reply.text == "strict:bob"  # an empty user_id takes the header's, at the worker too
    finally:
        router.stop(None)
        server.stop(None)
        cluster.stop()


@pytest.mark.parametrize(
    "body",
    [
        pb.GenerateRequest(prompt="hi").SerializeToString() + wire.string_field(1, "alice"),  # user_id not first
        pb.GenerateRequest(user_id="bob", prompt="hi").SerializeToString() + wire.string_field(1, "alice"),
    ],
    ids=["user-id-after-other-fields", "second-user-id-at-the-end"],
)
def test_a_body_naming_another_user_than_x_user_id_is_served_as_the_routed_user(
    router: Router, fleet: Fleet, body: bytes
) -> None:
    """A tenant lying in metadata (x-user-id bob, a body that parses as alice) is served as bob on bob's
    owner: the user a call is served for is always the user it was routed by."""
    router.cluster.apply(fleet.view(LIVE))
    assert pb.GenerateRequest.FromString(body).user_id == "alice"
    raw = router.channel.unary_unary(GENERATE)
    reply = pb.GenerateResponse.FromString(raw(body, metadata=[("x-user-id", "bob")], timeout=10))
    assert reply.node_id == router.owners("bob")[0] and reply.text == f"{reply.node_id}:bob"


def test_the_worker_refuses_x_user_id_differing_from_the_body() -> None:
    worker = FakeWorker("strict")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[ErrorInterceptor()])
    add_personalize(worker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            api = pb_grpc.PersonalizeStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                api.GetAdapter(pb.GetAdapterRequest(user_id="alice"), metadata=[("x-user-id", "bob")], timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "differs" in raised.value.details()
            assert api.GetAdapter(pb.GetAdapterRequest(user_id="bob"), metadata=[("x-user-id", "bob")]).user_id == "bob"
            chunks = [pb.ImportAdapterChunk(user_id="bob"), pb.ImportAdapterChunk(user_id="alice")]
            with pytest.raises(grpc.RpcError) as raised:
                api.ImportAdapterStream(iter(chunks), metadata=[("x-user-id", "bob")], timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "differs" in raised.value.details()
    finally:
        server.stop(None)


def test_the_sdk_sends_x_user_id_and_the_router_passes_it_and_traceparent_on(router: Router, fleet: Fleet) -> None:
    router.cluster.apply(fleet.view(LIVE))
    with PersonalizeClient(router.address) as client:
        client.get_adapter("carol")
    seen = fleet.workers[router.owners("carol")[0]].received[-1].metadata
    assert seen["x-user-id"] == "carol"
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    router.api.GetAdapter(pb.GetAdapterRequest(user_id="carol"), metadata=[("traceparent", trace)], timeout=10)
    forwarded = fleet.workers[router.owners("carol")[0]].received[-1].metadata["traceparent"]
    assert forwarded.split("-")[1] == trace.split("-")[1]  # the caller's trace (the span: the router's own)


def test_deadline_is_the_callers_remaining_time(router: Router, fleet: Fleet) -> None:
    user = "deadline-user"
    router.api.Generate(pb.GenerateRequest(user_id=user, prompt="hi"), timeout=3)
    router.api.Generate(pb.GenerateRequest(user_id=user, prompt="hi"))
    with_deadline, without = fleet.workers[router.owners(user)[0]].received[-2:]
    assert with_deadline.remaining is not None and 1.0 < with_deadline.remaining <= 3.1  # grpc rounds up
    assert without.remaining is None


# ---- failover --------------------------------------------------------------------------------------

IDEMPOTENT = [
    ("Generate", lambda api, u: api.Generate(pb.GenerateRequest(user_id=u, prompt="hi"), timeout=10)),
    ("GetAdapter", lambda api, u: api.GetAdapter(pb.GetAdapterRequest(user_id=u), timeout=10)),
    ("DeleteUser", lambda api, u: api.DeleteUser(pb.DeleteUserRequest(user_id=u), timeout=10)),
    ("ExportAdapter", lambda api, u: api.ExportAdapter(pb.ExportAdapterRequest(user_id=u), timeout=10)),
    ("SubmitFeedback", lambda api, u: api.SubmitFeedback(pb.FeedbackRequest(user_id=u), timeout=10)),
]


@pytest.mark.parametrize(("method", "call"), IDEMPOTENT, ids=[m for m, _ in IDEMPOTENT])
def test_a_dead_owner_is_retried_once_on_the_next_owner(router: Router, fleet: Fleet, method: str, call: Any) -> None:
    user = user_owned_by(router, DEAD)
    call(router.api, user)
    assert fleet.answered() == {router.owners(user)[1]: [method]}
    assert DEAD in router.cluster.suspects()
    nodes = {n.node_id: n.state for n in router.admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes}
    assert nodes == {**dict.fromkeys(LIVE, "up"), DEAD: "down"}


def test_import_is_not_retried_but_the_next_one_avoids_the_suspect(router: Router, fleet: Fleet) -> None:
    user = user_owned_by(router, DEAD)
    request = pb.ImportAdapterRequest(user_id=user)
    with pytest.raises(grpc.RpcError) as raised:
        router.api.ImportAdapter(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fleet.answered() == {}
    assert router.api.ImportAdapter(request, timeout=10).owner_node == router.owners(user)[1]


PEFT = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": bytes(range(256)) * (9 * 4096 + 7)}
"""Over 9 MiB: more than the router's receive limit would take in one message."""


def test_a_streamed_import_reaches_the_owner_chunk_by_chunk(router: Router, fleet: Fleet) -> None:
    router.cluster.apply(fleet.view(LIVE))
    with PersonalizeClient(router.address) as client:  # x-user-id routes it
        assert client.import_adapter("dora", PEFT).owner_node == router.owners("dora")[0]
    seen = fleet.workers[router.owners("dora")[0]].received[-1]
    assert (seen.method, seen.metadata["x-user-id"], dict(seen.request.files)) == ("ImportAdapterStream", "dora", PEFT)
    chunks = [  # without x-user-id: routed by the first chunk's user_id
        pb.ImportAdapterChunk(user_id="erin"),
        *(pb.ImportAdapterChunk(file_name=name, data=data) for name, data in PEFT.items()),
    ]
    reply = router.api.ImportAdapterStream(iter(chunks[:2]), timeout=10)  # (chunks[2] is over the receive limit)
    assert reply.owner_node == router.owners("erin")[0] and reply.user_id == "erin"


def test_a_keyless_stream_is_refused_by_the_router_and_never_forwarded(keyed_router: Router, fleet: Fleet) -> None:
    keyed_router.cluster.apply(fleet.view(LIVE))
    taken: list[int] = []

    def chunks() -> Iterator[pb.ImportAdapterChunk]:
        for index in range(120):
            taken.append(index)
            yield pb.ImportAdapterChunk(user_id="mallory", file_name="f", data=b"\xff" * IMPORT_CHUNK_BYTES)

    with pytest.raises(grpc.RpcError) as raised:
        keyed_router.api.ImportAdapterStream(chunks(), timeout=60)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fleet.answered() == {}
    assert len(taken) < 60  # most of the 120 MiB was never even taken from the caller


def test_an_unavailable_answer_is_retried_with_the_same_event_key(router: Router, fleet: Fleet) -> None:
    router.cluster.apply(fleet.view(LIVE))
    user = user_owned_by(router, "w0")
    fleet.workers["w0"].fail["SubmitFeedback"] = grpc.StatusCode.UNAVAILABLE
    ack = router.api.SubmitFeedback(pb.FeedbackRequest(user_id=user), timeout=10)
    second = router.owners(user)[1]
    first_key = fleet.workers["w0"].received[0].request.event_key
    assert len(first_key) >= 16 and ack.event_id == f"{second}:{first_key}"
    assert fleet.workers[second].received[0].request.event_key == first_key
    ack = router.api.SubmitFeedback(pb.FeedbackRequest(user_id=user, event_key="mine"), timeout=10)
    assert ack.event_id == f"{second}:mine"  # w0 is suspect now: straight to the next owner


def test_other_errors_are_not_retried_and_keep_status_and_details(router: Router, fleet: Fleet) -> None:
    router.cluster.apply(fleet.view(LIVE))
    user = user_owned_by(router, "w1")
    fleet.workers["w1"].fail["GetAdapter"] = grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as raised:
        router.api.GetAdapter(pb.GetAdapterRequest(user_id=user), timeout=10)
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.NOT_FOUND, "w1 says NOT_FOUND")
    assert fleet.answered() == {"w1": ["GetAdapter"]}


def test_the_last_worker_failing_reports_its_own_error(router: Router, fleet: Fleet) -> None:
    router.cluster.apply(fleet.view(("w2",)))
    fleet.workers["w2"].fail["Generate"] = grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as raised:
        router.api.Generate(pb.GenerateRequest(user_id="u", prompt="hi"), timeout=10)
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.UNAVAILABLE, "w2 says UNAVAILABLE")
    router.cluster.apply({})
    with pytest.raises(grpc.RpcError) as raised:
        router.api.Generate(pb.GenerateRequest(user_id="u", prompt="hi"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and "ring is empty" in raised.value.details()


def test_an_unreachable_worker_is_named_as_a_component_never_by_its_address(router: Router, fleet: Fleet) -> None:
    router.cluster.apply(fleet.view((DEAD,)))
    host, port = fleet.addresses[DEAD].rsplit(":", 1)
    calls = [
        lambda: router.api.Generate(pb.GenerateRequest(user_id="u", prompt="hi"), timeout=10),
        lambda: list(router.api.GenerateStream(pb.GenerateRequest(user_id="u", prompt="hi"), timeout=10)),
        lambda: router.api.ImportAdapter(pb.ImportAdapterRequest(user_id="u"), timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as raised:
            call()
        details = raised.value.details()
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "worker serving this user is unreachable" in details
        assert host not in details and port not in details and "ipv4" not in details


# ---- streams ---------------------------------------------------------------------------------------


def test_stream_is_relayed_and_retried_before_its_first_chunk(router: Router, fleet: Fleet) -> None:
    user = user_owned_by(router, DEAD)
    chunks = list(router.api.GenerateStream(pb.GenerateRequest(user_id=user, prompt="hi"), timeout=10))
    assert [c.text for c in chunks] == ["Hel", "lo", "!", ""]
    assert chunks[-1].done and chunks[-1].final.node_id == router.owners(user)[1]


def test_stream_failing_after_a_chunk_is_not_retried(router: Router, fleet: Fleet) -> None:
    router.cluster.apply(fleet.view(LIVE))
    user = user_owned_by(router, "w0")
    fleet.workers["w0"].stream_fail_after = 1
    stream = router.api.GenerateStream(pb.GenerateRequest(user_id=user, prompt="hi"), timeout=10)
    assert next(stream).text == "Hel"
    with pytest.raises(grpc.RpcError) as raised:
        next(stream)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fleet.answered() == {"w0": ["GenerateStream"]}


def test_a_caller_going_away_cancels_the_upstream_stream(router: Router, fleet: Fleet) -> None:
    router.cluster.apply(fleet.view(LIVE))
    user = user_owned_by(router, "w2")
    fleet.workers["w2"].hold_stream = True
    stream = router.api.GenerateStream(pb.GenerateRequest(user_id=user, prompt="hi"), timeout=30)
    assert next(stream).text == "Hel"
    stream.cancel()
    assert fleet.workers["w2"].stream_cancelled.wait(10), (fleet.answered(), router.cluster.suspects())


def test_a_caller_going_away_cancels_the_upstream_unary_call(router: Router, fleet: Fleet) -> None:
    router.cluster.apply(fleet.view(LIVE))
    user = user_owned_by(router, "w1")
    fleet.workers["w1"].hold_generate = True
    call = router.api.Generate.future(pb.GenerateRequest(user_id=user, prompt="hi"), timeout=30)
    assert fleet.workers["w1"].generate_held.wait(10), fleet.answered()
    call.cancel()
    assert fleet.workers["w1"].generate_cancelled.wait(10), (fleet.answered(), router.cluster.suspects())


def test_an_awaited_generate_keeps_the_typed_error_and_cancelling_it_cancels_the_call(fleet: Fleet) -> None:
    fleet.reset()
    worker = fleet.workers["w1"]
    with PersonalizeClient(fleet.addresses["w1"], timeout=30, retries=0) as client:
        assert asyncio.run(client.agenerate("alice", "hi")).text == "w1:alice"
        worker.fail["Generate"] = grpc.StatusCode.NOT_FOUND
        with pytest.raises(NotFoundError, match="w1 says NOT_FOUND"):
            asyncio.run(client.agenerate("alice", "hi"))
        worker.fail.clear()
        worker.hold_generate = True

        async def abandon() -> None:
            task = asyncio.ensure_future(client.agenerate("alice", "hi"))
            while not worker.generate_held.is_set():
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(asyncio.wait_for(abandon(), 10))
        assert worker.generate_cancelled.wait(10), fleet.answered()
    fleet.reset()


# ---- admin -----------------------------------------------------------------------------------------


def test_stats_fan_out_and_degrade_when_a_worker_does_not_answer(router: Router, fleet: Fleet) -> None:
    reply = router.admin.Stats(pb.StatsRequest(), timeout=10)
    assert sorted(n.node_id for n in reply.nodes) == list(LIVE) and reply.degraded
    router.cluster.apply(fleet.view(LIVE))
    reply = router.admin.Stats(pb.StatsRequest(), timeout=10)
    assert sorted(n.node_id for n in reply.nodes) == list(LIVE) and not reply.degraded


def test_list_nodes_shows_membership(router: Router, fleet: Fleet) -> None:
    view = fleet.view(LIVE)
    view["w1"] = NodeInfo("w1", fleet.addresses["w1"], 8.0, 3.0, DRAINING)
    router.cluster.apply(view)
    nodes = router.admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes
    assert [(n.node_id, n.address, n.state, n.load, n.capacity) for n in nodes] == [
        ("w0", fleet.addresses["w0"], "up", 0, 4),
        ("w1", fleet.addresses["w1"], "draining", 3, 8),
        ("w2", fleet.addresses["w2"], "up", 0, 4),
    ]
    user = user_owned_by(router, "w0")
    assert all(
        router.api.Generate(pb.GenerateRequest(user_id=f"{user}{i}", prompt="hi"), timeout=10).node_id != "w1"
        for i in range(20)
    )  # a draining worker takes no new users


# ---- membership: workers announcing, the routing client -------------------------------------------


@pytest.fixture
def namespace() -> str:
    return f"r{uuid.uuid4().hex[:12]}"


def test_announcement_joins_drains_and_leaves(valkey_url: str, namespace: str) -> None:
    membership = MembershipConfig(namespace=namespace, ttl_s=2.0, heartbeat_s=0.1)
    config = AnnounceConfig(valkey_url, membership, drain_notice_s=0.0)
    announcement = Announcement(config, "w9", 16.0, load_fn=lambda: 5.0).start("127.0.0.1:1")
    try:
        nodes = Membership(membership_client(valkey_url), membership).nodes()
        assert nodes["w9"] == NodeInfo("w9", "127.0.0.1:1", 16.0, 5.0)
        deadline = time.monotonic() + 30
        while announcement.ring is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert announcement.owns("acme", "anyone")  # the only node owns every user
        other = Heartbeat(membership_client(valkey_url), membership, NodeInfo("w8", "127.0.0.1:2", 16.0)).start()
        try:
            ring = ring_of(Membership(membership_client(valkey_url), membership).nodes())
            deadline = time.monotonic() + 30
            while len(announcement.ring or ()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            owned = [u for u in (f"u{i}" for i in range(200)) if announcement.owns("acme", u)]
            assert owned == [u for u in (f"u{i}" for i in range(200)) if ring.owner(route_key("acme", u)) == "w9"]
            assert 40 < len(owned) < 160
        finally:
            other.stop()
        announcement.drain()
        assert Membership(membership_client(valkey_url), membership).nodes()["w9"].state == DRAINING
    finally:
        announcement.leave()
    assert "w9" not in Membership(membership_client(valkey_url), membership).nodes()


def test_routing_client_goes_straight_to_the_owner_and_fails_over(
    fleet: Fleet, valkey_url: str, namespace: str
) -> None:
    fleet.reset()
    membership = MembershipConfig(namespace=namespace, ttl_s=3.0, heartbeat_s=0.2)
    beats = [Heartbeat(membership_client(valkey_url), membership, node).start() for node in fleet.view().values()]
    try:
        with PersonalizeClient.discover(
            valkey_url, membership=membership, timeout=10, route=RouteConfig(poll_s=0.1, suspect_s=60)
        ) as client:
            assert isinstance(client, RoutingClient)
            ring = client.cluster.ring()
            assert sorted(ring.nodes) == sorted((*LIVE, DEAD))
            dead_user = next(u for u in (f"v{i}" for i in range(1000)) if ring.owner(route_key("default", u)) == DEAD)
            second = ring.owners(route_key("default", dead_user))[1]  # the awaited call fails over too
            assert asyncio.run(client.agenerate(dead_user, "hi")).node_id == second
            with client.generate_stream(dead_user, "hi") as stream:  # fails over before its first chunk
                assert "".join(stream) == "Hello!"
            assert stream.response is not None
            assert stream.response.node_id == ring.owners(route_key("default", dead_user))[1]
            for i in range(12):
                owners = ring.owners(route_key("default", f"u{i}"))
                expected = owners[1] if owners[0] == DEAD else owners[0]
                assert client.generate(f"u{i}", "hi").node_id == expected
            for i in range(12):  # awaited on a loop (the HTTP edge's path): the same owners
                owners = ring.owners(route_key("default", f"u{i}"))
                expected = owners[1] if owners[0] == DEAD else owners[0]
                assert asyncio.run(client.agenerate(f"u{i}", "hi")).node_id == expected
            assert client.feedback(dead_user, "q", "a").event_id.startswith("w")
            stats = client.stats()
            assert sorted(n.node_id for n in stats.nodes) == list(LIVE) and stats.degraded
            assert {n.node_id: n.state for n in client.list_nodes().nodes}[DEAD] == "down"
    finally:
        for beat in beats:
            beat.stop()


def test_routing_client_needs_a_tenant_with_a_key_and_a_ring(valkey_url: str, namespace: str) -> None:
    with pytest.raises(ValueError, match="tenant="):
        RoutingClient(valkey_url, api_key="k")
    with RoutingClient(valkey_url, membership=MembershipConfig(namespace=namespace), timeout=5) as client:
        with pytest.raises(UnavailableError, match="ring is empty"):
            client.generate("alice", "hi")
        with pytest.raises(UnavailableError), client.generate_stream("alice", "hi") as stream:
            list(stream)


def record_for(version: int) -> AdapterRecord:
    return AdapterRecord(version, 8, "sha256:" + "ab" * 32, 0, "", 1_700_000_000_000, "sha256:" + "cd" * 32)


def test_a_user_deleted_while_the_hot_list_is_written_is_not_named_again(
    valkey_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DeleteUser (record, then every hot list) lands between a worker listing its hot users and writing
    the list: the list written must not name the deleted user once the publish returns."""
    import personalize.routing.announce as announce

    with membership_client(valkey_url) as client:
        registry = Registry(client, namespace=namespace)
        for user_id in ("u", "v"):
            registry.compare_and_set("acme", user_id, 0, record_for(1))
        key = f"{{{namespace}}}:hot:w1"
        deleted: list[str] = []

        def hot_fn(limit: int) -> list[tuple[str, str]]:
            users = [("acme", "u"), ("acme", "v")]
            listed = [user for user, live in zip(users, registry.exists_many(users), strict=True) if live]
            if not deleted:  # the listing saw u alive; u's DeleteUser completes before the list is written
                registry.delete("acme", "u")
                announce.forget_hot(client, namespace, "acme", "u")
                deleted.append("u")
            return listed

        announce.publish_hot(client, key, hot_fn)
        assert json.loads(client.get(key)) == [["acme", "v"]]
        monkeypatch.setattr(announce, "_REPUBLISH", 1)  # write once, as the publisher did before
        deleted.clear()
        registry.compare_and_set("acme", "u", 0, record_for(1))
        announce.publish_hot(client, key, hot_fn)
        assert json.loads(client.get(key)) == [["acme", "u"], ["acme", "v"]]  # the race this guards against


def test_a_joining_worker_warms_the_hot_users_it_takes_over(
    valkey_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rebalancing: the old owner lists its hottest users; the new owner loads the ones that moved to it."""
    import personalize.routing.announce as announce

    monkeypatch.setattr(announce, "HOT_PERIOD_S", 0.1)
    membership = MembershipConfig(namespace=namespace, ttl_s=2.0, heartbeat_s=0.1)
    config = AnnounceConfig(valkey_url, membership, drain_notice_s=0.0)
    hot = [("acme", f"hot{i}") for i in range(60)]
    old = Announcement(config, "old", 16.0, hot_fn=lambda limit: hot[:limit]).start("127.0.0.1:1")
    warmed: list[tuple[str, str]] = []
    new = Announcement(
        config, "new", 16.0, hot_fn=lambda limit: [], warm_fn=lambda tenant, user_id: warmed.append((tenant, user_id))
    )
    try:
        with membership_client(valkey_url) as client:  # the old owner has published its list before the new one joins
            hot_key = f"{{{namespace}}}:hot:old"
            deadline = time.monotonic() + 10
            while not client.exists(hot_key):
                assert time.monotonic() < deadline, "the old owner never published its hot users"
                time.sleep(0.02)
        new.start("127.0.0.1:2")
        ring = ring_of({"old": NodeInfo("old", "a", 16.0), "new": NodeInfo("new", "b", 16.0)})
        moved = [u for u in hot if ring.owner(route_key(*u)) == "new"]
        deadline = time.monotonic() + 30
        while sorted(warmed) != sorted(moved) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 10 < len(moved) < 50
        assert sorted(warmed) == sorted(moved)  # exactly the hot users it took over, none it did not
    finally:
        new.leave()
        old.leave()
