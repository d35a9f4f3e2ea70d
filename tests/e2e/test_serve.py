"""`personalize serve --role worker`, the production entry point: external Valkey and store, settings from
environment variables and a config file, no embedded parts."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from personalize.model import BaseModel
from personalize_service.cli.embedded import EmbeddedValkey, EmbeddedValkeyConfig
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from tests.e2e.upserver import TEST_FLAGS, Stubs, adapter_files, greedy_reference, make_peft_adapter, start_server

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_worker_role_serves_from_env_and_config_file(base: BaseModel, tmp_path: Path) -> None:
    make_peft_adapter(base.model, seed=60, directory=tmp_path / "adapter")
    config = tmp_path / "worker.toml"
    config.write_text('node_id = "worker-7"\n[service]\nport = 0\ngrace_s = 5\n[engine]\nmax_batch = 8\n')
    with EmbeddedValkey(EmbeddedValkeyConfig(data_dir=tmp_path / "valkey")) as valkey:
        env = {
            "PERSONALIZE_REGISTRY_URL": valkey.url,
            "PERSONALIZE_STORE_URL": (tmp_path / "store").as_uri(),
            "PERSONALIZE_DATA_DIR": str(tmp_path / "node"),
            "PERSONALIZE_CONFIG": str(config),
        }
        command = [sys.executable, "-m", "personalize_service.cli", "serve", "--role", "worker", *TEST_FLAGS]
        server = start_server(command, tmp_path / "node", tmp_path / "serve.log", env)
        try:
            with server.channel() as channel:
                stubs = Stubs.on(channel)
                node = stubs.admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes[0]
                assert (node.node_id, node.capacity, node.address) == ("worker-7", 8, server.target)
                stubs.api.ImportAdapter(
                    pb.ImportAdapterRequest(user_id="w", files=adapter_files(tmp_path / "adapter")), timeout=60
                )
                response = stubs.api.Generate(
                    pb.GenerateRequest(user_id="w", prompt="Hello", max_new_tokens=8), timeout=60
                )
                assert response.adapter_version == 1 and response.node_id == "worker-7"
                assert response.text != greedy_reference(base.model, base.tokenizer, "Hello", 8)[0]
        finally:
            assert server.stop() == 0, server.log()[-4000:]
    assert "personalize serve: worker worker-7 serving on 127.0.0.1:" in server.log()
    assert any((tmp_path / "store").rglob("*.safetensors"))  # the adapter went to the configured store


def test_sigterm_flips_health_to_not_serving_while_a_call_in_flight_finishes(tmp_path: Path) -> None:
    with EmbeddedValkey(EmbeddedValkeyConfig(data_dir=tmp_path / "valkey")) as valkey:
        env = {
            "PERSONALIZE_REGISTRY_URL": valkey.url,
            "PERSONALIZE_STORE_URL": (tmp_path / "store").as_uri(),
            "PERSONALIZE_DATA_DIR": str(tmp_path / "node"),
            "PERSONALIZE_GRACE_S": "120",
            "PERSONALIZE_MAX_NEW_TOKENS": "1000",
        }  # calls long enough to outlast the drain notice
        command = [sys.executable, "-m", "personalize_service.cli", "serve", "--role", "worker", *TEST_FLAGS]
        server = start_server(command, tmp_path / "node", tmp_path / "serve.log", env)
        try:
            with server.channel() as channel:
                stubs = Stubs.on(channel)
                watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=180)
                assert next(watch).status == SERVING
                long_call = stubs.api.Generate.future(
                    pb.GenerateRequest(user_id="u", prompt="Hello", max_new_tokens=1000), timeout=180
                )
                deadline = time.monotonic() + 60
                while stubs.admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes[0].load < 1:  # precondition
                    assert time.monotonic() < deadline and not long_call.done(), "the call never got in flight"
                    time.sleep(0.01)
                server.process.send_signal(signal.SIGTERM)
                assert next(watch).status == NOT_SERVING  # the next health change is the drain
                watch.cancel()
                done = long_call.result()  # the drain let the call in flight finish
                assert (done.completion_tokens, done.finish_reason) == (1000, "length"), done
                assert server.process.wait(120) == 0  # then the server stops by itself
        finally:
            assert server.stop() == 0, server.log()[-4000:]
