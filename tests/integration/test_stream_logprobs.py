"""Logprobs per streamed chunk over real gRPC (loopback, a worker wired by `bootstrap`, real Valkey): each
GenerateChunk carries the logprobs of its own tokens, and joined they equal the unary token_logprobs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from personalize import bootstrap
from personalize.adapters.registry import RegistryConfig
from personalize.config import Config
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.server.base import ServiceConfig
from personalize_service.server.worker import create_server


@pytest.mark.parametrize("stop", [[], ["a"]], ids=["length", "stop-string"])
def test_stream_chunks_join_to_the_unary_logprobs(tmp_path: Path, valkey_url: str, stop: list[str]) -> None:
    config = Config(node_id="worker-lp", data_dir=str(tmp_path / "data"), store_url=(tmp_path / "objects").as_uri())
    worker = bootstrap.worker(replace(config, registry=RegistryConfig(url=valkey_url)))
    worker.start()
    server, port = create_server(ServiceConfig(port=0), worker)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            api = pb_grpc.PersonalizeStub(channel)
            request = pb.GenerateRequest(
                user_id="lp-user", prompt="héllo wörld ✓", max_new_tokens=24, logprobs=True, stop=stop
            )
            unary = api.Generate(request, timeout=60)
            chunks = list(api.GenerateStream(request, timeout=60))
    finally:
        server.stop(None)
        worker.stop()
    assert len(unary.token_logprobs) == unary.completion_tokens > 0
    final = chunks[-1]
    assert final.done and all(not c.done for c in chunks[:-1])
    joined = [lp for c in chunks for lp in c.token_logprobs]
    assert joined == list(final.final.token_logprobs) == list(unary.token_logprobs)
    assert "".join(c.text for c in chunks) == unary.text
    assert all(c.token_logprobs for c in chunks[:-1])  # every text chunk carries its tokens' logprobs
