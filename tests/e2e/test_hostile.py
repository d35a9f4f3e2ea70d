"""Hostile tenants against `personalize up`: what one tenant sends never fails another tenant's stream."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
from safetensors.torch import load_file, save_file

from personalize.model import BaseModel
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from tests.e2e.upserver import Stubs, UpServer, adapter_files, make_peft_adapter, start_up

KEY_A = (("authorization", "Bearer keyA"),)
KEY_B = (("authorization", "Bearer keyB"),)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[UpServer, Stubs]]:
    root = tmp_path_factory.mktemp("up-hostile")
    server = start_up(root / "data", root / "up.log", env={"PERSONALIZE_API_KEYS": "tenantA:keyA,tenantB:keyB"})
    try:
        with server.channel() as channel:
            yield server, Stubs.on(channel)
    finally:
        assert server.stop() == 0, server.log()[-4000:]


@pytest.fixture(scope="module")
def huge_adapter(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A PEFT adapter whose weights are finite but ~1e30: its deltas overflow to inf."""
    directory = tmp_path_factory.mktemp("huge-adapter")
    make_peft_adapter(base.model, seed=9, directory=directory)
    path = directory / "adapter_model.safetensors"
    save_file({k: v * 1e30 for k, v in load_file(str(path)).items()}, str(path))
    return adapter_files(directory)


class _Stream(threading.Thread):
    """Tenant B's stream, read to its end on its own thread."""

    def __init__(self, api: object) -> None:
        super().__init__(daemon=True)
        self.api = api
        self.chunks: list[pb.GenerateChunk] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        request = pb.GenerateRequest(user_id="bob", prompt="A long and quiet story about", max_new_tokens=48)
        try:
            self.chunks = list(self.api.GenerateStream(request, timeout=120, metadata=KEY_B))  # type: ignore[attr-defined]
        except grpc.RpcError as exc:
            self.error = exc


def test_tiny_temperature_and_huge_adapter_fail_only_their_own_request(
        up: tuple[UpServer, Stubs], huge_adapter: dict[str, bytes]) -> None:
    api = up[1].api
    other = _Stream(api)
    other.start()
    tiny = api.Generate(pb.GenerateRequest(user_id="mallory", prompt="hi", max_new_tokens=8, temperature=1e-40),
                        timeout=60, metadata=KEY_A)
    assert tiny.finish_reason in ("length", "eos")  # decoded greedily, not a NaN draw
    try:
        api.ImportAdapter(pb.ImportAdapterRequest(user_id="mallory", files=huge_adapter), timeout=60,
                          metadata=KEY_A)
    except grpc.RpcError as exc:  # refused at import (magnitude bounds): as good as failing alone
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    else:
        for temperature in (0.0, 0.7):
            with pytest.raises(grpc.RpcError) as raised:
                api.Generate(pb.GenerateRequest(user_id="mallory", prompt="hi", max_new_tokens=8,
                                                temperature=temperature), timeout=60, metadata=KEY_A)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "user 'mallory'" in raised.value.details()
    other.join(120)
    assert other.error is None, other.error
    assert other.chunks and other.chunks[-1].done
    assert other.chunks[-1].final.finish_reason in ("length", "eos")
    after = api.Generate(pb.GenerateRequest(user_id="bob", prompt="still", max_new_tokens=4), timeout=60,
                         metadata=KEY_B)
    assert after.completion_tokens >= 1
