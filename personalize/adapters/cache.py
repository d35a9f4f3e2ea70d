"""The tiered adapter cache: device slots <- host RAM <- local disk <- object store.

`acquire(tenant, user_id, version, checksum=...)` returns a `Lease` on the device slot holding that
adapter; a device hit is a dict lookup and a pin. Every tier keys an adapter by (tenant, user_id, version,
checksum): after DeleteUser a user's versions restart at 1, so the version alone could name an old,
deleted object on a node that missed the delete; the checksum names the object itself (old entries age
out by LRU). A miss reserves a slot (evicting the least recently used unpinned one),
and one load per key runs on a small thread pool: host RAM (parsed adapters), else the disk tier (object
bytes in files named by a hash of the user, never by a user id), else `fetch` from the object store; the
bytes are validated by `parse`, written into the slot, then promoted to the faster tiers. A disk file is
served only when it hashes to the SHA-256 of the verified bytes written there (kept in memory, never read
from the disk): a file changed behind the cache's back, even one that still parses, is dropped and the
object fetched again. Host RAM holds only adapters parsed from verified bytes. Every waiter of
that key gets the slot, or the load's error; a failed load caches nothing.

Locking: `_lock` guards all bookkeeping (slot table, host and disk LRUs, per-user index, loads in flight,
counters) and is never held during fetch, parse, file reads or tensor copies. The engine's `pool_lock`
guards the slot tensors: the cache holds it only around `pool.set_slot`, never together with `_lock`.
Disk renames and unlinks run under `_lock`, so an invalidation can never race a file into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

from personalize.adapters.lru import FREED, ByteLRU, SlotTable
from personalize.adapters.store.base import checksum_of
from personalize.adapters.store.keys import adapter_key, user_digest
from personalize.errors import (
    CorruptObject,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from personalize.lora.adapter import Adapter
from personalize.lora.slots import SlotPool
from personalize.lora.slots import slot_nbytes as slot_nbytes  # moved to slots.py; still importable here

if TYPE_CHECKING:
    from personalize.adapters.registry import Registry
    from personalize.adapters.store.base import ObjectStore

log = logging.getLogger(__name__)

DEVICE, HOST, DISK, STORE = "device", "host", "disk", "store"
TIERS = (DEVICE, HOST, DISK, STORE)
"""Tier names, fastest first."""


class Key(NamedTuple):
    """What every tier keys an adapter by. The checksum (AdapterRecord.checksum, "" = unknown) tells apart
    two objects with one version number (a user deleted and created again)."""

    tenant: str
    user_id: str
    version: int
    checksum: str


Fetch = Callable[[str, str, int, str], bytes]
"""(tenant, user_id, version, checksum) -> verified object bytes; raises NotFound, CorruptObject, Unavailable."""
Parse = Callable[[bytes], Adapter]
"""Object bytes -> validated adapter; raises AdapterError / IncompatibleAdapter."""

_BITS = {DEVICE: 1, HOST: 2, DISK: 4}  # which tiers hold a (version, checksum), in the per-user index
_LOADING, _DONE, _FAILED = 0, 1, 2


class CacheStats(TypedDict):
    """`AdapterCache.stats()`: each field maps a tier name (DEVICE, HOST, DISK; STORE in hits/misses) to a count."""

    resident: dict[str, int]
    """Adapters held per tier."""
    bytes: dict[str, int]
    """Bytes held per tier (device: occupied slots times the slot size)."""
    hits: dict[str, int]
    misses: dict[str, int]
    evictions: dict[str, int]
    """Adapters pushed out of each tier to make room."""
    slots: dict[str, int]
    """Device slots in all ({DEVICE: n})."""


@dataclass(frozen=True)
class CacheConfig:
    """Budgets of the host and disk tiers (device capacity is the SlotPool's num_slots)."""

    host_bytes: int = 1 << 30
    """Most bytes of parsed adapters kept in host RAM (0 = no host tier)."""
    disk_bytes: int = 10 << 30
    """Most bytes of adapter objects kept in `disk_dir`."""
    disk_dir: str = ""
    """Directory of the disk tier, emptied of earlier files at start; "" = no disk tier."""
    load_threads: int = 4
    """Threads loading adapters (fetch, parse, copy into a slot) off the engine thread."""
    wait_timeout_s: float = 30.0
    """How long an acquire waits for a load or a free slot when it passes no timeout."""
    max_tenant_slots: int = 0
    """Most device slots one tenant may hold pinned or loading at once (0 = no cap): a tenant at it waits, as
    for a free slot, until one of its own is released, so one tenant's many users never hold every slot."""

    def __post_init__(self) -> None:
        if self.host_bytes < 0 or self.disk_bytes < 0:
            raise InvalidArgument(
                f"cache budgets must be >= 0 bytes, got host_bytes={self.host_bytes}, disk_bytes={self.disk_bytes}"
            )
        if self.load_threads < 1:
            raise InvalidArgument(f"load_threads must be >= 1, got {self.load_threads}")
        if self.max_tenant_slots < 0:
            raise InvalidArgument(f"max_tenant_slots must be >= 0 (0 = no cap), got {self.max_tenant_slots}")
        if not self.wait_timeout_s > 0:
            raise InvalidArgument(f"wait_timeout_s must be > 0, got {self.wait_timeout_s}")
        if self.disk_dir and not Path(self.disk_dir).is_absolute():
            raise InvalidArgument(f"disk_dir must be an absolute path, got {self.disk_dir!r}")


def slots_for_budget(device_bytes: int, slot_nbytes: int) -> int:
    """How many slots of `slot_nbytes` fit in `device_bytes`; InvalidArgument when not even one."""
    if slot_nbytes < 1:
        raise InvalidArgument(f"slot_nbytes must be >= 1, got {slot_nbytes}")
    slots = device_bytes // slot_nbytes
    if slots < 1:
        raise InvalidArgument(
            f"device budget of {device_bytes} bytes holds no adapter slot "
            f"({slot_nbytes} bytes each): raise it or lower r_max"
        )
    return slots


class Lease:
    """The right to use device `slot` until released. `tier` is where this acquire found the adapter.

    Device hits share one Lease object per slot: release each acquire's lease exactly once."""

    __slots__ = ("checksum", "key", "slot", "tier", "version")

    def __init__(self, key: Key, slot: int, tier: str) -> None:
        self.key, self.slot, self.tier, self.version, self.checksum = key, slot, tier, key.version, key.checksum

    def __repr__(self) -> str:
        return f"Lease(slot={self.slot}, version={self.version}, tier={self.tier!r})"


@dataclass(eq=False)
class _Load:
    """One load in flight. `tier` is written by its load thread before it lands; the other mutable
    fields change only under the cache lock."""

    key: Key
    slot: int
    """The reserved slot it writes."""
    future: Future[int]
    """Resolves to the slot, or to the load's error."""
    waiters: int = 0
    """Acquires waiting on it: each gets one pin when it lands."""
    tier: str = STORE
    state: int = _LOADING
    invalidated: bool = False
    """The user was invalidated while loading: land nothing, fail the waiters."""


class _DiskFiles:
    """Object bytes as files `<root>/<32 hex of the user hash>/v<version>[-<32 hex of the checksum>].adapter`;
    temporaries in `<root>/.tmp`. No locking: the cache orders the calls."""

    _USER_DIR = re.compile(r"[0-9a-f]{32}")
    _FILE = re.compile(r"v\d+(-[0-9a-f]{32})?\.adapter")

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._wipe()

    def _wipe(self) -> None:
        """Remove files of earlier processes (only names this class makes): nothing indexes them, and a
        user deleted meanwhile must never be served from them."""
        for tmp in self.tmp.iterdir():
            tmp.unlink(missing_ok=True)
        for entry in self.root.iterdir():
            if entry.is_dir() and self._USER_DIR.fullmatch(entry.name):
                for file in entry.iterdir():
                    if self._FILE.fullmatch(file.name):
                        file.unlink(missing_ok=True)
                _rmdir_if_empty(entry)

    def user_dir(self, tenant: str, user_id: str) -> Path:
        return self.root / user_digest(tenant, user_id)[:16].hex()

    def path(self, key: Key) -> Path:
        tag = "-" + hashlib.sha256(key.checksum.encode()).hexdigest()[:32] if key.checksum else ""
        return self.user_dir(key.tenant, key.user_id) / f"v{key.version:012d}{tag}.adapter"

    def write_temp(self, data: bytes) -> Path:
        fd, name = tempfile.mkstemp(dir=self.tmp)
        with os.fdopen(fd, "wb") as out:
            out.write(data)  # no fsync: a cache file; stale files are wiped at start anyway
        return Path(name)

    def commit(self, tmp: Path, key: Key) -> None:
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        os.replace(tmp, path)

    def read(self, key: Key) -> bytes | None:
        """The file's bytes, or None when it is gone (evicted meanwhile) or unreadable (the store has it)."""
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("disk cache read failed, going to the store: %s", exc)
            return None

    def remove(self, key: Key) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        _rmdir_if_empty(path.parent)

    def remove_user(self, tenant: str, user_id: str) -> None:
        shutil.rmtree(self.user_dir(tenant, user_id), ignore_errors=True)


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty, or already gone
        path.rmdir()


def _check_key(key: Key) -> None:
    tenant, user_id, version, checksum = key
    if not isinstance(tenant, str) or not isinstance(user_id, str) or not isinstance(checksum, str):
        raise InvalidArgument("tenant, user_id and checksum must be strings")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidArgument(f"adapter version must be an int >= 1, got {version!r}")


def _resolved(slot: int | None = None, error: BaseException | None = None) -> Future[int]:
    future: Future[int] = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(slot if slot is not None else -1)
    return future


def store_fetch(store: ObjectStore, registry: Registry) -> Fetch:
    """A `fetch` reading the object the registry's current record names, verified against its checksum.

    Only the current object is served: an older version, another object under the same version number (a
    checksum other than the record's; "" accepts the record's), or a user without a record (deleted)
    raises NotFound rather than serving bytes the registry no longer vouches for."""

    def fetch(tenant: str, user_id: str, version: int, checksum: str) -> bytes:
        record = registry.get(tenant, user_id)
        if record is None:
            raise NotFound(f"user {user_id!r} of tenant {tenant!r} has no adapter")
        if record.version != version or (checksum and record.checksum != checksum):
            raise NotFound(
                f"adapter version {version} of user {user_id!r} is not current (the registry "
                f"has version {record.version}, another object): look the version up again"
            )
        return store.get(adapter_key(tenant, user_id, version, record.checksum), record.checksum)

    return fetch


class AdapterCache:
    """Device slots of `pool` backed by host RAM, a disk directory and the object store (see module doc).

    The cache alone decides which adapter each slot holds and writes slots (under `pool_lock`, the
    engine's lock over the slot tensors); the engine reads a slot only while a lease on it is held.
    `fetch` and `parse` run on the load threads. Thread-safe. A slot with pins is never evicted;
    superseded versions are freed before LRU victims.
    """

    def __init__(
        self, config: CacheConfig, pool: SlotPool, pool_lock: threading.Lock, fetch: Fetch, parse: Parse
    ) -> None:
        self.config, self.pool, self.pool_lock = config, pool, pool_lock
        self._fetch, self._parse = fetch, parse
        self._lock = threading.Lock()
        self._slot_freed = threading.Condition(self._lock)
        self._slot_waiters = 0  # acquires waiting for a slot to become free or evictable
        self._slots: SlotTable[Key] = SlotTable(pool.num_slots)
        self._slot_nbytes = pool.slot_nbytes
        none = Lease(Key("", "", 0, ""), -1, DEVICE)
        self._leases: list[Lease] = [none] * pool.num_slots  # slot -> its shared device-hit lease
        self._host: ByteLRU[Key, Adapter] = ByteLRU(config.host_bytes)
        self._disk = _DiskFiles(config.disk_dir) if config.disk_dir else None
        # key -> checksum_of the bytes written to its file (the file is trusted only while it still matches)
        self._disk_lru: ByteLRU[Key, str] = ByteLRU(config.disk_bytes if self._disk else 0)
        # (tenant, user_id) -> (version, checksum) -> tier bits
        self._index: dict[tuple[str, str], dict[tuple[int, str], int]] = {}
        self._loading: dict[Key, _Load] = {}
        self._device_hits = 0
        self._device_misses = 0
        self._hits = dict.fromkeys(TIERS, 0)
        self._misses = dict.fromkeys(TIERS, 0)
        self._evictions = dict.fromkeys((DEVICE, HOST, DISK), 0)
        self._samples: deque[tuple[str, float]] = deque(maxlen=4096)
        self._executor = ThreadPoolExecutor(config.load_threads, thread_name_prefix="adapter-load")
        self._closed = False

    # -- public API ------------------------------------------------------------------------------------
    def acquire(
        self, tenant: str, user_id: str, version: int, timeout: float | None = None, *, checksum: str = ""
    ) -> Lease:
        """Pin the slot holding this adapter, loading it first if needed (waiting at most `timeout`
        seconds, default config.wait_timeout_s). Release the lease when the request is done with it.
        `checksum` is the record's (AdapterRecord.checksum): only that object is served.

        Raises the load's error (NotFound, CorruptObject, Unavailable, AdapterError, IncompatibleAdapter),
        ResourceExhausted when every slot stays pinned, DeadlineExceeded when the load is not done in time.
        """
        key = Key(tenant, user_id, version, checksum)
        with self._lock:  # the hot path: a dict lookup and a pin
            slot = self._slots.by_key.get(key)
            if slot is not None:
                self._slots.pin(slot)
                self._device_hits += 1
                return self._leases[slot]
        return self._acquire_miss(key, timeout)

    def release(self, lease: Lease) -> None:
        """Unpin a lease's slot (once per acquire); InvalidArgument if it was already released."""
        with self._lock:
            done = self._slots.unpin(lease.slot, lease.key)
            if done:
                if done == FREED and lease.key not in self._slots.by_key:
                    self._unmark(lease.key, DEVICE)
                if self._slot_waiters:
                    self._slot_freed.notify_all()

    def prefetch(self, tenant: str, user_id: str, version: int, *, checksum: str = "") -> Future[int]:
        """Start loading an adapter into a device slot without waiting; the future resolves to the slot
        (not pinned: it may be evicted later) or to the load's error (ResourceExhausted if no slot is free)."""
        key = Key(tenant, user_id, version, checksum)
        _check_key(key)
        with self._lock:
            self._check_open()
            slot = self._slots.by_key.get(key)
            if slot is not None:
                self._slots.touch(slot)
                return _resolved(slot)
            load = self._loading.get(key)
            if load is not None:
                return load.future
            slot = self._reserve()
            if slot is None:
                return _resolved(error=self._exhausted(0.0))
            return self._start(key, slot).future

    def invalidate(self, tenant: str, user_id: str) -> None:
        """Drop every cached copy of a user's adapters: host entries, disk files, unpinned slots now and
        pinned slots when released (they serve no new acquire); loads in flight fail with NotFound."""
        with self._lock:
            freed = False
            for version, checksum in self._index.pop((tenant, user_id), {}):
                key = Key(tenant, user_id, version, checksum)
                slot = self._slots.by_key.get(key)
                if slot is not None:
                    freed |= self._slots.retire(slot, unmap=True)
                self._host.pop(key)
                self._disk_lru.pop(key)
            for key in [k for k in self._loading if k.tenant == tenant and k.user_id == user_id]:
                self._loading.pop(key).invalidated = True
            if self._disk is not None:
                self._disk.remove_user(tenant, user_id)
            if freed and self._slot_waiters:
                self._slot_freed.notify_all()

    def hottest(self, limit: int) -> list[tuple[str, str]]:
        """Users with an adapter in a device slot, busiest first: in use now, then most recently used."""
        with self._lock:
            pinned = [slot for slot, pins in enumerate(self._slots.pins) if pins > 0]
            order = pinned + self._slots.lru_order()[::-1]
            users: dict[tuple[str, str], None] = {}
            for slot in order:
                key = self._slots.keys[slot]
                if key is not None:
                    users.setdefault((key.tenant, key.user_id), None)
                if len(users) >= limit:
                    break
        return list(users)

    def latest_version(self, tenant: str, user_id: str) -> int | None:
        """Newest version of the user held in any tier (device, host or disk), or None."""
        with self._lock:
            versions = self._index.get((tenant, user_id))
            return max(version for version, _ in versions) if versions else None

    def stats(self) -> CacheStats:
        """Counters: `resident` and `bytes` per tier holding adapters, `hits` and `misses` per tier,
        `evictions` per tier (adapters pushed out to make room), `slots` (device slots in all).

        Device hits/misses count acquires; host/disk/store ones count loads (waiters share one load)."""
        with self._lock:
            hits = {**self._hits, DEVICE: self._device_hits}
            misses = {**self._misses, DEVICE: self._device_misses}
            occupied = self._slots.occupied
            return CacheStats(
                resident={DEVICE: occupied, HOST: len(self._host), DISK: len(self._disk_lru)},
                bytes={DEVICE: occupied * self._slot_nbytes, HOST: self._host.nbytes, DISK: self._disk_lru.nbytes},
                hits=hits,
                misses=misses,
                evictions=dict(self._evictions),
                slots={DEVICE: self._slots.num_slots},
            )

    def take_load_samples(self) -> list[tuple[str, float]]:
        """(tier the load came from, seconds) of each load finished since the last call (at most 4096)."""
        with self._lock:
            samples = list(self._samples)
            self._samples.clear()
        return samples

    def close(self) -> None:
        """Finish loads in flight and stop the load threads; later acquires that miss raise Unavailable."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=True)

    def __enter__(self) -> AdapterCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- misses (caller's thread) ----------------------------------------------------------------------
    def _acquire_miss(self, key: Key, timeout: float | None) -> Lease:
        _check_key(key)
        wait = self.config.wait_timeout_s if timeout is None else timeout
        deadline = time.monotonic() + wait
        with self._lock:
            self._check_open()
            self._device_misses += 1
            found = self._find_or_start(key, deadline, wait)
            if isinstance(found, Lease):
                return found
            found.waiters += 1
        return self._wait(found, deadline, wait)

    def _find_or_start(self, key: Key, deadline: float, wait: float) -> Lease | _Load:
        """Under the lock: the slot if it landed meanwhile, else the load to wait on (started if none
        is in flight, waiting for an evictable slot until `deadline`)."""
        while True:
            slot = self._slots.by_key.get(key)
            if slot is not None:
                self._slots.pin(slot)
                return self._leases[slot]
            load = self._loading.get(key)
            if load is not None:
                return load
            capped = self._at_tenant_cap(key.tenant)
            slot = None if capped else self._reserve()
            if slot is not None:
                return self._start(key, slot)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._tenant_exhausted(key.tenant, wait) if capped else self._exhausted(wait)
            self._slot_waiters += 1
            try:
                self._slot_freed.wait(remaining)
            finally:
                self._slot_waiters -= 1

    def _wait(self, load: _Load, deadline: float, wait: float) -> Lease:
        """Block until `load` lands (our pin was added then) or fails (its error is raised)."""
        try:
            slot = load.future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            with self._lock:
                if load.state == _LOADING:
                    load.waiters -= 1
                    raise DeadlineExceeded(f"adapter load did not finish within {wait:.3g} s") from None
            slot = load.future.result()  # it finished as we gave up: the pin (or the error) is ours
        return Lease(load.key, slot, load.tier)

    def _exhausted(self, waited: float) -> ResourceExhausted:
        return ResourceExhausted(
            f"all {self._slots.num_slots} device adapter slots are pinned by in-flight requests or loads "
            f"(waited {waited:.3g} s for one): raise the device budget or lower concurrency"
        )

    def _tenant_exhausted(self, tenant: str, waited: float) -> ResourceExhausted:
        return ResourceExhausted(
            f"tenant {tenant!r} holds {self.config.max_tenant_slots} device adapter slots pinned or loading; the "
            f"limit is {self.config.max_tenant_slots} (max_tenant_slots; waited {waited:.3g} s for one of them)"
        )

    def _at_tenant_cap(self, tenant: str) -> bool:
        """Under the lock: whether `tenant` holds max_tenant_slots slots pinned or loading."""
        cap = self.config.max_tenant_slots
        if not cap:
            return False
        held = sum(1 for k in self._loading if k.tenant == tenant)
        for slot, pins in enumerate(self._slots.pins):
            key = self._slots.keys[slot]
            held += pins > 0 and key is not None and key.tenant == tenant
        return held >= cap

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the adapter cache is closed")

    # -- bookkeeping (under the lock) --------------------------------------------------------------------
    def _reserve(self) -> int | None:
        got = self._slots.reserve()
        if got is None:
            return None
        slot, evicted = got
        if evicted is not None:
            self._unmark(evicted, DEVICE)
            self._evictions[DEVICE] += 1
        return slot

    def _start(self, key: Key, slot: int) -> _Load:
        load = _Load(key, slot, Future())
        self._loading[key] = load
        self._executor.submit(self._run, load)
        return load

    def _mark(self, key: Key, tier: str) -> None:
        versions = self._index.setdefault((key.tenant, key.user_id), {})
        versions[key[2:]] = versions.get(key[2:], 0) | _BITS[tier]

    def _unmark(self, key: Key, tier: str) -> None:
        versions = self._index.get((key.tenant, key.user_id))
        if versions is None:
            return
        bits = versions.get(key[2:], 0) & ~_BITS[tier]
        if bits:
            versions[key[2:]] = bits
        else:
            versions.pop(key[2:], None)
            if not versions:
                del self._index[(key.tenant, key.user_id)]

    def _supersede(self, key: Key) -> bool:
        """Retire the user's older versions on the device (and another object of the same version: the user
        was deleted and created again); True when a newer version is already there."""
        tenant, user_id, version, checksum = key
        newer = False
        for (other, other_checksum), bits in list(self._index.get((tenant, user_id), {}).items()):
            if not bits & _BITS[DEVICE] or (other, other_checksum) == (version, checksum):
                continue
            if other > version:
                newer = True
                continue
            old = Key(tenant, user_id, other, other_checksum)
            slot = self._slots.by_key.get(old)
            if slot is not None and self._slots.retire(slot, unmap=False):
                self._unmark(old, DEVICE)
                self._slot_freed.notify_all()
        return newer

    def _count(self, tier: str, hit: bool) -> None:
        if hit:
            self._hits[tier] += 1
        else:
            self._misses[tier] += 1

    # -- loads (load threads) -----------------------------------------------------------------------------
    def _run(self, load: _Load) -> None:
        started = time.perf_counter()
        try:
            adapter, data = self._bring(load)
            with self.pool_lock:
                self.pool.set_slot(load.slot, adapter)
            self._promote(load, adapter, data)
        except Exception as exc:
            self._fail(load, exc)
            return
        self._land(load, time.perf_counter() - started)

    def _bring(self, load: _Load) -> tuple[Adapter, bytes | None]:
        """The adapter from the fastest tier holding it (setting load.tier); the bytes when from the store."""
        key = load.key
        with self._lock:
            adapter = self._host.get(key)
            self._count(HOST, adapter is not None)
        if adapter is not None:
            load.tier = HOST
            return adapter, None
        adapter = self._from_disk(key)
        if adapter is not None:
            load.tier = DISK
            return adapter, None
        try:
            data = self._fetch(*key)
        except Exception:
            with self._lock:
                self._count(STORE, False)
            raise
        with self._lock:
            self._count(STORE, True)
        return self._parse(data), data  # a refused object is never cached: nothing was stored yet

    def _from_disk(self, key: Key) -> Adapter | None:
        """The adapter from the disk tier, or None; a file that no longer hashes to the checksum of the bytes
        written there, or does not parse, is dropped (the store has the object)."""
        if self._disk is None:
            return None
        with self._lock:
            written = self._disk_lru.get(key)
        data = self._disk.read(key) if written is not None else None
        adapter = None
        if data is not None:
            try:
                if checksum_of(data) != written:
                    raise CorruptObject(f"file hashes to {checksum_of(data)}, {written} was written")
                adapter = self._parse(data)
            except Exception as exc:  # a changed file, or whatever a damaged one makes the parser raise
                log.warning("dropping damaged disk cache file %s: %s", self._disk.path(key), exc)
        with self._lock:
            self._count(DISK, adapter is not None)
            if data is not None and adapter is None and self._disk_lru.pop(key) is not None:
                self._disk.remove(key)
                self._unmark(key, DISK)
        return adapter

    def _promote(self, load: _Load, adapter: Adapter, data: bytes | None) -> None:
        """Keep a loaded adapter in host RAM, and store-fetched bytes on disk, unless invalidated."""
        tmp, digest = None, ""
        if data is not None and self._disk is not None and len(data) <= self._disk_lru.budget:
            digest = checksum_of(data)  # of the bytes fetch verified: what the file must still hash to
            try:
                tmp = self._disk.write_temp(data)
            except OSError as exc:  # the disk tier is best effort: serve anyway
                log.warning("disk cache write failed: %s", exc)
        with self._lock:
            if not load.invalidated:
                if load.tier != HOST:
                    self._keep(self._host, HOST, load.key, adapter, adapter.nbytes)
                if tmp is not None and data is not None:
                    self._commit_disk(load.key, tmp, len(data), digest)
                    tmp = None
        if tmp is not None:
            tmp.unlink(missing_ok=True)

    def _keep(self, lru: ByteLRU[Key, Any], tier: str, key: Key, value: Any, nbytes: int) -> list[Key]:
        """Under the lock: put into a tier's LRU and index; returns the keys evicted (maybe `key`)."""
        evicted = [k for k, _ in lru.put(key, value, nbytes)]
        for k in evicted:
            self._unmark(k, tier)
        self._evictions[tier] += len([k for k in evicted if k != key])
        if key in lru:
            self._mark(key, tier)
        return evicted

    def _commit_disk(self, key: Key, tmp: Path, nbytes: int, digest: str) -> None:
        assert self._disk is not None
        self._disk.commit(tmp, key)
        for k in self._keep(self._disk_lru, DISK, key, digest, nbytes):
            self._disk.remove(k)

    def _land(self, load: _Load, seconds: float) -> None:
        """Publish a loaded slot: waiters' pins, the user's current version flips to it."""
        with self._lock:
            if self._loading.get(load.key) is load:
                del self._loading[load.key]
            if load.invalidated:
                load.state = _FAILED
                self._slots.unreserve(load.slot)
                self._slot_freed.notify_all()
            else:
                newer = self._supersede(load.key)
                self._slots.assign(load.slot, load.key, load.waiters)
                self._leases[load.slot] = Lease(load.key, load.slot, DEVICE)
                self._mark(load.key, DEVICE)
                if newer and self._slots.retire(load.slot, unmap=False):  # an older version landed late
                    self._unmark(load.key, DEVICE)
                load.state = _DONE
                self._samples.append((load.tier, seconds))
                if self._slot_waiters:  # an unpinned landing is a slot others may now evict
                    self._slot_freed.notify_all()
        if load.state == _FAILED:
            load.future.set_exception(NotFound(f"adapter of user {load.key.user_id!r} was deleted while loading"))
        else:
            load.future.set_result(load.slot)

    def _fail(self, load: _Load, exc: Exception) -> None:
        with self._lock:
            if self._loading.get(load.key) is load:
                del self._loading[load.key]
            self._slots.unreserve(load.slot)
            load.state = _FAILED
            if self._slot_waiters:
                self._slot_freed.notify_all()
        load.future.set_exception(exc)
