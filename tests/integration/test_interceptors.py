"""Interceptors over real gRPC on loopback: status mapping, API keys -> tenant, per-tenant rate limit.

The servicer here is a test double of *our* handler (it raises on request), not of any infrastructure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from personalize import errors
from personalize_service.client import NotFoundError
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.server.auth import ApiKeys, current_tenant
from personalize_service.server.interceptors import ErrorInterceptor, server_interceptors
from personalize_service.server.limits import Limits, RateLimiter
from personalize_service.server.metrics import ServiceMetrics

DOMAIN_ERRORS: list[tuple[type[Exception], grpc.StatusCode]] = [
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.AdapterError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.IncompatibleAdapter, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Conflict, grpc.StatusCode.ABORTED),
    (errors.CorruptObject, grpc.StatusCode.DATA_LOSS),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
]
_BY_NAME: dict[str, type[Exception]] = {cls.__name__: cls for cls, _ in DOMAIN_ERRORS}
GENERATE = "personalize.v1.Personalize/Generate"
NO_KEYS = ApiKeys()


def _raise_for(prompt: str, context: grpc.ServicerContext) -> None:
    """prompt `raise:<DomainError>` raises it; `crash` a bug; `abort` aborts; `downstream` a client error."""
    if prompt.startswith("raise:"):
        name = prompt.removeprefix("raise:")
        raise _BY_NAME[name](f"{name} raised by the handler")
    if prompt == "crash":
        raise KeyError("secret internals")
    if prompt == "abort":
        context.abort(grpc.StatusCode.ALREADY_EXISTS, "the handler aborted")
    if prompt == "downstream":
        raise NotFoundError(grpc.StatusCode.NOT_FOUND, "worker says no such user")


class _Servicer(pb_grpc.PersonalizeServicer):
    """Answers with the caller's tenant, or raises as the prompt says."""

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        _raise_for(request.prompt, context)
        return pb.GenerateResponse(text=current_tenant())

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateChunk]:
        yield pb.GenerateChunk(text=current_tenant())
        _raise_for(request.prompt, context)
        yield pb.GenerateChunk(done=True, final=pb.GenerateResponse(text=current_tenant()))


