"""The adapter cache over a real object store (file:// and SeaweedFS S3), a real registry (Valkey) and the
real adapter format on the tiny default model: what the store refuses is never served."""

from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch

from personalize.adapters.cache import AdapterCache, CacheConfig, store_fetch
from personalize.adapters.registry import Registry
from personalize.adapters.repository import AdapterRepository
from personalize.adapters.store import FileStore, ObjectStore, S3Store
from personalize.adapters.store.s3 import CHECKSUM_HEADER
from personalize.errors import CorruptObject, IncompatibleAdapter, NotFound
from personalize.lora.adapter import Adapter
from personalize.lora.format import AdapterSpec, adapter_from_bytes, random_adapter
from personalize.lora.slots import SlotPool
from personalize.model import BaseModel
from tests.helpers import holds

T = "acme"
R_MAX = 8


@pytest.fixture(scope="module")
def spec(base: BaseModel) -> AdapterSpec:
    return AdapterSpec.for_model(base, r_max=R_MAX)


@pytest.fixture
def registry(redis_client: redis.Redis) -> Registry:
    return Registry(redis_client, namespace="pz")


@pytest.fixture
def cache(base: BaseModel, spec: AdapterSpec, store: ObjectStore, registry: Registry,
          tmp_path: Path) -> Iterator[AdapterCache]:
    pool = SlotPool(base.config, 4, R_MAX)
    config = CacheConfig(host_bytes=1 << 24, disk_bytes=1 << 24, disk_dir=str(tmp_path / "disk"), load_threads=2)
    with AdapterCache(config, pool, threading.Lock(), store_fetch(store, registry),
                      lambda data: adapter_from_bytes(data, spec)) as c:
        yield c


def publish(store: ObjectStore, registry: Registry, spec: AdapterSpec, user_id: str, seed: int,
            fingerprint: str = "") -> tuple[Adapter, str]:
    """Publish the user's next version the way the worker and trainer do (object, then registry CAS),
    by a node serving the base model `fingerprint` (default: ours). Returns the adapter and object key."""
    written_spec = dataclasses.replace(spec, base_fingerprint=fingerprint or spec.base_fingerprint)
    adapter = random_adapter(written_spec, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(seed))
    published = AdapterRepository(registry, store, written_spec).publish(
        T, user_id, adapter, registry.get(T, user_id), examples_seen=0)
    return adapter, published.key


def corrupt_behind_the_back(store: ObjectStore, key: str, data: bytes, request: pytest.FixtureRequest) -> None:
    """Replace the stored bytes of `key` without going through the store (a silent bit flip)."""
    if isinstance(store, FileStore):
        (store.root / key).write_bytes(data)
    else:
        assert isinstance(store, S3Store)
        raw = request.getfixturevalue("s3_server").client()
        name = store.config.prefix + key
        stale = raw.stat_object(store.config.bucket, name).metadata[CHECKSUM_HEADER]
        raw.put_object(store.config.bucket, name, io.BytesIO(data), len(data), metadata={CHECKSUM_HEADER: stale})



def served_anywhere(cache: AdapterCache, adapter: Adapter) -> bool:
    return any(holds(cache.pool, slot, adapter) for slot in range(cache.pool.num_slots))


def test_loads_through_every_tier(cache: AdapterCache, store: ObjectStore, registry: Registry,
                                  spec: AdapterSpec) -> None:
    adapter, _ = publish(store, registry, spec, "alice", seed=1)
    lease = cache.acquire(T, "alice", 1, timeout=30)
    assert lease.tier == "store" and holds(cache.pool, lease.slot, adapter)
    cache.release(lease)
    assert cache.stats()["resident"] == {"device": 1, "host": 1, "disk": 1}
    cache.invalidate(T, "alice")
    assert cache.stats()["resident"] == {"device": 0, "host": 0, "disk": 0}
    assert not [p for p in Path(cache.config.disk_dir).rglob("*") if p.is_file()]


def test_a_corrupted_object_is_never_served(cache: AdapterCache, store: ObjectStore, registry: Registry,
                                            spec: AdapterSpec, request: pytest.FixtureRequest) -> None:
    adapter, key = publish(store, registry, spec, "alice", seed=2)
    flipped = bytearray(store.get(key))
    flipped[-100] ^= 0x01  # one bit in the tensor data: still parses, so only the checksum can tell
    corrupt_behind_the_back(store, key, bytes(flipped), request)
    for _ in range(2):  # refused every time: the failure is not cached, and neither is the object
        with pytest.raises(CorruptObject, match="corrupt"):
            cache.acquire(T, "alice", 1, timeout=30)
    assert not served_anywhere(cache, adapter)
    assert cache.stats()["resident"] == {"device": 0, "host": 0, "disk": 0}
    assert not [p for p in Path(cache.config.disk_dir).rglob("*") if p.is_file()]


def test_an_adapter_of_another_base_model_is_refused(cache: AdapterCache, store: ObjectStore,
                                                     registry: Registry, spec: AdapterSpec) -> None:
    assert spec.base_fingerprint.startswith("sha256:")
    foreign, _ = publish(store, registry, spec, "mallory", seed=3, fingerprint="sha256:" + "0f" * 32)
    with pytest.raises(IncompatibleAdapter, match="trained on base model"):
        cache.acquire(T, "mallory", 1, timeout=30)
    assert not served_anywhere(cache, foreign)
    assert cache.stats()["resident"] == {"device": 0, "host": 0, "disk": 0}


def test_hot_swap_to_a_published_version(cache: AdapterCache, store: ObjectStore, registry: Registry,
                                         spec: AdapterSpec) -> None:
    v1, _ = publish(store, registry, spec, "alice", seed=4)
    old = cache.acquire(T, "alice", 1, timeout=30)
    v2, _ = publish(store, registry, spec, "alice", seed=5)
    new = cache.acquire(T, "alice", 2, timeout=30)
    assert new.slot != old.slot and holds(cache.pool, new.slot, v2) and holds(cache.pool, old.slot, v1)
    assert cache.latest_version(T, "alice") == 2
    cache.release(old)
    cache.release(new)
    assert cache.stats()["resident"]["device"] == 1
    late = cache.acquire(T, "alice", 1, timeout=30)  # a request that looked up v1 before the flip
    assert late.tier == "host" and holds(cache.pool, late.slot, v1)
    cache.release(late)
    assert cache.stats()["resident"]["device"] == 1  # superseded: freed at once
    with pytest.raises(NotFound, match="not current"):  # from the store, v1 is unverifiable now
        store_fetch(store, registry)(T, "alice", 1, "")
