"""Hostile calls against the service's real server wiring (base.create) over loopback gRPC: requests too
large for their method, calls without a key, tenants on the Admin API.

The servicers here answer with the caller's tenant; they stand in for our handlers, not for infrastructure.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.server.auth import OPERATOR, ApiKeys, current_tenant
from personalize_service.server.base import NodeState, ServiceConfig, create
from personalize_service.server.limits import MIB, Limits

KEYS = ApiKeys.parse("tenantA:key-a,tenantB:key-b").with_operator_keys("op-key")
TENANT_A = (("authorization", "Bearer key-a"),)
OPERATOR_KEY = (("authorization", "Bearer op-key"),)
JUNK = b"\xff" * 16
"""Not a protobuf message: parsing it fails (grpc answers INTERNAL "Exception deserializing request!")."""


class _Api(pb_grpc.PersonalizeServicer):
    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        return pb.GenerateResponse(text=current_tenant())

    def ImportAdapter(self, request: pb.ImportAdapterRequest, context: grpc.ServicerContext) -> pb.AdapterInfo:
        return pb.AdapterInfo(user_id=current_tenant())


class _Admin(pb_grpc.AdminServicer):
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return pb.StatsResponse(nodes=[pb.NodeStats(node_id=current_tenant())])

    def ListNodes(self, request: pb.ListNodesRequest, context: grpc.ServicerContext) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=[pb.Node(node_id=current_tenant())])


@contextmanager
def serve(keys: ApiKeys) -> Iterator[grpc.Channel]:
    def register(server: grpc.Server, port: int, state: NodeState) -> None:
        pb_grpc.add_PersonalizeServicer_to_server(_Api(), server)
        pb_grpc.add_AdminServicer_to_server(_Admin(), server)

    server, port = create(ServiceConfig(port=0, api_keys=keys, threads=8), register)
    server.start()
    options = [("grpc.max_send_message_length", 256 * MIB), ("grpc.max_receive_message_length", 256 * MIB)]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
    try:
        yield channel
    finally:
        channel.close()
        server.stop(None)


@pytest.fixture(scope="module")
def keyed() -> Iterator[grpc.Channel]:
    with serve(KEYS) as channel:
        yield channel


def raw_call(channel: grpc.Channel, method: str, body: bytes, metadata: Any = None) -> grpc.RpcError:
    """The error a call of `method` with `body` as its raw message gets (fails the test if it succeeds)."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as raised:
        call(body, timeout=120, metadata=metadata)
    return raised.value


# ---- size limits and auth before the body is parsed ----------------------------------------------------


def test_unauthenticated_call_is_refused_without_parsing_it(keyed: grpc.Channel) -> None:
    """3 MiB of junk: parsing it would answer INTERNAL; refused on its headers it is UNAUTHENTICATED. 100 MiB
    never reaches a handler: grpc refuses it by its length prefix at the receive limit (max_message_bytes)."""
    body = JUNK * (3 * MIB // len(JUNK))
    for metadata in (None, (("authorization", "Bearer wrong"),)):
        error = raw_call(keyed, "/personalize.v1.Personalize/ImportAdapter", body, metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    huge = raw_call(keyed, "/personalize.v1.Personalize/ImportAdapter", JUNK * (100 * MIB // len(JUNK)))
    assert huge.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, huge.details()
    # the same bytes with a key are parsed (and fail as junk does): the refusal above came before parsing
    parsed = raw_call(keyed, "/personalize.v1.Personalize/ImportAdapter", JUNK, TENANT_A)
    assert parsed.code() == grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("method", ["Personalize/Generate", "Personalize/SubmitFeedback", "Admin/Stats"])
def test_a_request_over_its_method_limit_is_refused_by_length_before_parsing(keyed: grpc.Channel, method: str) -> None:
    limit = Limits().max_request_bytes
    metadata = OPERATOR_KEY if method.startswith("Admin") else TENANT_A
    error = raw_call(keyed, f"/personalize.v1.{method}", JUNK * (limit // len(JUNK) + 1), metadata)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert f"the limit is {limit} (max_request_bytes" in error.details()


def test_requests_within_the_limit_and_large_imports_are_served(keyed: grpc.Channel) -> None:
    api = pb_grpc.PersonalizeStub(keyed)
    prompt = "x" * Limits().max_prompt_bytes
    assert api.Generate(pb.GenerateRequest(user_id="u", prompt=prompt), timeout=30, metadata=TENANT_A).text == "tenantA"
    files = {"adapter_model.safetensors": b"\0" * (3 * MIB)}  # far over max_request_bytes: ImportAdapter may be
    reply = api.ImportAdapter(pb.ImportAdapterRequest(user_id="u", files=files), timeout=60, metadata=TENANT_A)
    assert reply.user_id == "tenantA"


def test_no_method_is_sent_more_than_the_receive_limit(keyed: grpc.Channel) -> None:
    """Not even ImportAdapter, not even with a key: grpc refuses the message at max_message_bytes."""
    files = {"adapter_model.safetensors": b"\0" * Limits().max_message_bytes}
    with pytest.raises(grpc.RpcError) as raised:
        pb_grpc.PersonalizeStub(keyed).ImportAdapter(
            pb.ImportAdapterRequest(user_id="u", files=files), timeout=60, metadata=TENANT_A
        )
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()


# ---- the Admin API needs an operator key ----------------------------------------------------------------


@pytest.mark.parametrize("rpc", ["Stats", "ListNodes"])
def test_admin_needs_an_operator_key(keyed: grpc.Channel, rpc: str) -> None:
    admin = pb_grpc.AdminStub(keyed)
    request = pb.StatsRequest() if rpc == "Stats" else pb.ListNodesRequest()
    reply = getattr(admin, rpc)(request, timeout=10, metadata=OPERATOR_KEY)
    assert reply.nodes[0].node_id == OPERATOR
    expected = [
        (TENANT_A, grpc.StatusCode.PERMISSION_DENIED, "needs an operator key"),
        (None, grpc.StatusCode.UNAUTHENTICATED, "needs an operator key"),
        ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED, "unknown operator key"),
    ]
    for metadata, code, message in expected:
        with pytest.raises(grpc.RpcError) as raised:
            getattr(admin, rpc)(request, timeout=10, metadata=metadata)
        assert raised.value.code() == code and message in raised.value.details()


def test_an_operator_key_is_no_tenant_key(keyed: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        pb_grpc.PersonalizeStub(keyed).Generate(pb.GenerateRequest(user_id="u"), timeout=10, metadata=OPERATOR_KEY)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tenant_keys_without_operator_keys_close_the_admin_api() -> None:
    with serve(ApiKeys.parse("tenantA:key-a")) as channel, pytest.raises(grpc.RpcError) as raised:
        pb_grpc.AdminStub(channel).Stats(pb.StatsRequest(), timeout=10, metadata=TENANT_A)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_without_any_key_the_admin_api_stays_open() -> None:
    with serve(ApiKeys()) as channel:
        assert pb_grpc.AdminStub(channel).Stats(pb.StatsRequest(), timeout=10).nodes[0].node_id == "default"


def test_an_operator_key_may_not_also_be_a_tenant_key() -> None:
    with pytest.raises(Exception, match="also a tenant's API key"):
        ApiKeys.parse("tenantA:key-a").with_operator_keys("key-a")
