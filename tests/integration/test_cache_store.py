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
from personalize.adapters.store.base import checksum_of
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
def cache(
    base: BaseModel, spec: AdapterSpec, store: ObjectStore, registry: Registry, tmp_path: Path
) -> Iterator[AdapterCache]:
    pool = SlotPool(base.config, 4, R_MAX)
    config = CacheConfig(host_bytes=1 << 24, disk_bytes=1 << 24, disk_dir=str(tmp_path / "disk"), load_threads=2)
    with AdapterCache(
        config, pool, threading.Lock(), store_fetch(store, registry), lambda data: adapter_from_bytes(data, spec)
    ) as c:
        yield c


def publish(
    store: ObjectStore, registry: Registry, spec: AdapterSpec, user_id: str, seed: int, fingerprint: str = ""
) -> tuple[Adapter, str]:
    """Publish the user's next version the way the worker and trainer do (object, then registry CAS),
    by a node serving the base model `fingerprint` (default: ours). Returns the adapter and object key."""
    written_spec = dataclasses.replace(spec, base_fingerprint=fingerprint or spec.base_fingerprint)
    adapter = random_adapter(written_spec, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(seed))
    published = AdapterRepository(registry, store, written_spec).publish(
        T, user_id, adapter, registry.get(T, user_id), examples_seen=0
    )
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


def test_loads_through_every_tier(
    cache: AdapterCache, store: ObjectStore, registry: Registry, spec: AdapterSpec
) -> None:
    adapter, _ = publish(store, registry, spec, "alice", seed=1)
    lease = cache.acquire(T, "alice", 1, timeout=30)
    assert lease.tier == "store" and holds(cache.pool, lease.slot, adapter)
    cache.release(lease)
    assert cache.stats()["resident"] == {"device": 1, "host": 1, "disk": 1}
    cache.invalidate(T, "alice")
    assert cache.stats()["resident"] == {"device": 0, "host": 0, "disk": 0}
    assert not [p for p in Path(cache.config.disk_dir).rglob("*") if p.is_file()]


def test_a_corrupted_object_is_never_served(
    cache: AdapterCache, store: ObjectStore, registry: Registry, spec: AdapterSpec, request: pytest.FixtureRequest
) -> None:
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


def test_an_adapter_of_another_base_model_is_refused(
    cache: AdapterCache, store: ObjectStore, registry: Registry, spec: AdapterSpec
) -> None:
    assert spec.base_fingerprint.startswith("sha256:")
    foreign, _ = publish(store, registry, spec, "mallory", seed=3, fingerprint="sha256:" + "0f" * 32)
    with pytest.raises(IncompatibleAdapter, match="trained on base model"):
        cache.acquire(T, "mallory", 1, timeout=30)
    assert not served_anywhere(cache, foreign)
    assert cache.stats()["resident"] == {"device": 0, "host": 0, "disk": 0}


def test_hot_swap_to_a_published_version(
    cache: AdapterCache, store: ObjectStore, registry: Registry, spec: AdapterSpec
) -> None:
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


def flip_exponents(data: bytes, every: int = 16) -> bytes:
    """`data` (float32 safetensors) with the exponent byte of every `every`-th float altered: still parses."""
    start = 8 + int.from_bytes(data[:8], "little")  # tensor data follows the header, 8-byte aligned
    flipped = bytearray(data)
    for offset in range(start + 3, len(flipped), 4 * every):  # byte 3 of a little-endian float32: sign, exponent
        flipped[offset] ^= 0x01  # scales the float by 4 or 1/4: finite, so only a checksum can tell
    return bytes(flipped)


def same_weights(x: Adapter, y: Adapter) -> bool:
    return x.weights.keys() == y.weights.keys() and all(
        torch.equal(x.weights[k][0], y.weights[k][0]) and torch.equal(x.weights[k][1], y.weights[k][1])
        for k in x.weights
    )


def test_a_disk_file_changed_behind_the_cache_is_never_served(
    base: BaseModel, spec: AdapterSpec, store: ObjectStore, registry: Registry, tmp_path: Path
) -> None:
    pool = SlotPool(base.config, 1, R_MAX)
    config = CacheConfig(host_bytes=0, disk_bytes=1 << 24, disk_dir=str(tmp_path / "disk"), load_threads=1)
    users = [f"user{i}" for i in range(4)]
    adapters = {u: publish(store, registry, spec, u, seed=10 + i)[0] for i, u in enumerate(users)}
    checksums = {u: registry.get(T, u).checksum for u in users}

    def acquire(cache: AdapterCache, user_id: str) -> tuple[str, bool]:
        lease = cache.acquire(T, user_id, 1, timeout=30, checksum=checksums[user_id])
        try:
            return lease.tier, holds(cache.pool, lease.slot, adapters[user_id])
        finally:
            cache.release(lease)

    with AdapterCache(
        config, pool, threading.Lock(), store_fetch(store, registry), lambda data: adapter_from_bytes(data, spec)
    ) as cache:
        for u in users:  # one slot and no host tier: every user but the last is now only on disk
            assert acquire(cache, u) == ("store", True)
        files = sorted(Path(config.disk_dir).rglob("*.adapter"))
        assert len(files) == len(users)
        for file in files:
            flipped = flip_exponents(file.read_bytes())
            parsed = adapter_from_bytes(flipped, spec)  # the parser accepts it: another valid adapter
            assert not any(same_weights(parsed, adapter) for adapter in adapters.values())
            file.write_bytes(flipped)
        before = cache.stats()
        assert [acquire(cache, u) for u in users[:-1]] == [("store", True)] * (len(users) - 1)
        after = cache.stats()
        assert after["hits"]["disk"] == before["hits"]["disk"] == 0
        assert after["misses"]["disk"] - before["misses"]["disk"] == len(users) - 1
        rewritten = {checksum_of(p.read_bytes()) for p in Path(config.disk_dir).rglob("*.adapter")}
        assert rewritten >= {checksums[u] for u in users[:-1]}  # dropped, then written again from the store
        assert acquire(cache, users[0]) == ("disk", True)  # a rewritten file is trusted again
