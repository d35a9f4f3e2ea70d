"""The tiered adapter cache: LRU and pinning, single-flight loads, hot swap, tiers, budgets, invalidation.

`fetch` and `parse` are plain functions over an in-memory dict (they are the cache's whole contract with
the store and the format); the slot pool, the threads and the disk tier are real.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from personalize.adapters.cache import AdapterCache, CacheConfig, Lease, slots_for_budget
from personalize.adapters.lru import EVICTABLE, FREED, KEPT, ByteLRU, SlotTable
from personalize.adapters.store.keys import user_digest
from personalize.errors import (
    CorruptObject,
    DeadlineExceeded,
    IncompatibleAdapter,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from personalize.lora.adapter import TARGET_MODULES, Adapter
from personalize.lora.slots import SlotPool, slot_nbytes
from personalize.model import default_llama_config
from tests.helpers import holds, make_adapter

CFG = default_llama_config()
R_MAX = 8
OBJECT_BYTES = 1000  # size of every fake store object (the disk tier's unit)
T = "acme"


class FakeStore:
    """Adapters by (tenant, user_id, version); objects are `b"tenant|user|version"` padded with zeros."""

    def __init__(self) -> None:
        self.adapters: dict[tuple[str, str, int], Adapter] = {}
        self.calls: Counter[tuple[str, str, int]] = Counter()
        self.gate = threading.Event()
        self.gate.set()
        self.errors: dict[tuple[str, str, int], Exception] = {}
        self.refuse: set[tuple[str, str, int]] = set()  # parse raises IncompatibleAdapter
        self._lock = threading.Lock()

    def add(self, user_id: str, version: int = 1, seed: int | None = None, rank: int = 4) -> Adapter:
        adapter = make_adapter(CFG, rank, seed if seed is not None else zlib.crc32(f"{user_id}/{version}".encode()))
        self.adapters[(T, user_id, version)] = adapter
        return adapter

    def fetch(self, tenant: str, user_id: str, version: int, checksum: str) -> bytes:
        key = (tenant, user_id, version)
        with self._lock:
            self.calls[key] += 1
        self.gate.wait(10)
        if key in self.errors:
            raise self.errors[key]
        if key not in self.adapters:
            raise NotFound(f"no object for {key}")
        return f"{tenant}|{user_id}|{version}".encode().ljust(OBJECT_BYTES, b"\0")

    def parse(self, data: bytes) -> Adapter:
        tenant, user_id, version = data.rstrip(b"\0").decode().split("|")
        key = (tenant, user_id, int(version))
        if key in self.refuse:
            raise IncompatibleAdapter(f"{key} was trained on another base model")
        return self.adapters[key]


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


def make_cache(
    store: FakeStore,
    slots: int = 4,
    tmp: Path | None = None,
    host: int = 1 << 30,
    disk: int = 1 << 30,
    tenant_slots: int = 0,
) -> AdapterCache:
    pool = SlotPool(CFG, slots, R_MAX)
    config = CacheConfig(
        host_bytes=host,
        disk_bytes=disk,
        disk_dir=str(tmp) if tmp else "",
        load_threads=2,
        max_tenant_slots=tenant_slots,
    )
    return AdapterCache(config, pool, threading.Lock(), store.fetch, store.parse)


@pytest.fixture
def cache(store: FakeStore) -> Iterator[AdapterCache]:
    c = make_cache(store)
    yield c
    c.close()


def use(cache: AdapterCache, user_id: str, version: int = 1) -> Lease:
    """Acquire and release at once; the lease says where the adapter was found."""
    lease = cache.acquire(T, user_id, version, timeout=5)
    cache.release(lease)
    return lease


# -- pure bookkeeping ------------------------------------------------------------------------------------


def test_byte_lru_evicts_least_recently_used_within_budget() -> None:
    lru: ByteLRU[str, int] = ByteLRU(10)
    assert lru.put("a", 1, 4) == [] and lru.put("b", 2, 4) == []
    assert lru.get("a") == 1  # b is now the oldest
    assert lru.put("c", 3, 4) == [("b", 2)]
    assert lru.keys() == ["a", "c"] and lru.nbytes == 8
    assert lru.put("huge", 4, 11) == [("huge", 4)] and "huge" not in lru
    assert lru.put("a", 5, 7) == [("c", 3)] and lru.nbytes == 7  # replacing resizes


def test_slot_table_never_hands_out_a_pinned_slot() -> None:
    table: SlotTable[str] = SlotTable(3)
    for key in "abc":
        reserved = table.reserve()
        assert reserved is not None and reserved[1] is None  # free slots first
        table.assign(reserved[0], key, pins=1)
    assert table.reserve() is None  # all pinned
    assert table.unpin(table.by_key["b"], "b") == EVICTABLE
    assert table.reserve() == (1, "b") and "b" not in table.by_key
    table.pin(table.by_key["a"])
    assert table.unpin(table.by_key["a"], "a") == KEPT
    assert not table.retire(table.by_key["a"], unmap=False)  # pinned: freed on its last release
    assert table.unpin(table.by_key["a"], "a") == FREED and "a" not in table.by_key
    c = table.by_key["c"]
    assert table.unpin(c, "c") == EVICTABLE
    with pytest.raises(InvalidArgument, match="already released"):
        table.unpin(c, "c")


@pytest.mark.parametrize("r_max,targets", [(8, TARGET_MODULES), (16, ("q_proj", "v_proj")), (4, ("down_proj",))])
def test_slot_nbytes_matches_the_pool(r_max: int, targets: tuple[str, ...]) -> None:
    pool = SlotPool(CFG, 2, r_max, targets)
    assert slot_nbytes(CFG, r_max, targets) == pool.slot_nbytes
    assert slots_for_budget(10 * pool.slot_nbytes + 1, pool.slot_nbytes) == 10
    with pytest.raises(InvalidArgument, match="holds no adapter slot"):
        slots_for_budget(pool.slot_nbytes - 1, pool.slot_nbytes)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(host_bytes=-1),
        dict(disk_bytes=-1),
        dict(load_threads=0),
        dict(wait_timeout_s=0),
        dict(disk_dir="relative/dir"),
    ],
)
def test_config_checks(kwargs: dict) -> None:
    with pytest.raises(InvalidArgument):
        CacheConfig(**kwargs)


# -- device slots: LRU and pinning -------------------------------------------------------------------------


def test_first_acquire_loads_then_hits_the_same_slot(cache: AdapterCache, store: FakeStore) -> None:
    adapter = store.add("alice")
    first = use(cache, "alice")
    assert first.tier == "store" and first.version == 1
    assert holds(cache.pool, first.slot, adapter)
    second = use(cache, "alice")
    assert (second.tier, second.slot) == ("device", first.slot)
    assert store.calls[(T, "alice", 1)] == 1
    assert cache.stats()["hits"]["device"] == 1 and cache.stats()["misses"]["device"] == 1


def test_eviction_is_least_recently_used(store: FakeStore) -> None:
    for user in "abcd":
        store.add(user)
    with make_cache(store, slots=3) as cache:
        for user in "abc":
            use(cache, user)
        use(cache, "a")  # b is now the least recently used
        assert use(cache, "d").tier == "store"
        assert [use(cache, u).tier for u in "acd"] == ["device"] * 3
        assert use(cache, "b").tier == "host"


def test_eviction_never_touches_a_pinned_slot(store: FakeStore) -> None:
    adapters = {u: store.add(u) for u in "abcdefg"}
    with make_cache(store, slots=4) as cache:
        held = {u: cache.acquire(T, u, 1) for u in "ab"}
        for u in "cd":
            use(cache, u)
        for u in "ef":  # must evict c and d, never a or b
            held[u] = cache.acquire(T, u, 1)
        for u, lease in held.items():
            assert holds(cache.pool, lease.slot, adapters[u])
        cache.release(held.pop("e"))
        cache.release(held.pop("f"))
        assert use(cache, "a").tier == "device" and use(cache, "b").tier == "device"
        assert use(cache, "c").tier == "host"  # it was evicted (now e is)
        held.update({u: cache.acquire(T, u, 1) for u in "cd"})  # now every slot is pinned
        start = time.monotonic()
        with pytest.raises(ResourceExhausted, match="all 4 device adapter slots are pinned"):
            cache.acquire(T, "g", 1, timeout=0.2)
        assert time.monotonic() - start >= 0.2
        for u, lease in held.items():
            assert holds(cache.pool, lease.slot, adapters[u])


def test_a_miss_waits_for_a_slot_to_be_released(store: FakeStore) -> None:
    for user in "abc":
        store.add(user)
    with make_cache(store, slots=2) as cache:
        held = [cache.acquire(T, u, 1) for u in "ab"]
        threading.Timer(0.1, cache.release, args=(held[0],)).start()
        lease = cache.acquire(T, "c", 1, timeout=5)
        assert lease.slot == held[0].slot and lease.tier == "store"


def test_one_tenant_never_holds_more_than_its_slot_cap(store: FakeStore) -> None:
    """acme pins its cap (2 of 4 slots) with many users: its next miss waits and is refused naming the
    limit; another tenant still gets a slot at once; a release of acme's own lets its waiting miss in."""
    for user in "abcd":
        store.add(user)
    store.adapters[("globex", "x", 1)] = store.adapters[(T, "a", 1)]
    with make_cache(store, slots=4, tenant_slots=2) as cache:
        held = [cache.acquire(T, u, 1, timeout=5) for u in "ab"]
        with pytest.raises(ResourceExhausted, match=r"tenant 'acme' holds 2 .* the limit is 2 \(max_tenant_slots"):
            cache.acquire(T, "c", 1, timeout=0.2)
        other = cache.acquire("globex", "x", 1, timeout=5)
        assert other.tier == "store" and other.slot not in {lease.slot for lease in held}
        assert cache.acquire(T, "a", 1, timeout=5).tier == "device"  # a device hit takes no new slot: never capped
        threading.Timer(0.1, cache.release, args=(held[1],)).start()
        assert cache.acquire(T, "c", 1, timeout=5).tier == "store"


