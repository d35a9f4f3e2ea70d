"""`personalize serve --role worker`, the production entry point: external Valkey and store, settings from
environment variables and a config file, no embedded parts."""

from __future__ import annotations

import sys
from pathlib import Path

from personalize.model import BaseModel
from personalize_service.cli.embedded import EmbeddedValkey, EmbeddedValkeyConfig
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from tests.e2e.upserver import TEST_FLAGS, Stubs, adapter_files, greedy_reference, make_peft_adapter, start_server


def test_worker_role_serves_from_env_and_config_file(base: BaseModel, tmp_path: Path) -> None:
    make_peft_adapter(base.model, seed=60, directory=tmp_path / "adapter")
    config = tmp_path / "worker.toml"
    config.write_text('node_id = "worker-7"\n[service]\nport = 0\ngrace_s = 5\n[engine]\nmax_batch = 8\n')
    with EmbeddedValkey(EmbeddedValkeyConfig(data_dir=tmp_path / "valkey")) as valkey:
        env = {"PERSONALIZE_REGISTRY_URL": valkey.url, "PERSONALIZE_STORE_URL": (tmp_path / "store").as_uri(),
               "PERSONALIZE_DATA_DIR": str(tmp_path / "node"), "PERSONALIZE_CONFIG": str(config)}
        command = [sys.executable, "-m", "personalize_service.cli", "serve", "--role", "worker", *TEST_FLAGS]
        server = start_server(command, tmp_path / "node", tmp_path / "serve.log", env)
        try:
            with server.channel() as channel:
                stubs = Stubs.on(channel)
                node = stubs.admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes[0]
                assert (node.node_id, node.capacity, node.address) == ("worker-7", 8, server.target)
                stubs.api.ImportAdapter(pb.ImportAdapterRequest(user_id="w", files=adapter_files(tmp_path / "adapter")),
                                        timeout=60)
                response = stubs.api.Generate(pb.GenerateRequest(user_id="w", prompt="Hello", max_new_tokens=8),
                                              timeout=60)
                assert response.adapter_version == 1 and response.node_id == "worker-7"
                assert response.text != greedy_reference(base.model, base.tokenizer, "Hello", 8)[0]
        finally:
            assert server.stop() == 0, server.log()[-4000:]
    assert "personalize serve: worker worker-7 serving on 127.0.0.1:" in server.log()
    assert any((tmp_path / "store").rglob("*.safetensors"))  # the adapter went to the configured store
