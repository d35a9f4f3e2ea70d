"""Pure bookkeeping of the adapter cache: which key each device slot holds, and byte-budgeted LRUs.

No I/O, no tensors, no locks: the cache calls these under its own lock, so eviction order is testable
on its own. Keys are any hashable value (the cache uses `(tenant, user_id, version, checksum)`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from personalize.errors import InvalidArgument

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

KEPT, EVICTABLE, FREED = 0, 1, 2
"""What `SlotTable.unpin` did: still pinned / now unpinned and evictable / retired and freed."""


class ByteLRU(Generic[K, V]):
    """Entries with a size in bytes, least recently used first, never more than `budget` bytes in all."""

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise InvalidArgument(f"LRU budget must be >= 0 bytes, got {budget}")
        self.budget = budget
        self.nbytes = 0
        """Bytes of the entries held now (<= budget)."""
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[K]:
        """Keys, least recently used first."""
        return list(self._entries)

    def get(self, key: K) -> V | None:
        """The value of `key` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: K, value: V, nbytes: int) -> list[tuple[K, V]]:
        """Insert or replace `key` as the most recently used; returns the entries that left to make room,
        oldest first — `(key, value)` itself when it is larger than the whole budget (then not held)."""
        if nbytes < 0:
            raise InvalidArgument(f"entry size must be >= 0 bytes, got {nbytes}")
        self.pop(key)
        if nbytes > self.budget:
            return [(key, value)]
        evicted: list[tuple[K, V]] = []
        while self.nbytes + nbytes > self.budget:
            old_key, (old_value, old_bytes) = self._entries.popitem(last=False)
            self.nbytes -= old_bytes
            evicted.append((old_key, old_value))
        self._entries[key] = (value, nbytes)
        self.nbytes += nbytes
        return evicted

    def pop(self, key: K) -> V | None:
        """Remove `key`; its value, or None when absent."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self.nbytes -= entry[1]
        return entry[0]


class SlotTable(Generic[K]):
    """Device slot states. A slot is free, reserved (being loaded), resident (mapped from its key; pinned,
    or unpinned and in LRU order) or retiring (pinned, freed when the last pin goes; it may still be
    mapped — a superseded version — or not — an invalidated one). Only unpinned resident slots are evicted.

    `by_key`, `pins` and `keys` are read directly on the cache's hot path; change them only through methods.
    """

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise InvalidArgument(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.by_key: dict[K, int] = {}
        """key -> slot of resident (and retiring, still mapped) slots."""
        self.keys: list[K | None] = [None] * num_slots
        """slot -> the key it holds (None when free or reserved)."""
        self.pins: list[int] = [0] * num_slots
        self.retiring: list[bool] = [False] * num_slots
        self.occupied = 0
        """Slots holding an adapter (resident or retiring)."""
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: pop() hands out slot 0 first
        self._lru: OrderedDict[int, None] = OrderedDict()  # unpinned resident slots, oldest first

    def lru_order(self) -> list[int]:
        """Evictable slots, next victim first."""
        return list(self._lru)

    def pin(self, slot: int) -> None:
        """One more user of a resident slot: it leaves the eviction order while pinned."""
        if self.pins[slot] == 0:
            del self._lru[slot]
        self.pins[slot] += 1

    def unpin(self, slot: int, key: K) -> int:
        """One user fewer; KEPT, EVICTABLE (now most recently used) or FREED (a retiring slot's last pin).

        Raises InvalidArgument when `slot` does not hold `key` pinned (a lease released twice)."""
        pins = self.pins[slot]
        if pins == 0 or self.keys[slot] != key:
            raise InvalidArgument(f"lease on slot {slot} was already released")
        self.pins[slot] = pins - 1
        if pins > 1:
            return KEPT
        if self.retiring[slot]:
            self._release(slot)
            return FREED
        self._lru[slot] = None
        return EVICTABLE

    def reserve(self) -> tuple[int, K | None] | None:
        """A slot for a new load: a free one, else the least recently used unpinned one (evicted; its key
        returned); None when every slot is pinned, reserved or retiring."""
        if self._free:
            return self._free.pop(), None
        if not self._lru:
            return None
        slot, _ = self._lru.popitem(last=False)
        key = self.keys[slot]
        assert key is not None
        del self.by_key[key]
        self.keys[slot] = None
        self.occupied -= 1
        return slot, key

    def unreserve(self, slot: int) -> None:
        """Give back a reserved slot whose load failed."""
        self._free.append(slot)

    def assign(self, slot: int, key: K, pins: int) -> None:
        """A reserved slot now holds `key`, with `pins` users already; unpinned, it is most recently used."""
        self.keys[slot], self.by_key[key], self.pins[slot] = key, slot, pins
        self.retiring[slot] = False
        self.occupied += 1
        if pins == 0:
            self._lru[slot] = None

    def touch(self, slot: int) -> None:
        """Mark a resident slot as just used (it becomes the last eviction victim while unpinned)."""
        if self.pins[slot] == 0 and slot in self._lru:
            self._lru.move_to_end(slot)

    def retire(self, slot: int, unmap: bool) -> bool:
        """Free a resident slot now if unpinned (True), else when its last pin goes. `unmap` also stops
        new lookups of its key at once (invalidation); a superseded version stays mapped until freed."""
        key = self.keys[slot]
        if unmap and key is not None and self.by_key.get(key) == slot:
            del self.by_key[key]
        if self.pins[slot] == 0:
            del self._lru[slot]
            self._release(slot)
            return True
        self.retiring[slot] = True
        return False

    def _release(self, slot: int) -> None:
        key = self.keys[slot]
        if key is not None and self.by_key.get(key) == slot:
            del self.by_key[key]
        self.keys[slot], self.retiring[slot] = None, False
        self.occupied -= 1
        self._free.append(slot)