def test_releasing_twice_is_refused(cache: AdapterCache, store: FakeStore) -> None:
    store.add("alice")
    lease = cache.acquire(T, "alice", 1)
    cache.release(lease)
    with pytest.raises(InvalidArgument, match="already released"):
        cache.release(lease)


# -- single flight and failed loads ------------------------------------------------------------------------


def _acquire_concurrently(cache: AdapterCache, store: FakeStore, user: str, n: int) -> list[Lease | Exception]:
    """n threads acquire one user's adapter while its fetch is held back until all of them wait."""
    results: list[Lease | Exception] = []
    lock = threading.Lock()
    store.gate.clear()

    def worker() -> None:
        try:
            out: Lease | Exception = cache.acquire(T, user, 1, timeout=10)
        except Exception as exc:
            out = exc
        with lock:
            results.append(out)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while cache.stats()["misses"]["device"] < n and time.monotonic() < deadline:
        time.sleep(0.005)
    store.gate.set()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_misses_share_one_fetch(cache: AdapterCache, store: FakeStore) -> None:
    adapter = store.add("alice")
    leases = _acquire_concurrently(cache, store, "alice", 50)
    assert store.calls[(T, "alice", 1)] == 1
    assert all(isinstance(lease, Lease) for lease in leases) and len(leases) == 50
    slots = {lease.slot for lease in leases if isinstance(lease, Lease)}
    assert len(slots) == 1 and holds(cache.pool, slots.pop(), adapter)
    assert {lease.tier for lease in leases if isinstance(lease, Lease)} == {"store"}
    for lease in leases:
        assert isinstance(lease, Lease)
        cache.release(lease)
    with pytest.raises(InvalidArgument):  # exactly 50 pins were handed out
        cache.release(leases[0])  # type: ignore[arg-type]