@contextmanager
def serve(
    keys: ApiKeys = NO_KEYS,
    limiter: RateLimiter | None = None,
    metrics: ServiceMetrics | None = None,
    interceptors: list[grpc.ServerInterceptor] | None = None,
) -> Iterator[grpc.Channel]:
    """A real server on 127.0.0.1:0 with our interceptors, health and reflection; yields a channel to it."""
    if interceptors is None:
        interceptors = server_interceptors(keys, limiter, metrics)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=interceptors)
    pb_grpc.add_PersonalizeServicer_to_server(_Servicer(), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    reflection.enable_server_reflection(
        (pb.DESCRIPTOR.services_by_name["Personalize"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        channel.close()
        server.stop(None)


@pytest.fixture(scope="module")
def metrics() -> ServiceMetrics:
    return ServiceMetrics()


@pytest.fixture(scope="module")
def stub(metrics: ServiceMetrics) -> Iterator[pb_grpc.PersonalizeStub]:
    with serve(metrics=metrics) as channel:
        yield pb_grpc.PersonalizeStub(channel)


def _generate(stub: pb_grpc.PersonalizeStub, prompt: str, metadata: Any = None) -> pb.GenerateResponse:
    return stub.Generate(pb.GenerateRequest(user_id="alice", prompt=prompt), timeout=10, metadata=metadata)


def _stream(stub: pb_grpc.PersonalizeStub, prompt: str, metadata: Any = None) -> list[pb.GenerateChunk]:
    return list(stub.GenerateStream(pb.GenerateRequest(user_id="alice", prompt=prompt), timeout=10, metadata=metadata))


# ---- status mapping ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "code"), DOMAIN_ERRORS, ids=[cls.__name__ for cls, _ in DOMAIN_ERRORS])
def test_unary_domain_error_maps_to_its_code(
    stub: pb_grpc.PersonalizeStub, metrics: ServiceMetrics, error: type[Exception], code: grpc.StatusCode
) -> None:
    before = (
        metrics.registry.get_sample_value("personalize_requests_total", {"rpc": GENERATE, "code": code.name}) or 0.0
    )
    with pytest.raises(grpc.RpcError) as raised:
        _generate(stub, f"raise:{error.__name__}")
    assert raised.value.code() == code
    assert raised.value.details() == f"{error.__name__} raised by the handler"
    labels = {"rpc": GENERATE, "code": code.name}
    assert metrics.registry.get_sample_value("personalize_requests_total", labels) == before + 1


@pytest.mark.parametrize(("error", "code"), DOMAIN_ERRORS, ids=[cls.__name__ for cls, _ in DOMAIN_ERRORS])
def test_streaming_domain_error_maps_to_its_code(
    stub: pb_grpc.PersonalizeStub, error: type[Exception], code: grpc.StatusCode
) -> None:
    request = pb.GenerateRequest(user_id="alice", prompt=f"raise:{error.__name__}")
    call = stub.GenerateStream(request, timeout=10)
    assert next(call).text == "default"  # the chunk before the failure arrives
    with pytest.raises(grpc.RpcError) as raised:
        next(call)
    assert raised.value.code() == code
    assert raised.value.details() == f"{error.__name__} raised by the handler"


def test_success_is_ok_and_counted(stub: pb_grpc.PersonalizeStub, metrics: ServiceMetrics) -> None:
    assert _generate(stub, "hello").text == "default"
    chunks = _stream(stub, "hello")
    assert [c.text for c in chunks] == ["default", ""] and chunks[-1].done
    sample = metrics.registry.get_sample_value
    assert (sample("personalize_requests_total", {"rpc": GENERATE, "code": "OK"}) or 0) >= 1
    assert (sample("personalize_request_seconds_count", {"rpc": GENERATE}) or 0) >= 1


@pytest.mark.parametrize("streaming", [False, True])
def test_unexpected_exception_is_internal_and_logged(
    stub: pb_grpc.PersonalizeStub, streaming: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="personalize_service.server.interceptors"),
        pytest.raises(grpc.RpcError) as raised,
    ):
        _stream(stub, "crash") if streaming else _generate(stub, "crash")
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    details = raised.value.details()
    assert details.startswith("internal error ") and "KeyError" in details and "secret" not in details
    error_id = details.split()[2]
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)


@pytest.mark.parametrize("streaming", [False, True])
def test_handler_abort_passes_through(stub: pb_grpc.PersonalizeStub, streaming: bool) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        _stream(stub, "abort") if streaming else _generate(stub, "abort")
    assert raised.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert raised.value.details() == "the handler aborted"


def test_downstream_rpc_error_passes_through(stub: pb_grpc.PersonalizeStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        _generate(stub, "downstream")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert raised.value.details() == "worker says no such user"


# ---- authentication ----------------------------------------------------------------------------------

KEYS = ApiKeys.parse("tenantA:key-a-123,tenantB:key-b-456")


@pytest.fixture(scope="module")
def keyed() -> Iterator[grpc.Channel]:
    with serve(KEYS) as channel:
        yield channel


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (None, "missing API key"),
        ((("authorization", "Bearer wrong-key"),), "unknown API key"),
        ((("authorization", "key-a-123"),), "must be 'Bearer <key>'"),
        ((("authorization", "Basic key-a-123"),), "must be 'Bearer <key>'"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_missing_or_bad_key_is_unauthenticated(
    keyed: grpc.Channel, metadata: Any, message: str, streaming: bool
) -> None:
    stub = pb_grpc.PersonalizeStub(keyed)
    with pytest.raises(grpc.RpcError) as raised:
        _stream(stub, "hello", metadata) if streaming else _generate(stub, "hello", metadata)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert message in raised.value.details()


@pytest.mark.parametrize(("key", "tenant"), [("key-a-123", "tenantA"), ("key-b-456", "tenantB")])
def test_good_key_selects_its_tenant(keyed: grpc.Channel, key: str, tenant: str) -> None:
    stub = pb_grpc.PersonalizeStub(keyed)
    metadata = (("authorization", f"Bearer {key}"),)
    assert _generate(stub, "hello", metadata).text == tenant
    assert _stream(stub, "hello", metadata)[0].text == tenant
    assert _generate(stub, "hello", (("authorization", f"bearer {key}"),)).text == tenant


def test_without_keys_every_caller_is_tenant_default(stub: pb_grpc.PersonalizeStub) -> None:
    assert _generate(stub, "hello").text == "default"
    assert _generate(stub, "hello", (("authorization", "Bearer anything"),)).text == "default"


def test_health_and_reflection_need_no_key(keyed: grpc.Channel) -> None:
    status = health_pb2_grpc.HealthStub(keyed).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    replies = reflection_pb2_grpc.ServerReflectionStub(keyed).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
    )
    services = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "personalize.v1.Personalize" in services


# ---- rate limit --------------------------------------------------------------------------------------


def test_rate_limit_is_resource_exhausted_per_tenant() -> None:
    limiter = RateLimiter(Limits(requests_per_second=0.001, burst=2))
    with serve(KEYS, limiter) as channel:
        stub = pb_grpc.PersonalizeStub(channel)
        tenant_a = (("authorization", "Bearer key-a-123"),)
        assert _generate(stub, "hello", tenant_a).text == "tenantA"
        assert _stream(stub, "hello", tenant_a)[0].text == "tenantA"
        with pytest.raises(grpc.RpcError) as raised:
            _generate(stub, "hello", tenant_a)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "requests/s" in raised.value.details() and "tenantA" in raised.value.details()
        with pytest.raises(grpc.RpcError) as raised:
            _stream(stub, "hello", tenant_a)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # another tenant has its own bucket; health is never limited
        assert _generate(stub, "hello", (("authorization", "Bearer key-b-456"),)).text == "tenantB"
        health_stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(3):
            health_stub.Check(health_pb2.HealthCheckRequest(), timeout=10)


def test_unauthenticated_calls_do_not_spend_a_tenants_budget() -> None:
    limiter = RateLimiter(Limits(requests_per_second=0.001, burst=1))
    with serve(KEYS, limiter) as channel:
        stub = pb_grpc.PersonalizeStub(channel)
        for _ in range(3):
            with pytest.raises(grpc.RpcError):
                _generate(stub, "hello", (("authorization", "Bearer wrong"),))
        assert _generate(stub, "hello", (("authorization", "Bearer key-a-123"),)).text == "tenantA"


def test_handler_not_behind_auth_has_no_tenant() -> None:
    """Fail closed: a wiring mistake is INTERNAL, never a silent fallback to some tenant."""
    with serve(interceptors=[ErrorInterceptor()]) as channel, pytest.raises(grpc.RpcError) as raised:
        _generate(pb_grpc.PersonalizeStub(channel), "hello")
    assert raised.value.code() == grpc.StatusCode.INTERNAL


def test_tenants_taking_turns_each_see_their_own(keyed: grpc.Channel) -> None:
    """The handler wrapped for one tenant is never served to the next (the wrappers are cached per tenant)."""
    stub = pb_grpc.PersonalizeStub(keyed)
    turns = [("key-a-123", "tenantA"), ("key-b-456", "tenantB")] * 3
    seen = [_generate(stub, "hello", (("authorization", f"Bearer {key}"),)).text for key, _ in turns]
    streamed = [_stream(stub, "hello", (("authorization", f"Bearer {key}"),))[0].text for key, _ in turns]
    assert seen == streamed == [tenant for _, tenant in turns]
