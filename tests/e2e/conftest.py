"""e2e fixtures: `personalize up` as a subprocess on a temp data dir and a port it picks, reached only over
gRPC. One server (`up_server`) is shared by every test of the session that needs nothing special; tests
that need their own (API keys, restarts, signals) use `start_up` from tests/e2e/upserver.py.

    up_server   UpServer: .target .data_dir .process .log() .channel() .stop()     (session; serves
                /metrics too, at the URL its start-up banner prints)
    stubs       Stubs(api, admin) on one channel to up_server                      (session)
    base        the tiny default base model, loaded in this process for references (session)
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from personalize.model import BaseModel, ModelConfig, load_base_model
from personalize_service.net import find_free_port
from tests.e2e.upserver import Stubs, UpServer, start_up


@pytest.fixture(scope="session")
def up_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpServer]:
    root = tmp_path_factory.mktemp("up")
    server = start_up(root / "data", root / "up.log", "--metrics-port", str(find_free_port()))
    yield server
    assert server.stop() == 0, server.log()[-4000:]


@pytest.fixture(scope="session")
def channel(up_server: UpServer) -> Iterator[grpc.Channel]:
    with up_server.channel() as channel:
        yield channel


@pytest.fixture(scope="session")
def stubs(channel: grpc.Channel) -> Stubs:
    return Stubs.on(channel)


@pytest.fixture(scope="session")
def base() -> BaseModel:
    return load_base_model(ModelConfig())
