"""Shared pytest fixtures. Each group below belongs to one part of the system; keep them grouped."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

sys.path.insert(0, str(Path(__file__).parent))  # tests/s3server.py, also imported by loadtest/

from s3server import S3Server, start_weed_mini
from valkeycluster import ValkeyCluster

from personalize_service.cli.embedded import EmbeddedValkey, EmbeddedValkeyConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from personalize.model import BaseModel

# --------------------------------------------------------------------------------------------------
# Storage layer: one embedded Valkey and one SeaweedFS S3 server per test session, loopback only,
# on free ports, data in temp dirs. Real servers, never mocks.
#   valkey_server  EmbeddedValkey (session)       valkey_url    its redis:// URL (session)
#   redis_client   redis.Redis on it, FLUSHALL before each test using it
#   s3_server      S3Server: .endpoint .access_key .secret_key .s3_url(bucket, prefix) .client()
#   valkey_cluster ValkeyCluster (session): 3 primaries + 3 replicas, .url is redis+cluster://
#   state_url      parametrized: the single server's redis:// URL, then the cluster's redis+cluster:// URL
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey(EmbeddedValkeyConfig(data_dir=tmp_path_factory.mktemp("valkey")))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def valkey_url(valkey_server: EmbeddedValkey) -> str:
    return valkey_server.url


@pytest.fixture
def redis_client(valkey_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(valkey_url)
    client.execute_command("FLUSHALL", "SYNC")  # SYNC: the server may make a plain FLUSHALL lazy
    yield client
    client.close()


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    cluster = ValkeyCluster(tmp_path_factory.mktemp("valkey-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["single", "cluster"])
def state_url(request: pytest.FixtureRequest) -> str:
    """Where shared state lives, once per kind of deployment: one Valkey, then a Valkey Cluster."""
    if request.param == "single":
        return str(request.getfixturevalue("valkey_url"))
    return str(request.getfixturevalue("valkey_cluster").url)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_weed_mini(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()


# --------------------------------------------------------------------------------------------------
# Base model: the built-in tiny default (config + seed), loaded once per test module that asks for it
# (tests/e2e has a session-wide one; tests needing another model define their own `base`).
#   base  BaseModel
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base() -> BaseModel:
    from personalize.model import ModelConfig, load_base_model  # torch: only for the tests that use it

    return load_base_model(ModelConfig())


# --------------------------------------------------------------------------------------------------
# Tracing: the process's one OpenTelemetry tracer provider (a second is refused), spans kept in memory.
#   span_exporter  InMemorySpanExporter (session); clear() it before a test reads spans
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)
    return memory
