"""The client SDK against a real gRPC server on loopback whose handlers fail their first calls.

Idempotent calls are retried on UNAVAILABLE (at most twice); feedback is made idempotent with an
automatic event_key; ImportAdapter and non-UNAVAILABLE failures are never retried.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from personalize import errors
from personalize_service.client import (
    DeadlineExceededError,
    ExportedAdapter,
    NotFoundError,
    PersonalizeClient,
    PersonalizeClientError,
    UnauthenticatedError,
    UnavailableError,
)
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.server import convert
from personalize_service.server.auth import ApiKeys, current_tenant
from personalize_service.server.interceptors import server_interceptors
from personalize_service.server.limits import Limits

NO_KEYS = ApiKeys()
FILES = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"\x00weights"}


class _FlakyServicer(pb_grpc.PersonalizeServicer, pb_grpc.AdminServicer):
    """Each method fails its first `failures[method]` calls with Unavailable, then answers."""

    def __init__(self) -> None:
        self.failures: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.requests: list[Any] = []
        self.error: Exception | None = None
        self.delay = 0.0
        self._lock = threading.Lock()

    def _enter(self, method: str, request: Any) -> None:
        with self._lock:
            self.calls[method] += 1
            self.requests.append(request)
            failing = self.failures[method] > 0
            self.failures[method] -= failing
        time.sleep(self.delay)
        if failing:
            raise errors.Unavailable(f"{method} is down for a moment")
        if self.error is not None:
            raise self.error

    def Generate(self, request: Any, context: Any) -> pb.GenerateResponse:
        self._enter("Generate", request)
        return pb.GenerateResponse(text=f"{current_tenant()}:{request.prompt}", adapter_version=1)

    def GenerateStream(self, request: Any, context: Any) -> Iterator[pb.GenerateChunk]:
        self._enter("GenerateStream", request)
        yield pb.GenerateChunk(text="Hel")
        self._enter("GenerateStream.after", request)
        yield pb.GenerateChunk(text="lo")
        yield pb.GenerateChunk(done=True, final=pb.GenerateResponse(text="Hello", finish_reason="stop"))

    def SubmitFeedback(self, request: Any, context: Any) -> pb.FeedbackAck:
        self._enter("SubmitFeedback", request)
        return pb.FeedbackAck(event_id=f"event-{request.event_key}", partition=1)

    def GetAdapter(self, request: Any, context: Any) -> pb.AdapterInfo:
        self._enter("GetAdapter", request)
        return pb.AdapterInfo(user_id=request.user_id, version=3)

    def DeleteUser(self, request: Any, context: Any) -> pb.DeleteUserResponse:
        self._enter("DeleteUser", request)
        return pb.DeleteUserResponse(versions_deleted=2)

    def ExportAdapter(self, request: Any, context: Any) -> pb.AdapterBundle:
        self._enter("ExportAdapter", request)
        return pb.AdapterBundle(files=FILES, info=pb.AdapterInfo(user_id=request.user_id, version=3))

    def ImportAdapterStream(self, chunks: Iterator[pb.ImportAdapterChunk], context: Any) -> pb.AdapterInfo:
        request = convert.import_request(chunks, Limits())  # the worker's own reassembly
        self._enter("ImportAdapter", request)
        return pb.AdapterInfo(user_id=request.user_id, version=4)

    def Stats(self, request: Any, context: Any) -> pb.StatsResponse:
        self._enter("Stats", request)
        return pb.StatsResponse(nodes=[pb.NodeStats(node_id="w0")])

    def ListNodes(self, request: Any, context: Any) -> pb.ListNodesResponse:
        self._enter("ListNodes", request)
        return pb.ListNodesResponse(nodes=[pb.Node(node_id="w0", address="127.0.0.1:1", state="up")])


@contextmanager
def serve(keys: ApiKeys = NO_KEYS) -> Iterator[tuple[_FlakyServicer, str]]:
    servicer = _FlakyServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=server_interceptors(keys))
    pb_grpc.add_PersonalizeServicer_to_server(servicer, server)
    pb_grpc.add_AdminServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


Flaky = tuple[_FlakyServicer, PersonalizeClient]
Call = Callable[[PersonalizeClient], bool]


@pytest.fixture()
def flaky() -> Iterator[Flaky]:
    with serve() as (servicer, target), PersonalizeClient(target, timeout=10, backoff=0.01) as client:
        yield servicer, client


IDEMPOTENT: list[tuple[str, Call]] = [
    ("Generate", lambda c: c.generate("alice", "hi").text == "default:hi"),
    ("GetAdapter", lambda c: c.get_adapter("alice").version == 3),
    ("DeleteUser", lambda c: c.delete_user("alice").versions_deleted == 2),
    ("ExportAdapter", lambda c: c.export_adapter("alice").files == FILES),
    ("Stats", lambda c: c.stats().nodes[0].node_id == "w0"),
    ("ListNodes", lambda c: c.list_nodes().nodes[0].state == "up"),
    ("SubmitFeedback", lambda c: c.feedback("alice", "q", "a").partition == 1),
]


@pytest.mark.parametrize(("method", "call"), IDEMPOTENT, ids=[m for m, _ in IDEMPOTENT])
@pytest.mark.parametrize("failures", [1, 2])
def test_idempotent_calls_are_retried_on_unavailable(flaky: Flaky, method: str, call: Call, failures: int) -> None:
    servicer, client = flaky
    servicer.failures[method] = failures
    assert call(client)
    assert servicer.calls[method] == failures + 1


@pytest.mark.parametrize(("method", "call"), IDEMPOTENT, ids=[m for m, _ in IDEMPOTENT])
def test_at_most_two_retries(flaky: Flaky, method: str, call: Call) -> None:
    servicer, client = flaky
    servicer.failures[method] = 3
    with pytest.raises(UnavailableError) as raised:
        call(client)
    assert servicer.calls[method] == 3
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert raised.value.details() == f"{method} is down for a moment"
    assert isinstance(raised.value, errors.Unavailable) and isinstance(raised.value, grpc.RpcError)


def test_feedback_retry_resends_one_generated_event_key(flaky: Flaky) -> None:
    servicer, client = flaky
    servicer.failures["SubmitFeedback"] = 1
    ack = client.feedback("alice", "q", "a", kind="correct", correction="better")
    keys = [r.event_key for r in servicer.requests]
    assert len(keys) == 2 and keys[0] == keys[1] and len(keys[0]) >= 16
    assert ack.event_id == f"event-{keys[0]}"
    assert servicer.requests[0].kind == pb.FeedbackRequest.CORRECT
    assert servicer.requests[0].correction == "better"
    client.feedback("alice", "q", "a")
    assert servicer.requests[-1].event_key != keys[0]  # every event gets its own key


def test_feedback_keeps_the_callers_event_key(flaky: Flaky) -> None:
    servicer, client = flaky
    servicer.failures["SubmitFeedback"] = 1
    client.feedback("alice", "q", "a", kind="prefer", rejected="worse", event_key="mine-1")
    assert [r.event_key for r in servicer.requests] == ["mine-1", "mine-1"]


def test_feedback_kind_is_checked_locally(flaky: Flaky) -> None:
    servicer, client = flaky
    with pytest.raises(ValueError, match="kind must be one of"):
        client.feedback("alice", "q", "a", kind="love")  # type: ignore[arg-type]
    assert not servicer.calls


def test_import_is_never_retried(flaky: Flaky) -> None:
    servicer, client = flaky
    servicer.failures["ImportAdapter"] = 1
    with pytest.raises(UnavailableError):
        client.import_adapter("alice", FILES)
    assert servicer.calls["ImportAdapter"] == 1
    assert client.import_adapter("alice", FILES).version == 4


def test_other_codes_are_not_retried_and_typed(flaky: Flaky) -> None:
    servicer, client = flaky
    servicer.error = errors.NotFound("no adapter for user 'alice'")
    with pytest.raises(NotFoundError) as raised:
        client.get_adapter("alice")
    assert servicer.calls["GetAdapter"] == 1
    assert raised.value.details() == "no adapter for user 'alice'"
    assert isinstance(raised.value, errors.NotFound)


def test_stream_is_retried_before_its_first_chunk(flaky: Flaky) -> None:
    servicer, client = flaky
    servicer.failures["GenerateStream"] = 2
    with client.generate_stream("alice", "hi") as stream:
        assert list(stream) == ["Hel", "lo"]
    assert stream.response is not None and stream.response.text == "Hello"
    assert servicer.calls["GenerateStream"] == 3


def test_stream_is_not_retried_after_a_chunk(flaky: Flaky) -> None:
    servicer, client = flaky
    servicer.failures["GenerateStream.after"] = 1
    stream = client.generate_stream("alice", "hi")
    pieces = []
    with pytest.raises(UnavailableError):
        for piece in stream:
            pieces.append(piece)
    assert pieces == ["Hel"] and stream.response is None
    assert servicer.calls["GenerateStream"] == 1
    with pytest.raises(RuntimeError, match="iterated once"):
        iter(stream)


def test_deadline_is_enforced() -> None:
    with serve() as (servicer, target), PersonalizeClient(target, timeout=0.2) as client:
        servicer.delay = 1.0
        with pytest.raises(DeadlineExceededError):
            client.get_adapter("alice")


def test_unreachable_server_is_unavailable_after_retries() -> None:
    with serve() as (_, target):
        pass  # the port is free again
    with PersonalizeClient(target, timeout=5, backoff=0.01) as client, pytest.raises(UnavailableError):
        client.stats()


def test_api_key_selects_the_tenant() -> None:
    with serve(ApiKeys.parse("acme:sk-acme-1")) as (_, target):
        with PersonalizeClient(target, api_key="sk-acme-1") as client:
            assert client.generate("alice", "hi").text == "acme:hi"
        with PersonalizeClient(target) as client, pytest.raises(UnauthenticatedError):
            client.generate("alice", "hi")
        with PersonalizeClient(target, api_key="wrong") as client, pytest.raises(PersonalizeClientError) as raised:
            client.generate("alice", "hi")
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_export_save_and_import_from_directory(flaky: Flaky, tmp_path: Path) -> None:
    servicer, client = flaky
    exported = client.export_adapter("alice", version=3)
    assert servicer.requests[-1].version == 3 and exported.info.version == 3
    directory = exported.save(tmp_path / "alice")
    (directory / "README.md").write_text("ignored")
    assert client.import_adapter("bob", directory).version == 4
    assert dict(servicer.requests[-1].files) == FILES
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        client.import_adapter("bob", tmp_path)


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "..", "", "sub/file"])
def test_save_refuses_names_that_leave_the_directory(tmp_path: Path, name: str) -> None:
    exported = ExportedAdapter(files={**FILES, name: b"x"}, info=pb.AdapterInfo())
    with pytest.raises(ValueError, match="not plain file names"):
        exported.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_generate_options_reach_the_request_and_unknown_ones_are_refused(flaky: Flaky, method: str) -> None:
    servicer, client = flaky
    call = client.generate if method == "Generate" else client.generate_stream
    options: dict[str, Any] = dict(temperature=0.5, top_p=0.9, seed=7, stop=["\n"], top_k=3, logprobs=True)
    for result in (call("alice", "hi", **options, repetition_penalty=1.2), call("alice", "hi")):
        if method == "GenerateStream":
            list(result)  # type: ignore[arg-type]  # a stream is sent when iterated
    sent, default = servicer.requests[0], servicer.requests[-1]  # a stream's handler records it twice
    assert (sent.max_new_tokens, sent.temperature, sent.seed, list(sent.stop), sent.top_k, sent.logprobs) == (
        64,
        0.5,
        7,
        ["\n"],
        3,
        True,
    )
    assert sent.top_p == pytest.approx(0.9) and sent.repetition_penalty == pytest.approx(1.2)
    assert default == pb.GenerateRequest(user_id="alice", prompt="hi", max_new_tokens=64)
    sent_before = len(servicer.requests)
    with pytest.raises(TypeError, match="max_tokens"):
        call("alice", "hi", max_tokens=5)  # type: ignore[call-arg]
    assert len(servicer.requests) == sent_before
