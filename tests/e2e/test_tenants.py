"""API keys select the tenant, and tenants never see each other's users (their own `personalize up`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from personalize.model import BaseModel
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from tests.e2e.upserver import KEY_A, KEY_B, Stubs, UpServer, adapter_files, make_peft_adapter, two_tenants


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UpServer, Stubs]]:
    with two_tenants(tmp_path_factory.mktemp("up-keys")) as running:
        yield running


@pytest.fixture(scope="module")
def adapter_dir(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("auth-adapter")
    make_peft_adapter(base.model, seed=5, directory=directory)
    return directory


def test_start_names_the_tenants(keyed: tuple[UpServer, Stubs]) -> None:
    log = keyed[0].log()
    assert "tenantA, tenantB" in log and "no API keys configured" not in log
    assert "Stats/ListNodes need an operator key" in log


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", "keyA"),)])
def test_missing_or_wrong_key_is_unauthenticated(keyed: tuple[UpServer, Stubs], metadata: Any) -> None:
    stubs = keyed[1]
    calls = [
        lambda: stubs.api.Generate(
            pb.GenerateRequest(user_id="u1", prompt="hi", max_new_tokens=2), timeout=30, metadata=metadata
        ),
        lambda: list(
            stubs.api.GenerateStream(pb.GenerateRequest(user_id="u1", prompt="hi"), timeout=30, metadata=metadata)
        ),
        lambda: stubs.api.GetAdapter(pb.GetAdapterRequest(user_id="u1"), timeout=30, metadata=metadata),
        lambda: stubs.admin.Stats(pb.StatsRequest(), timeout=30, metadata=metadata),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_key(keyed: tuple[UpServer, Stubs]) -> None:
    with keyed[0].channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tenants_are_isolated(keyed: tuple[UpServer, Stubs], adapter_dir: Path) -> None:
    api = keyed[1].api
    request = pb.ImportAdapterRequest(user_id="u1", files=adapter_files(adapter_dir))
    assert api.ImportAdapter(request, timeout=60, metadata=KEY_A).version == 1

    with pytest.raises(grpc.RpcError) as raised:
        api.GetAdapter(pb.GetAdapterRequest(user_id="u1"), timeout=10, metadata=KEY_B)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as raised:
        api.ExportAdapter(pb.ExportAdapterRequest(user_id="u1"), timeout=10, metadata=KEY_B)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    generate = pb.GenerateRequest(user_id="u1", prompt="Hello, world", max_new_tokens=8)
    as_b = api.Generate(generate, timeout=60, metadata=KEY_B)
    as_a = api.Generate(generate, timeout=60, metadata=KEY_A)
    assert (as_b.adapter_version, as_b.cache_tier) == (0, "none") and as_a.adapter_version == 1
    assert as_a.text != as_b.text

    assert api.DeleteUser(pb.DeleteUserRequest(user_id="u1"), timeout=30, metadata=KEY_B).versions_deleted == 0
    assert api.GetAdapter(pb.GetAdapterRequest(user_id="u1"), timeout=10, metadata=KEY_A).version == 1