@pytest.mark.parametrize("failure", ["corrupt", "missing", "incompatible"])
def test_a_failed_load_reaches_every_waiter_and_caches_nothing(
    cache: AdapterCache, store: FakeStore, failure: str
) -> None:
    key = (T, "alice", 1)
    store.add("alice")
    expected: type[Exception] = {"corrupt": CorruptObject, "missing": NotFound, "incompatible": IncompatibleAdapter}[
        failure
    ]
    if failure == "corrupt":
        store.errors[key] = CorruptObject("object is corrupt: checksum mismatch")
    elif failure == "missing":
        del store.adapters[key]
    else:
        store.refuse.add(key)
    results = _acquire_concurrently(cache, store, "alice", 20)
    assert store.calls[key] == 1
    assert len(results) == 20 and all(isinstance(r, expected) for r in results)
    stats = cache.stats()
    assert stats["resident"] == {"device": 0, "host": 0, "disk": 0}
    assert cache.latest_version(T, "alice") is None
    store.errors.clear()
    store.refuse.clear()
    store.add("alice")
    assert use(cache, "alice").tier == "store"  # the next acquire retries
    assert store.calls[key] == 2


def test_a_timed_out_waiter_leaks_no_pin(store: FakeStore) -> None:
    for user in "ab":
        store.add(user)
    with make_cache(store, slots=1) as cache:
        store.gate.clear()
        with pytest.raises(DeadlineExceeded):
            cache.acquire(T, "a", 1, timeout=0.1)
        store.gate.set()
        cache.prefetch(T, "a", 1).result(5)  # the load in flight lands, with no waiter left
        assert use(cache, "b").tier == "store"  # a's slot was evictable: no pin left behind


# -- hot swap ---------------------------------------------------------------------------------------------


