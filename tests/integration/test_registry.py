"""The registry against a real Valkey: records, compare-and-set, compactness, Redis Cluster."""

from __future__ import annotations

import dataclasses
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.cluster
from valkeycluster import ValkeyCluster

from personalize.adapters.registry import (
    AdapterRecord,
    CasUpdate,
    Registry,
    RegistryConfig,
    open_registry,
    pack_record,
)
from personalize.errors import Conflict, InvalidArgument, Unavailable
from personalize_service.cli.embedded import EmbeddedValkey

FP = "sha256:" + "ab" * 32


def record(version: int, **changes: object) -> AdapterRecord:
    base = AdapterRecord(
        version=version,
        rank=8,
        fingerprint=FP,
        examples_seen=10 * version,
        last_event_id=f"1700000000000-{version}",
        updated_at_ms=1_700_000_000_000 + version,
        checksum="sha256:" + f"{version:064x}",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(params=["single", "cluster"])
def registry(request: pytest.FixtureRequest) -> Iterator[Registry]:
    """An empty registry on one Valkey, then on the Valkey Cluster (buckets spread over its shards)."""
    if request.param == "single":
        yield Registry(request.getfixturevalue("redis_client"), namespace="pz")
        return
    cluster: ValkeyCluster = request.getfixturevalue("valkey_cluster")
    cluster.flush()
    client = cluster.client()
    yield Registry(client, namespace="pz")
    client.close()


def test_record_round_trip(registry: Registry) -> None:
    assert registry.get("acme", "alice") is None
    rec = record(1, last_event_id="", examples_seen=0)
    registry.compare_and_set("acme", "alice", 0, rec)
    assert registry.get("acme", "alice") == rec
    big = record(
        2**32 - 1,
        rank=65535,
        examples_seen=2**48 - 1,
        updated_at_ms=2**48 - 1,
        last_event_id=f"{2**48 - 1}-{2**32 - 1}",
        fingerprint="f" * 256,
    )
    registry.compare_and_set("acme", "alice", 1, big)
    assert registry.get("acme", "alice") == big


def test_packed_record_is_63_bytes() -> None:
    assert len(pack_record(record(1), 1)) == 63  # <= 64: listpack-sized on a stock server


def test_compare_and_set_needs_the_stored_version(registry: Registry) -> None:
    registry.compare_and_set("acme", "bob", 0, record(1))
    with pytest.raises(Conflict, match=r"'bob'.*expected version 0, registry has 1"):
        registry.compare_and_set("acme", "bob", 0, record(2))
    with pytest.raises(Conflict, match=r"expected version 5, registry has 1"):
        registry.compare_and_set("acme", "bob", 5, record(6))
    registry.compare_and_set("acme", "bob", 1, record(3))  # versions may skip
    assert registry.get("acme", "bob") == record(3)


@pytest.mark.parametrize("new", [1, 2])
def test_version_must_increase(registry: Registry, new: int) -> None:
    registry.compare_and_set("acme", "carl", 0, record(1))
    registry.compare_and_set("acme", "carl", 1, record(2))
    with pytest.raises(Conflict, match=f"new version {new} must be greater than 2"):
        registry.compare_and_set("acme", "carl", 2, record(new))
    assert registry.get("acme", "carl") == record(2)


def _race(registry: Registry, expected: int, writers: int) -> list[str]:
    """`writers` threads released together, all CAS-ing from `expected`; each one's outcome."""
    barrier = threading.Barrier(writers)
    outcomes: list[str] = []

    def write(i: int) -> None:
        barrier.wait()
        try:
            registry.compare_and_set("acme", "dora", expected, record(expected + 1, rank=i + 1))
            outcomes.append("won")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_racing_writers_exactly_one_wins(registry: Registry) -> None:
    for expected in range(10):
        outcomes = _race(registry, expected, writers=8)
        assert sorted(outcomes) == ["conflict"] * 7 + ["won"]
        stored = registry.get("acme", "dora")
        assert stored is not None and stored.version == expected + 1


def test_delete_returns_the_record(registry: Registry) -> None:
    registry.compare_and_set("acme", "eve", 0, record(1))
    assert registry.delete("acme", "eve") == record(1)
    assert registry.get("acme", "eve") is None
    assert registry.delete("acme", "eve") is None
    registry.compare_and_set("acme", "eve", 0, record(4))  # a deleted user starts again from 0


def test_tenants_and_hostile_ids_are_separate_users(registry: Registry) -> None:
    users = [
        ("acme", "x"),
        ("other", "x"),
        ("", "x"),
        ("acme", "../../etc"),
        ("acme", "a\x00b"),
        ("acme", "y" * 10_000),
        ("acme", "🦙"),
        ("ac", "mex"),
    ]
    for i, (tenant, user_id) in enumerate(users, start=1):
        registry.compare_and_set(tenant, user_id, 0, record(i))
    for i, (tenant, user_id) in enumerate(users, start=1):
        assert registry.get(tenant, user_id) == record(i)
    assert registry.count() == len(users)


def test_bulk_compare_and_set_reports_each_outcome(registry: Registry) -> None:
    registry.compare_and_set("acme", "u1", 0, record(1))
    results = registry.compare_and_set_many(
        [
            CasUpdate("acme", "u1", 1, record(2)),
            CasUpdate("acme", "u2", 0, record(1)),
            CasUpdate("acme", "u1", 0, record(5)),
            CasUpdate("acme", "u3", 4, record(5)),
        ]
    )
    assert results[0] is None and results[1] is None
    assert isinstance(results[2], Conflict) and "registry has 2" in str(results[2])
    assert isinstance(results[3], Conflict) and "registry has 0" in str(results[3])
    assert registry.get("acme", "u1") == record(2)


def test_fingerprints_are_shared_between_clients(redis_client: redis.Redis, valkey_url: str) -> None:
    writer = Registry(redis_client)
    fingerprints = [f"sha256:{i:064x}" for i in range(50)]
    for i, fp in enumerate(fingerprints):
        writer.compare_and_set("acme", f"user{i}", 0, record(1, fingerprint=fp))
    reader = Registry(redis.Redis.from_url(valkey_url))  # its own, empty fingerprint cache
    for i, fp in enumerate(fingerprints):
        got = reader.get("acme", f"user{i}")
        assert got is not None and got.fingerprint == fp


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", 0),
        ("version", 2**32),
        ("rank", 0),
        ("rank", 2**16),
        ("examples_seen", -1),
        ("examples_seen", 2**48),
        ("updated_at_ms", -5),
        ("fingerprint", ""),
        ("fingerprint", "x" * 257),
        ("last_event_id", "abc"),
        ("last_event_id", "0-0"),
        ("last_event_id", "1-2-3"),
        ("last_event_id", f"{2**48}-0"),
        ("last_event_id", f"1-{2**32}"),
        ("checksum", "sha256:xyz"),
        ("checksum", "md5:" + "0" * 64),
        ("version", True),
    ],
)
def test_records_that_cannot_be_stored_are_refused(field: str, value: object) -> None:
    fields = {**dataclasses.asdict(record(1)), field: value}
    with pytest.raises(InvalidArgument, match=field.split("_")[0]):
        AdapterRecord(**fields)


