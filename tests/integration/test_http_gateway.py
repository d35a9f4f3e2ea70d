"""The HTTP gateway over real gRPC stand-ins for two workers that heartbeat into a real Valkey: it routes each
call straight to the user's owner on the ring, remembers completions per tenant for feedback by
`completion_id`, mirrors adapter management, and serves its own Prometheus metrics."""

from __future__ import annotations

import io
import json
import threading
import uuid
import zipfile
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import redis
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from personalize.completions import CompletionLog
from personalize.feedback.notify import redis_client
from personalize.routing.membership import Heartbeat, MembershipConfig, NodeInfo, membership_client
from personalize.routing.ring import route_key
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.http import GatewayConfig, create_app
from personalize_service.http.serve import _Clients
from personalize_service.net import find_free_port
from personalize_service.server import convert
from personalize_service.server.auth import ApiKeys
from personalize_service.server.limits import Limits
from personalize_service.server.observe import ObserveInterceptor

NODES = ("w0", "w1")
KEYS = ApiKeys.from_mapping({"acme": "key-acme", "globex": "key-globex", "initech": "key-initech"})
ACME = {"Authorization": "Bearer key-acme"}
GLOBEX = {"Authorization": "Bearer key-globex"}
PEFT = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"\x00weights\x01"}


@dataclass
class Worker(pb_grpc.PersonalizeServicer, pb_grpc.AdminServicer):
    """A worker stand-in: answers name `node_id`; feedback, imports and deletes are recorded."""

    node_id: str
    feedback: list[pb.FeedbackRequest] = field(default_factory=list)
    imported: list[pb.ImportAdapterRequest] = field(default_factory=list)
    refuse: grpc.StatusCode | None = None
    """Set: Generate fails with this code (a worker going down, a request it rejects)."""

    def Generate(self, request: Any, context: Any) -> pb.GenerateResponse:
        if self.refuse is not None:
            context.abort(self.refuse, f"{self.node_id} refuses")
        return pb.GenerateResponse(
            text=f"{self.node_id} says hi to {request.user_id}", node_id=self.node_id, completion_tokens=1
        )

    def GenerateStream(self, request: Any, context: Any) -> Iterator[pb.GenerateChunk]:
        for piece in ("Hel", "lo"):
            yield pb.GenerateChunk(text=piece)
        yield pb.GenerateChunk(done=True, final=pb.GenerateResponse(text="Hello", node_id=self.node_id))

    def SubmitFeedback(self, request: Any, context: Any) -> pb.FeedbackAck:
        self.feedback.append(request)
        return pb.FeedbackAck(event_id=f"{self.node_id}-1", partition=0)

    def GetAdapter(self, request: Any, context: Any) -> pb.AdapterInfo:
        if request.user_id == "nobody":
            context.abort(grpc.StatusCode.NOT_FOUND, "user 'nobody' has no adapter")
        return pb.AdapterInfo(user_id=request.user_id, version=3, owner_node=self.node_id)

    def DeleteUser(self, request: Any, context: Any) -> pb.DeleteUserResponse:
        return pb.DeleteUserResponse(versions_deleted=3, events_deleted=1)

    def ExportAdapter(self, request: Any, context: Any) -> pb.AdapterBundle:
        return pb.AdapterBundle(info=pb.AdapterInfo(user_id=request.user_id, version=3), files=PEFT)

    def ImportAdapterStream(self, chunks: Iterator[pb.ImportAdapterChunk], context: Any) -> pb.AdapterInfo:
        request = convert.import_request(chunks, Limits())  # the worker's own reassembly
        self.imported.append(request)
        return pb.AdapterInfo(user_id=request.user_id, version=1, owner_node=self.node_id)


@dataclass
class Gateway:
    http: TestClient
    clients: _Clients
    workers: dict[str, Worker]
    log: CompletionLog

    def owner(self, user: str, tenant: str) -> str:
        return self.clients.probe().cluster.ring().owner(route_key(tenant, user))  # type: ignore[attr-defined]