def test_hot_swap_keeps_the_old_slot_until_its_last_lease(cache: AdapterCache, store: FakeStore) -> None:
    v1, v2 = store.add("alice", 1, seed=1), store.add("alice", 2, seed=2)
    old = cache.acquire(T, "alice", 1)
    assert cache.latest_version(T, "alice") == 1
    new = cache.acquire(T, "alice", 2)
    assert new.slot != old.slot and new.tier == "store"
    assert cache.latest_version(T, "alice") == 2
    assert holds(cache.pool, old.slot, v1) and holds(cache.pool, new.slot, v2)
    late = cache.acquire(T, "alice", 1)  # a request that looked up v1 just before the flip
    assert late.slot == old.slot and late.tier == "device"
    cache.release(old)
    assert cache.stats()["resident"]["device"] == 2 and holds(cache.pool, old.slot, v1)
    cache.release(late)
    assert cache.stats()["resident"]["device"] == 1  # freed on its last release, before any LRU victim
    store.add("bob")
    assert cache.acquire(T, "bob", 1).slot == old.slot
    assert use(cache, "alice", 2).tier == "device"


def test_an_unpinned_old_version_is_freed_at_the_flip(cache: AdapterCache, store: FakeStore) -> None:
    store.add("alice", 1)
    store.add("alice", 2)
    use(cache, "alice", 1)
    use(cache, "alice", 2)
    assert cache.stats()["resident"]["device"] == 1
    assert use(cache, "alice", 1).tier == "host"  # v1 left the device, not the host tier


# -- tiers, budgets, promotion ------------------------------------------------------------------------------


def test_each_acquire_reports_the_tier_it_found(store: FakeStore, tmp_path: Path) -> None:
    adapters = {u: store.add(u) for u in "abc"}
    host = int(2.5 * adapters["a"].nbytes)  # two adapters fit in host RAM
    with make_cache(store, slots=1, tmp=tmp_path, host=host) as cache:
        assert use(cache, "a").tier == "store"
        assert use(cache, "b").tier == "store"  # a leaves the device, stays in host RAM
        assert use(cache, "a").tier == "host"
        assert use(cache, "c").tier == "store"  # b leaves host RAM (a was used later), stays on disk
        lease = use(cache, "b")
        assert lease.tier == "disk" and holds(cache.pool, lease.slot, adapters["b"])
        assert use(cache, "b").tier == "device"
        stats = cache.stats()
        assert stats["hits"] == {"device": 1, "host": 1, "disk": 1, "store": 3}
        assert stats["misses"]["device"] == 5
        assert sum(store.calls.values()) == 3
        assert {tier for tier, seconds in cache.take_load_samples()} == {"store", "host", "disk"}


def test_byte_budgets_hold_per_tier(store: FakeStore, tmp_path: Path) -> None:
    users = [f"u{i}" for i in range(6)]
    sizes = {store.add(u).nbytes for u in users}
    assert len(sizes) == 1
    nbytes = sizes.pop()
    host, disk = int(2.5 * nbytes), 3 * OBJECT_BYTES
    with make_cache(store, slots=2, tmp=tmp_path, host=host, disk=disk) as cache:
        for u in users:
            use(cache, u)
            stats = cache.stats()
            assert stats["bytes"]["host"] <= host and stats["bytes"]["disk"] <= disk
        assert stats["resident"] == {"device": 2, "host": 2, "disk": 3}
        assert stats["bytes"] == {"device": 2 * cache.pool.slot_nbytes, "host": 2 * nbytes, "disk": 3 * OBJECT_BYTES}
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert len(files) == 3 and sum(p.stat().st_size for p in files) <= disk
        assert all("u" not in p.name for p in files)  # named by a hash, never by a user id
        assert [use(cache, u).tier for u in users[:3]] == ["store", "store", "store"]


def test_an_object_over_the_disk_budget_is_not_written(store: FakeStore, tmp_path: Path) -> None:
    store.add("alice")
    with make_cache(store, tmp=tmp_path, disk=OBJECT_BYTES - 1) as cache:
        use(cache, "alice")
        assert cache.stats()["resident"]["disk"] == 0
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_damaged_disk_file_falls_back_to_the_store(store: FakeStore, tmp_path: Path) -> None:
    adapter = store.add("a")
    store.add("b")
    garbage = b"\xff not an adapter"
    a_file = tmp_path / user_digest(T, "a")[:16].hex() / "v000000000001.adapter"
    with make_cache(store, slots=1, tmp=tmp_path, host=0) as cache:
        use(cache, "a")
        use(cache, "b")  # a is now only on disk
        a_file.write_bytes(garbage)
        lease = use(cache, "a")
        assert lease.tier == "store" and holds(cache.pool, lease.slot, adapter)
        assert a_file.read_bytes() != garbage  # rewritten from the store
        assert cache.stats()["hits"]["disk"] == 0