def test_bucket_bits_are_fixed_per_namespace(redis_client: redis.Redis) -> None:
    Registry(redis_client, namespace="fixed", bucket_bits=16).compare_and_set("t", "u", 0, record(1))
    with pytest.raises(InvalidArgument, match="bucket_bits=16"):
        Registry(redis_client, namespace="fixed", bucket_bits=12).get("t", "u")
    assert Registry(redis_client, namespace="other", bucket_bits=12).get("t", "u") is None


def test_bad_settings_are_refused(valkey_url: str) -> None:
    with pytest.raises(InvalidArgument, match="decode_responses"):
        Registry(redis.Redis.from_url(valkey_url, decode_responses=True))
    with pytest.raises(InvalidArgument, match="namespace"):
        RegistryConfig(namespace="a b")
    with pytest.raises(InvalidArgument, match="bucket_bits"):
        RegistryConfig(bucket_bits=30)


def test_unreachable_server_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    registry = open_registry(RegistryConfig(url=f"redis://127.0.0.1:{port}/0"))
    with pytest.raises(Unavailable, match="unreachable"):
        registry.get("t", "u")


def test_compact_under_200_bytes_per_user(redis_client: redis.Redis) -> None:
    users = 20_000
    registry = Registry(redis_client, namespace="mem")
    registry.get("warm", "up")  # layout check and connection happen before the baseline
    registry.compare_and_set("warm", "up", 0, record(1))
    before = int(redis_client.info("memory")["used_memory"])
    for start in range(0, users, 5000):
        results = registry.compare_and_set_many(
            [CasUpdate("acme", f"user-{i}", 0, record(1, examples_seen=i)) for i in range(start, start + 5000)]
        )
        assert results == [None] * 5000
    used = int(redis_client.info("memory")["used_memory"]) - before
    bucket = next(redis_client.scan_iter(match="mem:a:*"))
    assert redis_client.object("encoding", bucket) == b"listpack"
    assert used / users <= 200, f"{used / users:.1f} bytes per user"
    assert registry.get("acme", "user-123") == record(1, examples_seen=123)


