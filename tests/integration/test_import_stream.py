"""ImportAdapterStream over loopback gRPC into a real worker (bootstrap: real Valkey, file:// store, the tiny
default model): adapters larger than the server's receive limit import in chunks; a keyless caller's stream
is refused on its headers and never read; bad chunks are refused naming the limit they broke.

The servers run with the smallest receive limit Limits allows (one chunk and its framing), so an adapter
of the tiny model is larger than any one message the server takes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest
import torch
from safetensors.torch import load

from personalize import bootstrap
from personalize.adapters.registry import RegistryConfig
from personalize.config import Config, LoraConfig
from personalize.lora.format import random_adapter, write_peft
from personalize.worker import Worker
from personalize_service.client import PersonalizeClient
from personalize_service.client.sdk import ImportChunks
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.server.auth import ApiKeys
from personalize_service.server.base import ServiceConfig
from personalize_service.server.limits import IMPORT_CHUNK_BYTES, KIB, MIB, Limits
from personalize_service.server.metrics import ServiceMetrics
from personalize_service.server.worker import create_server

KEYS = ApiKeys.parse("tenantA:key-a,tenantB:key-b")
KEY_A = (("authorization", "Bearer key-a"),)
LIMITS = Limits(max_message_bytes=IMPORT_CHUNK_BYTES + 64 * KIB, max_import_file_bytes=8 * MIB)
STREAM = "personalize.v1.Personalize/ImportAdapterStream"


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, valkey_url: str) -> Iterator[Worker]:
    data_dir = tmp_path_factory.mktemp("import-stream")
    config = Config(node_id="worker-0", data_dir=str(data_dir), lora=LoraConfig(r_max=64))
    worker = bootstrap.worker(
        replace(config, registry=RegistryConfig(url=valkey_url), store_url=(data_dir / "objects").as_uri())
    )
    try:
        yield worker
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def served(worker: Worker) -> Iterator[tuple[str, ServiceMetrics]]:
    metrics = ServiceMetrics()
    server, port = create_server(ServiceConfig(port=0, api_keys=KEYS, limits=LIMITS, threads=8), worker, metrics)
    server.start()
    try:
        yield f"127.0.0.1:{port}", metrics
    finally:
        server.stop(None)


@pytest.fixture
def channel(served: tuple[str, ServiceMetrics]) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 256 * MIB), ("grpc.max_receive_message_length", 256 * MIB)]
    with grpc.insecure_channel(served[0], options=options) as channel:
        yield channel


def big_adapter(worker: Worker, seed: int = 0) -> dict[str, bytes]:
    adapter = random_adapter(worker.spec, rank=64, alpha=64.0, generator=torch.Generator().manual_seed(seed))
    files = write_peft(adapter, worker.spec)
    assert len(files["adapter_model.safetensors"]) > 2 * LIMITS.max_message_bytes  # several messages' worth
    return files


def received(metrics: ServiceMetrics) -> float:
    value = metrics.registry.get_sample_value("personalize_request_bytes_total", {"rpc": STREAM})
    return value or 0.0


def stream_error(channel: grpc.Channel, chunks: Iterator[pb.ImportAdapterChunk], metadata: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        pb_grpc.PersonalizeStub(channel).ImportAdapterStream(chunks, timeout=60, metadata=metadata)
    return raised.value


def test_an_adapter_over_the_receive_limit_round_trips_streamed(
    worker: Worker, served: tuple[str, ServiceMetrics]
) -> None:
    files = big_adapter(worker)
    with PersonalizeClient(served[0], api_key="key-a") as client:
        info = client.import_adapter("alice", files)
        exported = client.export_adapter("alice")
    assert info.version == exported.info.version >= 1
    mine, theirs = load(files["adapter_model.safetensors"]), load(exported.files["adapter_model.safetensors"])
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert received(served[1]) >= len(files["adapter_model.safetensors"])


def test_the_same_adapter_in_one_message_is_resource_exhausted(worker: Worker, channel: grpc.Channel) -> None:
    request = pb.ImportAdapterRequest(user_id="alice", files=big_adapter(worker))
    with pytest.raises(grpc.RpcError) as raised:
        pb_grpc.PersonalizeStub(channel).ImportAdapter(request, timeout=60, metadata=KEY_A)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()


class Counted:
    """`chunks`, counting how many grpc took from it."""

    def __init__(self, chunks: Iterator[pb.ImportAdapterChunk]) -> None:
        self.chunks, self.taken = chunks, 0

    def __iter__(self) -> Counted:
        return self

    def __next__(self) -> pb.ImportAdapterChunk:
        chunk = next(self.chunks)
        self.taken += 1
        return chunk


def junk_chunks(count: int) -> Iterator[pb.ImportAdapterChunk]:
    yield pb.ImportAdapterChunk(user_id="alice")
    for _ in range(count):
        yield pb.ImportAdapterChunk(file_name="adapter_model.safetensors", data=b"\xff" * IMPORT_CHUNK_BYTES)


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),)], ids=["no-key", "wrong-key"])
def test_a_keyless_120_mib_stream_is_refused_unread(
    channel: grpc.Channel, served: tuple[str, ServiceMetrics], metadata: object
) -> None:
    before = received(served[1])
    chunks = Counted(junk_chunks(120))
    error = stream_error(channel, chunks, metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    assert received(served[1]) == before  # the worker parsed none of its chunks
    assert chunks.taken < 60  # and the caller could not even push half of it at the server


def test_a_chunk_over_one_mib_is_refused_naming_the_limit(channel: grpc.Channel) -> None:
    chunks = iter(
        [
            pb.ImportAdapterChunk(user_id="alice"),
            pb.ImportAdapterChunk(file_name="adapter_model.safetensors", data=b"\0" * (IMPORT_CHUNK_BYTES + 1)),
        ]
    )
    error = stream_error(channel, chunks, KEY_A)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"carries {IMPORT_CHUNK_BYTES + 1} bytes; the limit is {IMPORT_CHUNK_BYTES}" in error.details()


def test_a_file_over_the_import_limit_is_refused_before_the_rest_is_read(
    channel: grpc.Channel, served: tuple[str, ServiceMetrics]
) -> None:
    before = received(served[1])
    chunks = Counted(junk_chunks(40))  # 40 MiB of a file limited to 8 MiB
    error = stream_error(channel, chunks, KEY_A)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    limit = LIMITS.max_import_file_bytes
    assert f"the limit is {limit} (max_import_file_bytes)" in error.details()
    assert received(served[1]) - before < 20 * MIB  # refused at the 9th MiB, not after all 40


@pytest.mark.parametrize(
    ("header", "users", "message"),
    [
        ("alice", ["bob"], "x-user-id metadata 'alice' differs from the request's user_id 'bob'"),
        ("alice", ["alice", "bob"], "x-user-id metadata 'alice' differs from the request's user_id 'bob'"),
        (None, ["alice", "bob"], "import chunk 1 is for user_id 'bob'; the first chunk's is 'alice'"),
    ],
)
def test_a_chunk_for_another_user_is_refused(
    worker: Worker, channel: grpc.Channel, header: str | None, users: list[str], message: str
) -> None:
    chunks = [pb.ImportAdapterChunk(user_id=user) for user in users]
    metadata = KEY_A + ((("x-user-id", header),) if header else ())
    error = stream_error(channel, iter(chunks), metadata)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


def test_a_streamed_import_is_validated_as_a_unary_one(worker: Worker, channel: grpc.Channel) -> None:
    """The reassembled files take ImportAdapter's checks: a missing file is refused the same way."""
    files = {"adapter_config.json": big_adapter(worker)["adapter_config.json"]}
    unary = pb_grpc.PersonalizeStub(channel).ImportAdapter
    with pytest.raises(grpc.RpcError) as raised:
        unary(pb.ImportAdapterRequest(user_id="carol", files=files), timeout=60, metadata=KEY_A)
    error = stream_error(channel, ImportChunks("carol", files), KEY_A)
    assert (error.code(), error.details()) == (raised.value.code(), raised.value.details())
    assert "missing ['adapter_model.safetensors']" in error.details()