def test_a_disk_file_that_parses_as_another_adapter_is_not_served(store: FakeStore, tmp_path: Path) -> None:
    adapter = store.add("a")
    store.add("b")
    a_file = tmp_path / user_digest(T, "a")[:16].hex() / "v000000000001.adapter"
    with make_cache(store, slots=1, tmp=tmp_path, host=0) as cache:
        use(cache, "a")
        use(cache, "b")  # a is now only on disk
        a_file.write_bytes(store.fetch(T, "b", 1, ""))  # valid bytes, of another adapter
        lease = use(cache, "a")
        assert lease.tier == "store" and holds(cache.pool, lease.slot, adapter)
        assert store.calls[(T, "a", 1)] == 2 and cache.stats()["hits"]["disk"] == 0


def test_disk_tier_starts_empty_but_spares_foreign_files(store: FakeStore, tmp_path: Path) -> None:
    store.add("alice")
    with make_cache(store, tmp=tmp_path) as cache:
        use(cache, "alice")
    (tmp_path / "notes.txt").write_text("not ours")
    with make_cache(store, tmp=tmp_path) as cache:
        assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["notes.txt"]
        assert use(cache, "alice").tier == "store"


# -- invalidation and prefetch --------------------------------------------------------------------------------


def test_invalidate_drops_every_copy(store: FakeStore, tmp_path: Path) -> None:
    for version in (1, 2):
        store.add("alice", version)
    store.add("bob")
    with make_cache(store, tmp=tmp_path) as cache:
        use(cache, "alice", 1)
        pinned = cache.acquire(T, "alice", 2)
        use(cache, "bob")
        assert len([p for p in tmp_path.rglob("*") if p.is_file()]) == 3
        cache.invalidate(T, "alice")
        assert cache.latest_version(T, "alice") is None
        stats = cache.stats()
        assert stats["resident"]["host"] == 1 and stats["resident"]["disk"] == 1  # bob's
        bob_files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert len(bob_files) == 1
        assert holds(cache.pool, pinned.slot, store.adapters[(T, "alice", 2)])  # in use: kept until released
        assert use(cache, "alice", 2).tier == "store"  # but never served again
        cache.release(pinned)
        assert cache.stats()["resident"]["device"] == 2  # alice v2 (reloaded) and bob
        cache.invalidate(T, "alice")
        assert [p for p in tmp_path.rglob("*") if p.is_file()] == bob_files
        assert cache.latest_version(T, "bob") == 1
        assert use(cache, "bob").tier == "device"


def test_invalidate_during_a_load_fails_its_waiters(cache: AdapterCache, store: FakeStore) -> None:
    store.add("alice")
    store.gate.clear()
    errors: list[Exception] = []

    def waiter() -> None:
        try:
            cache.acquire(T, "alice", 1, timeout=5)
        except Exception as exc:
            errors.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    while cache.stats()["misses"]["device"] < 1:
        time.sleep(0.005)
    cache.invalidate(T, "alice")
    store.gate.set()
    thread.join(5)
    assert len(errors) == 1 and isinstance(errors[0], NotFound)
    assert cache.stats()["resident"] == {"device": 0, "host": 0, "disk": 0}


def test_prefetch_makes_the_next_acquire_a_device_hit(cache: AdapterCache, store: FakeStore) -> None:
    adapter = store.add("alice")
    slot = cache.prefetch(T, "alice", 1).result(5)
    assert holds(cache.pool, slot, adapter)
    lease = use(cache, "alice")
    assert (lease.tier, lease.slot) == ("device", slot)
    assert cache.prefetch(T, "alice", 1).result(5) == slot
    assert isinstance(cache.prefetch(T, "nobody", 1).exception(5), NotFound)


def test_prefetch_with_every_slot_pinned_fails_fast(store: FakeStore) -> None:
    for user in "ab":
        store.add(user)
    with make_cache(store, slots=1) as cache:
        lease = cache.acquire(T, "a", 1)
        assert isinstance(cache.prefetch(T, "b", 1).exception(1), ResourceExhausted)
        cache.release(lease)


@pytest.mark.parametrize("version", [0, -1, True, "1"])
def test_bad_versions_are_refused(cache: AdapterCache, version: object) -> None:
    with pytest.raises(InvalidArgument):
        cache.acquire(T, "alice", version)  # type: ignore[arg-type]