# ---- Redis Cluster: 3 primaries + 3 replicas; pipelines split per node, SCAN visits every primary ----


@pytest.fixture
def cluster_client(valkey_cluster: ValkeyCluster) -> Iterator[redis.cluster.RedisCluster]:
    valkey_cluster.flush()
    client = valkey_cluster.client()
    yield client
    client.close()


def test_registry_on_redis_cluster(cluster_client: redis.cluster.RedisCluster) -> None:
    registry = Registry(cluster_client, namespace="cl")
    registry.compare_and_set("acme", "alice", 0, record(1))
    assert registry.get("acme", "alice") == record(1)
    with pytest.raises(Conflict):
        registry.compare_and_set("acme", "alice", 0, record(2))
    updates = [CasUpdate("acme", f"user{i}", 0, record(1)) for i in range(2500)]
    assert registry.compare_and_set_many(updates) == [None] * 2500
    cluster_client.script_flush()  # a node that lost its scripts (restart, failover)
    updates = [CasUpdate("acme", f"user{i}", 1, record(2)) for i in range(2500)]
    assert registry.compare_and_set_many(updates) == [None] * 2500
    assert registry.count() == 2501
    assert registry.delete("acme", "alice") == record(1)
    fresh = Registry(cluster_client, namespace="cl")
    assert fresh.get("acme", "user7") == record(2)
    shards = {cluster_client.get_node_from_key(key).name for key in cluster_client.scan_iter(match="cl:a:*")}
    assert len(shards) == 3  # the buckets live on every shard


def test_a_cluster_url_opens_a_cluster_client(valkey_cluster: ValkeyCluster) -> None:
    config = RegistryConfig(url=valkey_cluster.url, namespace="curl")
    assert config.cluster
    registry = open_registry(config)
    assert isinstance(registry._client, redis.cluster.RedisCluster)
    registry.compare_and_set("t", "u", 0, record(1))
    assert registry.get("t", "u") == record(1) and registry.count() == 1


def test_open_registry_from_config(valkey_server: EmbeddedValkey, tmp_path: Path) -> None:
    registry = open_registry(RegistryConfig(url=valkey_server.url, namespace="cfg"))
    registry.compare_and_set("t", "u", 0, record(1))
    assert registry.get("t", "u") == record(1)
    assert registry.delete("t", "u") == record(1)