@pytest.fixture
def gateway(valkey_url: str) -> Iterator[Gateway]:
    namespace = f"g{uuid.uuid4().hex[:12]}"
    membership = MembershipConfig(namespace=namespace, ttl_s=30.0, heartbeat_s=0.2)
    servers, beats, workers = [], [], {}
    for node_id in NODES:
        worker = workers[node_id] = Worker(node_id)
        observe = ObserveInterceptor("worker", node_id, ApiKeys())  # the worker's span, as a real worker's
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[observe])
        pb_grpc.add_PersonalizeServicer_to_server(worker, server)
        pb_grpc.add_AdminServicer_to_server(worker, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        node = NodeInfo(node_id, f"127.0.0.1:{port}", 4.0)
        beats.append(Heartbeat(membership_client(valkey_url), membership, node).start())
    config = GatewayConfig(registry_url=valkey_url, api_keys=KEYS, namespace=namespace, completion_ttl_s=600)
    clients = _Clients(config)
    log = CompletionLog(redis_client(valkey_url), namespace, 600)
    try:
        with TestClient(create_app(clients, "tiny", completions=log, probe=clients.probe)) as http:
            yield Gateway(http, clients, workers, log)
    finally:
        clients.close()
        for beat in beats:
            beat.stop()
        for server in servers:
            server.stop(None)


def _complete(gateway: Gateway, user: str, headers: dict[str, str] = ACME, **extra: Any) -> Any:
    return gateway.http.post("/v1/completions", json={"prompt": "Hi", "user": user, **extra}, headers=headers)


def test_each_user_lands_on_its_ring_owner(gateway: Gateway) -> None:
    landed: dict[str, str] = {}
    for i in range(16):
        user = f"user-{i}"
        reply = _complete(gateway, user)
        assert reply.status_code == 200, reply.text
        landed[user] = reply.headers["x-personalize-node"]
        assert landed[user] == gateway.owner(user, "acme")
        assert reply.json()["choices"][0]["text"] == f"{landed[user]} says hi to {user}"
    assert set(landed.values()) == set(NODES)  # both workers own someone: the ring, not one target


def test_a_completion_whose_owner_is_unavailable_is_retried_on_the_next_worker(gateway: Gateway) -> None:
    owner = gateway.owner("alice", "acme")
    gateway.workers[owner].refuse = grpc.StatusCode.UNAVAILABLE
    reply = _complete(gateway, "alice")
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-personalize-node"] != owner
    for worker in gateway.workers.values():
        worker.refuse = grpc.StatusCode.INVALID_ARGUMENT
    reply = _complete(gateway, "alice")
    assert reply.status_code == 400 and reply.json()["error"]["message"].endswith("refuses"), reply.text


def _threads(name: str) -> int:
    return sum(thread.name == name for thread in threading.enumerate())


def test_every_tenant_routes_over_one_membership_watch_and_one_channel_per_worker(gateway: Gateway) -> None:
    watches = _threads("membership-watch")
    for key in ("key-acme", "key-globex", "key-initech"):
        for i in range(8):
            reply = _complete(gateway, f"user-{i}", headers={"Authorization": f"Bearer {key}"})
            assert reply.status_code == 200, reply.text
    assert _threads("membership-watch") - watches == 1  # one per process, not one per tenant key
    shared = gateway.clients.probe().cluster  # type: ignore[attr-defined]
    tenants = {key: gateway.clients(key) for key in ("key-acme", "key-globex", "key-initech")}
    assert all(caller.client.cluster is shared for caller in tenants.values())  # type: ignore[attr-defined]  # its channels
    assert [caller.client.tenant for caller in tenants.values()] == ["acme", "globex", "initech"]  # type: ignore[attr-defined]


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize("stream", [False, True])
def test_the_edges_span_continues_the_callers_trace_and_parents_the_workers(
    gateway: Gateway, span_exporter: InMemorySpanExporter, stream: bool
) -> None:
    span_exporter.clear()
    headers = {**ACME, "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"}
    reply = _complete(gateway, "alice", headers=headers, stream=stream)
    assert reply.status_code == 200, reply.text
    spans = {s.name: s for s in span_exporter.get_finished_spans() if format(s.context.trace_id, "032x") == TRACE_ID}
    edge = spans["gateway POST /v1/completions"]
    assert edge.kind == trace.SpanKind.SERVER and edge.attributes["http.response.status_code"] == 200
    assert edge.parent is not None and format(edge.parent.span_id, "016x") == CALLER_SPAN
    worker = spans["worker GenerateStream" if stream else "worker Generate"]
    assert worker.parent is not None and worker.parent.span_id == edge.context.span_id


def test_an_unknown_key_is_401_at_the_edge(gateway: Gateway) -> None:
    reply = _complete(gateway, "alice", headers={"Authorization": "Bearer nope"})
    assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
    reply = _complete(gateway, "alice", headers={})
    assert reply.status_code == 401


def test_feedback_by_completion_id_sends_the_remembered_text(gateway: Gateway) -> None:
    done = _complete(gateway, "alice").json()
    reply = gateway.http.post(
        "/v1/feedback", json={"completion_id": done["id"], "kind": "correct", "correction": "Hey"}, headers=ACME
    )
    assert reply.status_code == 200, reply.text
    owner = gateway.workers[gateway.owner("alice", "acme")]
    sent = owner.feedback[-1]
    assert (sent.user_id, sent.prompt, sent.completion, sent.correction) == (
        "alice",
        "Hi",
        done["choices"][0]["text"],
        "Hey",
    )


def test_a_chat_completion_is_remembered_with_its_messages_and_streamed_text(gateway: Gateway) -> None:
    body = {"messages": [{"role": "user", "content": "Yo"}], "user": "bob", "stream": True}
    with gateway.http.stream("POST", "/v1/chat/completions", json=body, headers=ACME) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    ident = json.loads(lines[0][6:])["id"]
    remembered = gateway.log.recall("acme", ident)
    assert remembered.messages == [{"role": "user", "content": "Yo"}] and remembered.completion == "Hello"
    reply = gateway.http.post("/v1/feedback", json={"completion_id": ident, "kind": "accept"}, headers=ACME)
    assert reply.status_code == 200
    sent = gateway.workers[gateway.owner("bob", "acme")].feedback[-1]
    # the chat goes as messages (the worker renders them with the model's template), not as a prompt
    assert not sent.prompt and [(m.role, m.content) for m in sent.messages] == [("user", "Yo")]
    assert sent.completion == "Hello"


def test_another_tenants_completion_id_is_404(gateway: Gateway) -> None:
    ident = _complete(gateway, "carol").json()["id"]
    reply = gateway.http.post("/v1/feedback", json={"completion_id": ident, "kind": "accept"}, headers=GLOBEX)
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error"
    reply = gateway.http.post(
        "/v1/feedback", json={"completion_id": "cmpl-" + "0" * 32, "kind": "accept"}, headers=ACME
    )
    assert reply.status_code == 404
    assert all(not w.feedback for w in gateway.workers.values())


def test_remembered_completions_expire_and_are_forgotten_with_the_user(gateway: Gateway, valkey_url: str) -> None:
    ident = _complete(gateway, "dave").json()["id"]
    raw = redis.Redis.from_url(valkey_url)
    (key,) = [k for k in raw.scan_iter(match=f"{gateway.log.namespace}:cmpl:acme:*")]
    assert 0 < raw.execute_command("HTTL", key, "FIELDS", 1, ident)[0] <= 600
    gateway.log.forget_user("acme", "dave")
    assert raw.exists(key) == 0
    reply = gateway.http.post("/v1/feedback", json={"completion_id": ident, "kind": "accept"}, headers=ACME)
    assert reply.status_code == 404


def test_adapter_management_mirrors_grpc(gateway: Gateway) -> None:
    info = gateway.http.get("/v1/users/erin/adapter", headers=ACME)
    assert info.status_code == 200 and info.json()["version"] == 3
    assert info.json()["owner_node"] == gateway.owner("erin", "acme")
    assert gateway.http.get("/v1/users/nobody/adapter", headers=ACME).status_code == 404
    exported = gateway.http.get("/v1/users/erin/adapter/export", headers=ACME)
    assert exported.headers["content-type"] == "application/zip"
    assert exported.headers["x-personalize-adapter-version"] == "3"
    with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == PEFT
    files = [("files", (name, data, "application/octet-stream")) for name, data in PEFT.items()]
    imported = gateway.http.post("/v1/users/erin/adapter/import", files=files, headers=ACME)
    assert imported.status_code == 200, imported.text
    request = gateway.workers[gateway.owner("erin", "acme")].imported[-1]
    assert dict(request.files) == PEFT
    bad = gateway.http.post("/v1/users/erin/adapter/import", content=b"{}", headers=ACME)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "content-type"
    deleted = gateway.http.delete("/v1/users/erin/adapter", headers=ACME)
    assert deleted.status_code == 200 and deleted.json()["versions_deleted"] == 3


def test_metrics_count_routes_statuses_and_streaming_ttft(gateway: Gateway) -> None:
    assert _complete(gateway, "frank").status_code == 200
    assert _complete(gateway, "frank", n=2).status_code == 400
    with gateway.http.stream("POST", "/v1/completions", json={"prompt": "Hi", "stream": True}, headers=ACME) as s:
        list(s.iter_lines())
    text = gateway.http.get("/metrics").text
    assert 'personalize_http_requests_total{route="/v1/completions",status="200"} 2.0' in text
    assert 'personalize_http_requests_total{route="/v1/completions",status="400"} 1.0' in text
    assert 'personalize_http_time_to_first_token_seconds_count{route="/v1/completions"} 1.0' in text
    assert 'personalize_http_request_seconds_count{route="/v1/completions"} 3.0' in text
    assert gateway.http.get("/readyz").status_code == 200


def test_a_completion_log_that_is_down_is_503_or_a_stream_error_event(gateway: Gateway) -> None:
    dead = CompletionLog(redis_client(f"redis://127.0.0.1:{find_free_port()}/0"), "dead", 60)
    with TestClient(create_app(gateway.clients, "tiny", completions=dead)) as http:
        reply = http.post("/v1/completions", json={"prompt": "Hi", "user": "ivan"}, headers=ACME)
        assert reply.status_code == 503 and reply.headers["retry-after"]
        body = {"prompt": "Hi", "user": "ivan", "stream": True}
        with http.stream("POST", "/v1/completions", json=body, headers=ACME) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == "unavailable" and events[-1] == "[DONE]"


def test_the_served_edge_parses_http_with_httptools_on_a_uvloop_loop() -> None:
    """uvicorn's `auto` picks the C parser and libuv loop when installed (dependencies): h11 and the pure
    asyncio loop cost the edge's latency budget on every request."""
    import urllib.request

    import uvloop
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from personalize_service.http import serve_http

    server = serve_http(GatewayConfig(target=f"127.0.0.1:{find_free_port()}"), "127.0.0.1", 0, "tiny")
    try:
        uvicorn_server = server._server
        assert uvicorn_server.config.http_protocol_class is HttpToolsProtocol
        assert isinstance(uvicorn_server.servers[0].get_loop(), uvloop.Loop)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as reply:
            assert json.loads(reply.read()) == {"status": "ok"}
    finally:
        server.stop()
