"""Versions of users' adapters: objects in the store, made visible by a compare-and-set in the registry.

Both the worker (ImportAdapter, DeleteUser) and the trainer publish through here, so there is one way a
version comes to exist: put the immutable object, then CAS the registry from the version it was based on.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from personalize.adapters.registry import AdapterRecord, Registry
from personalize.adapters.store import ObjectStore
from personalize.adapters.store.base import checksum_of
from personalize.adapters.store.keys import adapter_key, adapter_version, examples_key, examples_version, user_prefix
from personalize.errors import AdapterError, Conflict, CorruptObject, IncompatibleAdapter, NotFound, PersonalizeError
from personalize.lora.adapter import Adapter
from personalize.lora.format import AdapterSpec, adapter_from_bytes, adapter_to_bytes

log = logging.getLogger(__name__)

EXAMPLES_CHECKSUM = "examples_checksum"
"""Adapter metadata naming the checksum (and so the key) of the version's examples object, if it has one."""


@dataclass(frozen=True)
class Published:
    """The outcome of a publish."""

    record: AdapterRecord
    key: str


class AdapterRepository:
    """Read, publish and delete users' adapter versions for one base model (`spec.base_fingerprint`)."""

    def __init__(self, registry: Registry, store: ObjectStore, spec: AdapterSpec, keep_versions: int = 0) -> None:
        self.registry = registry
        self.store = store
        self.spec = spec
        self.keep_versions = keep_versions
        """Versions kept per user (see prune); 0 = keep every version."""

    @property
    def fingerprint(self) -> str:
        return self.spec.base_fingerprint

    def record(self, tenant: str, user_id: str) -> AdapterRecord | None:
        return self.registry.get(tenant, user_id)

    def require(self, tenant: str, user_id: str) -> AdapterRecord:
        record = self.registry.get(tenant, user_id)
        if record is None:
            raise NotFound(f"user {user_id!r} has no adapter")
        return record

    def check_base(self, user_id: str, record: AdapterRecord) -> None:
        """Refuse an adapter trained on another base model."""
        if record.fingerprint != self.fingerprint:
            raise IncompatibleAdapter(
                f"user {user_id!r}'s adapter v{record.version} was trained on base {record.fingerprint[:19]}..., "
                f"this node serves {self.fingerprint[:19]}...; re-import or retrain it for this base"
            )

    def stored(self, tenant: str, user_id: str) -> list[tuple[int, str]]:
        """(version, object key) of every stored object of the user, in the store's listing order."""
        return [(v, k) for k in self.store.list(user_prefix(tenant, user_id)) if (v := adapter_version(k)) is not None]

    def read_bytes(self, tenant: str, user_id: str, version: int, checksum: str | None) -> bytes:
        """A version's object: by its checksum-named key when the checksum is known, else found by listing."""
        if checksum:
            return self.store.get(adapter_key(tenant, user_id, version, checksum), checksum)
        keys = [k for v, k in self.stored(tenant, user_id) if v == version]
        if not keys:
            raise NotFound(f"user {user_id!r} has no stored adapter version {version}")
        data = self.store.get(keys[0])
        if adapter_key(tenant, user_id, version, checksum_of(data)) != keys[0]:  # the name carries the checksum
            raise CorruptObject(f"stored adapter v{version} of user {user_id!r} does not match its checksum")
        return data

    def load(self, tenant: str, user_id: str, record: AdapterRecord, dtype: torch.dtype = torch.float32) -> Adapter:
        """The adapter of `record`, checksum-verified and validated against the base."""
        self.check_base(user_id, record)
        data = self.read_bytes(tenant, user_id, record.version, record.checksum)
        return adapter_from_bytes(data, self.spec, dtype=dtype)

    def load_intact(
        self, tenant: str, user_id: str, below: int, dtype: torch.dtype = torch.float32
    ) -> tuple[Adapter, int] | None:
        """The newest stored version of the user older than `below` whose object is intact, with that version;
        None when there is none. For recovery when the current version's object is corrupt or missing.

        Older versions' checksums are not in the registry: an object is intact when it hashes to the checksum
        its key names and parses for this base. Corrupt, unparsable or vanished ones are skipped;
        Unavailable propagates (nothing can be decided while the store is down).
        """
        older = [(v, k) for v, k in self.stored(tenant, user_id) if v < below]
        for version, key in sorted(older, key=lambda vk: vk[0], reverse=True):
            try:
                data = self.store.get(key)
                if adapter_key(tenant, user_id, version, checksum_of(data)) != key:
                    raise CorruptObject(f"object {key!r} does not hash to the checksum its name carries")
                return adapter_from_bytes(data, self.spec, dtype=dtype), version
            except (CorruptObject, NotFound, AdapterError) as exc:
                log.warning("user %r: skipping stored adapter v%d: %s", user_id, version, exc)
        return None

    def publish(
        self,
        tenant: str,
        user_id: str,
        adapter: Adapter,
        based_on: AdapterRecord | None,
        examples_seen: int,
        last_event_id: str = "",
        examples: bytes | None = None,
    ) -> Published:
        """Write version based_on.version + 1 and CAS it in; raises Conflict if another writer got there first.

        `examples` (the version's training record, opaque here) is written first as its own object, which the
        adapter's metadata names by checksum: DeleteUser removes it with the versions, and no export carries it."""
        version = (based_on.version if based_on else 0) + 1
        meta = {
            **adapter.metadata,
            "base_fingerprint": self.fingerprint,
            "version": str(version),
            "examples_seen": str(examples_seen),
            "last_event_id": last_event_id,
        }
        meta.pop(EXAMPLES_CHECKSUM, None)
        written: list[str] = []
        if examples is not None:
            meta[EXAMPLES_CHECKSUM] = checksum_of(examples)
            written.append(examples_key(tenant, user_id, version, meta[EXAMPLES_CHECKSUM]))
            self.store.put(written[-1], examples)
        data = adapter_to_bytes(Adapter(adapter.rank, adapter.alpha, adapter.weights, meta), self.spec)
        key = adapter_key(tenant, user_id, version, checksum_of(data))
        written.append(key)
        checksum = self.store.put(key, data)
        record = AdapterRecord(
            version=version,
            rank=adapter.rank,
            fingerprint=self.fingerprint,
            examples_seen=examples_seen,
            last_event_id=last_event_id,
            updated_at_ms=int(time.time() * 1000),
            checksum=checksum,
        )
        try:
            self.registry.compare_and_set(tenant, user_id, based_on.version if based_on else 0, record)
        except Conflict:
            current = self.registry.get(tenant, user_id)
            if current is not None and current.checksum == checksum:
                self._prune_if_due(tenant, user_id, current)
                return Published(current, key)  # ours after all: the CAS took effect, the client retried it
            for name in written:
                self.store.delete(name)  # never visible: the winner's objects have other names
            raise
        self._prune_if_due(tenant, user_id, record)
        return Published(record, key)

    def examples(self, tenant: str, user_id: str, version: int, adapter: Adapter) -> bytes | None:
        """The examples object of `adapter` (version `version` of the user), checksum-verified; None when the
        version has none. Raises NotFound or CorruptObject when it is missing or altered."""
        checksum = adapter.metadata.get(EXAMPLES_CHECKSUM, "")
        if not checksum:
            return None
        return self.store.get(examples_key(tenant, user_id, version, checksum), checksum)

    def prune(self, tenant: str, user_id: str, current: AdapterRecord) -> int:
        """Delete the user's stored versions older than the newest `keep_versions` (counting `current`), and
        objects at the current version other than the current one (writers that lost the race and died before
        cleaning up). Versions above `current` (a publish in flight) are never touched. Returns how many."""
        if not self.keep_versions:
            return 0
        current_key = adapter_key(tenant, user_id, current.version, current.checksum)
        listed = self.store.list(user_prefix(tenant, user_id))
        doomed = [
            k
            for k in listed
            if (v := adapter_version(k)) is not None
            and (v <= current.version - self.keep_versions or (v == current.version and k != current_key))
        ]
        old = current.version - self.keep_versions
        doomed += [k for k in listed if (v := examples_version(k)) is not None and v <= old]
        for key in doomed:
            self.store.delete(key)
        return len(doomed)

    def _prune_if_due(self, tenant: str, user_id: str, current: AdapterRecord) -> None:
        """prune() every keep_versions-th version (amortized: one listing per keep_versions publishes);
        best effort: the version is published whatever happens here."""
        if not self.keep_versions or current.version % self.keep_versions:
            return
        try:
            self.prune(tenant, user_id, current)
        except PersonalizeError as exc:
            log.warning("user %r: pruning old adapter versions failed (retried at a later version): %s", user_id, exc)

    def delete(self, tenant: str, user_id: str) -> int:
        """Remove the registry record (nothing new is served), then every stored version. Returns versions."""
        self.registry.delete(tenant, user_id)
        return self.delete_versions(tenant, user_id)

    def delete_versions(self, tenant: str, user_id: str) -> int:
        """Remove every stored object of the user, versions and their examples (call after the record is gone).
        Returns how many versions."""
        keys = self.store.list(user_prefix(tenant, user_id))
        self.store.delete_prefix(user_prefix(tenant, user_id))
        return sum(1 for k in keys if adapter_version(k) is not None)
