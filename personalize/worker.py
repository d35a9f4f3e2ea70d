"""A worker node: the facade the gRPC service calls. Registry lookup -> cache -> engine batch.

`service/` translates requests into these calls and back; nothing here knows about gRPC.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from personalize import valkey
from personalize.adapters.cache import AdapterCache
from personalize.adapters.registry import AdapterRecord, Registry
from personalize.adapters.repository import AdapterRepository
from personalize.adapters.store import ObjectStore
from personalize.completions import CompletionLog
from personalize.config import Config
from personalize.engine.engine import Engine
from personalize.engine.text import ChatMessage, encode_chat
from personalize.engine.types import GenerationResult, SamplingParams, StreamPiece
from personalize.errors import (
    CorruptObject,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PersonalizeError,
    Unavailable,
)
from personalize.feedback.events import FeedbackEvent
from personalize.feedback.notify import UpdateListener
from personalize.feedback.stream import FeedbackStream
from personalize.lora.adapter import Adapter
from personalize.lora.format import AdapterSpec, adapter_from_bytes, check_served, read_peft, write_peft
from personalize.model import BaseModel
from personalize.routing.announce import Ownership, forget_hot
from personalize.routing.membership import MembershipConfig

log = logging.getLogger(__name__)

_UNLOADABLE = (Unavailable, CorruptObject, DeadlineExceeded)
_CAUSES = {
    CorruptObject: "is corrupt: the stored object failed its checksum",
    DeadlineExceeded: "unavailable: loading it timed out",
}
"""degraded_reason per load failure: names the component, never an address, path or object key."""
_MAX_EXAMPLES_SEEN = (1 << 48) - 1  # the registry record's field width
EXPORTED_METADATA = ("examples_seen",)
"""The only metadata an export carries (besides the base fingerprint and PEFT's "format"): never the user's
texts, event ids or version, so exporting, importing for any user and exporting again gives the same bytes."""


def _rewrite_log(client: Any) -> None:
    """Ask the registry server to rewrite its append-only log, whose older commands still hold a deleted user's
    texts; best effort (a managed server may refuse it, one rewrite at a time runs)."""
    try:
        client.bgrewriteaof()
    except Exception as exc:
        log.warning(
            "the registry server did not start an AOF rewrite after DeleteUser (%s): deleted feedback "
            "stays in its log until its next rewrite",
            exc,
        )


def imported_examples_seen(metadata: dict[str, str]) -> int:
    """An imported file's `examples_seen` metadata: absent = 0, else decimal digits in [0, 2^48)."""
    raw = metadata.get("examples_seen", "")
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 15 or int(raw) > _MAX_EXAMPLES_SEEN:
        raise InvalidArgument(
            f"adapter metadata examples_seen must be an integer in [0, {_MAX_EXAMPLES_SEEN}], got {raw[:40]!r}"
        )
    return int(raw)


"""Failures to load a user's current adapter that `degrade_to_base` answers with the base model: store or
registry unreachable, a corrupt object or record, the load not done within load_timeout_s."""


@dataclass(frozen=True)
class AdapterInfo:
    """What the system knows of one user's adapter (the API's `AdapterInfo`)."""

    user_id: str
    version: int
    rank: int
    examples_seen: int
    base_fingerprint: str
    updated_at_unix_ms: int
    pending_events: int = 0
    owner_node: str = ""


@dataclass(frozen=True)
class GenerationInfo:
    """Which adapter served a generation and where it was found."""

    adapter_version: int
    """0 = the base model served (no adapter, use_base_model, or degraded)."""
    cache_tier: str
    """device, host, disk, store or none."""
    node_id: str
    degraded: bool = False
    """The user's adapter could not be loaded and the base model served instead (config.degrade_to_base)."""
    degraded_reason: str = ""
    """Why it is degraded: which adapter and the cause; "" when not degraded."""


@dataclass(frozen=True)
class NodeStats:
    """Per-node figures for `Admin.Stats`."""

    node_id: str
    resident: dict[str, int] = field(default_factory=dict)
    """tier -> adapters resident."""
    bytes: dict[str, int] = field(default_factory=dict)
    """tier -> bytes resident."""
    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    batch_occupancy: float = 0.0
    """Mean running requests per decode step over the node's life."""
    max_batch_occupancy: int = 0
    queue_depth: int = 0
    stream_lag: int = 0
    slot_bytes: int = 0
    """Bytes of one device slot (every configured target module at r_max)."""
    device_slots: int = 0


class Generation(Protocol):
    """A running request: iterate for text pieces as they are produced, or wait for the result."""

    info: GenerationInfo

    def __iter__(self) -> Iterator[str]: ...

    def pieces(self) -> Iterator[StreamPiece]:
        """The text pieces with the logprobs of their tokens (see RequestHandle.pieces)."""
        ...

    def result(self, timeout: float | None = None) -> GenerationResult: ...

    def cancel(self) -> None: ...


class _Running:
    """A Generation backed by an engine handle."""

    def __init__(self, handle: Any, info: GenerationInfo) -> None:
        self._handle = handle
        self.info = info

    def __iter__(self) -> Iterator[str]:
        return iter(self._handle)

    def pieces(self) -> Iterator[StreamPiece]:
        return self._handle.pieces()  # type: ignore[no-any-return]

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self._handle.result(timeout)

    def cancel(self) -> None:
        self._handle.cancel()


class _Once:
    """`fn` run by the first call only (a lease released at admission is not released again at the end)."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._fn: Callable[[], object] | None = fn
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn()


class Worker:
    """One serving node: registry -> tiered cache -> continuous-batching engine. Thread-safe."""

    def __init__(
        self,
        config: Config,
        base: BaseModel,
        registry: Registry,
        store: ObjectStore,
        cache: AdapterCache,
        engine: Engine,
        spec: AdapterSpec,
        stream: FeedbackStream | None = None,
        updates: UpdateListener | None = None,
        ownership: Ownership | None = None,
    ) -> None:
        self.config = config
        self.node_id = config.node_id
        self.base = base
        self.registry = registry
        self.store = store
        self.cache = cache
        self.engine = engine
        self.spec = spec
        self.repo = AdapterRepository(registry, store, spec, config.lora.keep_versions)
        self.stream = stream
        self.updates = updates
        self.ownership = ownership or Ownership(config.node_id)
        """Which users routing sends here (every user until a ring is known), fed by the worker's
        Announcement from membership, so only a user's owner loads their new versions eagerly."""

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.engine.start()
        if self.updates is not None:
            self.updates.start(self._on_update)

    def stop(self) -> None:
        if self.updates is not None:
            self.updates.stop()
        self.engine.stop()
        self.cache.close()
        self.store.close()

    # -- generation -------------------------------------------------------------------------------------------
    def generate(
        self,
        tenant: str,
        user_id: str,
        prompt: str | tuple[ChatMessage, ...],
        params: SamplingParams,
        use_base_model: bool = False,
    ) -> Generation:
        """Start a generation with the user's current adapter (or the base model); returns at once. `prompt`
        is text or a chat (rendered with the model's chat template).

        When the adapter cannot be loaded (Unavailable, CorruptObject, DeadlineExceeded of the load), that
        error is raised, or with config.degrade_to_base the base model serves and the info says degraded."""
        if use_base_model:
            return self._base(prompt, params, tenant=tenant)
        try:
            record = self.registry.get(tenant, user_id)
        except _UNLOADABLE as exc:
            if not self.config.degrade_to_base:
                raise
            return self._degraded(tenant, prompt, params, f"adapter of user {user_id!r}", exc)
        if record is None:
            return self._base(prompt, params, tenant=tenant)
        self.repo.check_base(user_id, record)
        try:
            lease = self.cache.acquire(
                tenant, user_id, record.version, timeout=self.config.load_timeout_s, checksum=record.checksum
            )
        except _UNLOADABLE as exc:
            if not self.config.degrade_to_base:
                raise
            return self._degraded(tenant, prompt, params, f"adapter v{record.version} of user {user_id!r}", exc)
        release = _Once(lambda: self.cache.release(lease))  # at admission (the lane has the copy), or at the end
        try:
            handle = self.engine.submit(
                prompt,
                params,
                slot=lease.slot,
                on_done=lambda _result: release(),
                tenant=tenant,
                label=f"adapter v{record.version} of user {user_id!r}",
                on_admit=release,
            )
        except BaseException:
            release()
            raise
        return _Running(handle, GenerationInfo(record.version, lease.tier, self.node_id))

    def _base(
        self, prompt: str | tuple[ChatMessage, ...], params: SamplingParams, reason: str = "", tenant: str = ""
    ) -> Generation:
        handle = self.engine.submit(prompt, params, tenant=tenant)
        return _Running(handle, GenerationInfo(0, "none", self.node_id, degraded=bool(reason), degraded_reason=reason))

    def _degraded(
        self,
        tenant: str,
        prompt: str | tuple[ChatMessage, ...],
        params: SamplingParams,
        what: str,
        exc: PersonalizeError,
    ) -> Generation:
        """The base model, flagged degraded, for a request whose adapter (`what`) failed to load with `exc`."""
        reason = f"{what} {_CAUSES.get(type(exc), 'unavailable: the adapter store or registry is unreachable')}"
        log.warning("serving the base model instead (degrade_to_base): %s: %s", reason, exc)  # details: log only
        return self._base(prompt, params, reason, tenant=tenant)  # queued in its tenant's fair share

    # -- adapters ---------------------------------------------------------------------------------------------
    def warm(self, tenant: str, user_id: str) -> None:
        """Start loading the user's current adapter into a device slot (rebalancing: a user who just moved
        here was hot on their old owner). Best effort: failures only mean a lazy load later."""
        try:
            record = self.registry.get(tenant, user_id)
            if record is not None and record.fingerprint == self.base.fingerprint:
                self.cache.prefetch(tenant, user_id, record.version, checksum=record.checksum)
        except PersonalizeError:
            pass

    def hot_users(self, limit: int) -> list[tuple[str, str]]:
        """This worker's hottest users (for rebalancing), less those with no registry record: a user deleted
        through another worker is still in this cache until it ages out, and must not be named again."""
        users = self.cache.hottest(limit)
        return [user for user, live in zip(users, self.registry.exists_many(users), strict=True) if live]

    def _on_update(self, tenant: str, user_id: str, version: int) -> None:
        """A trainer published a version: the user's owner loads the current one now (the announcement names
        no object; the registry record has its checksum), so their next request is a device hit (other
        nodes would only evict their own users' adapters for it)."""
        if self.ownership.owns(tenant, user_id):
            self.warm(tenant, user_id)

    # -- feedback -----------------------------------------------------------------------------------------------
    def submit_feedback(self, event: FeedbackEvent) -> tuple[str, int]:
        """Durably append a feedback event; returns (event id, partition) only after the append."""
        if self.stream is None:
            raise Unavailable("this node has no feedback stream configured")
        if event.messages:
            encode_chat(self.base.tokenizer, event.messages)  # INVALID_ARGUMENT now, not a failed round later
        return self.stream.append(event)

    def _pending(self, tenant: str, user_id: str) -> int:
        return self.stream.pending_count(tenant, user_id) if self.stream is not None else 0

    def get_adapter(self, tenant: str, user_id: str) -> AdapterInfo:
        """The user's adapter; a user with feedback still pending but no version yet is version 0."""
        record = self.registry.get(tenant, user_id)
        pending = self._pending(tenant, user_id)
        if record is None:
            if pending:
                return AdapterInfo(user_id, 0, 0, 0, self.base.fingerprint, 0, pending, self.node_id)
            raise NotFound(f"user {user_id!r} has no adapter")
        return self._info(user_id, record, pending)

    def _info(self, user_id: str, record: AdapterRecord, pending: int = 0) -> AdapterInfo:
        return AdapterInfo(
            user_id=user_id,
            version=record.version,
            rank=record.rank,
            examples_seen=record.examples_seen,
            base_fingerprint=record.fingerprint,
            updated_at_unix_ms=record.updated_at_ms,
            pending_events=pending,
            owner_node=self.node_id,
        )

    def import_adapter(self, tenant: str, user_id: str, files: dict[str, bytes]) -> AdapterInfo:
        """Validate PEFT files and install them as the user's next version."""
        adapter = read_peft(files, self.spec, dtype=torch.float32)
        check_served(adapter, self.base.dtype)  # fp16/bf16 overflow far earlier than the float32 read
        examples = imported_examples_seen(adapter.metadata)
        # Only PEFT's tensors and our own bookkeeping are kept: other metadata (a replay buffer, junk) is dropped.
        adapter = Adapter(adapter.rank, adapter.alpha, adapter.weights, {})
        current = self.registry.get(tenant, user_id)
        # The events applied so far stay applied: ones a crashed trainer published but never acked are not
        # trained again onto the imported adapter.
        done = current.last_event_id if current else ""
        published = self.repo.publish(tenant, user_id, adapter, current, examples_seen=examples, last_event_id=done)
        return self._info(user_id, published.record)

    def export_adapter(self, tenant: str, user_id: str, version: int = 0) -> tuple[dict[str, bytes], AdapterInfo]:
        """PEFT files of the current (version 0) or a named version."""
        record = self.repo.require(tenant, user_id)
        wanted = version or record.version
        if wanted > record.version:
            raise NotFound(f"user {user_id!r} has no adapter version {wanted} (current is {record.version})")
        checksum = record.checksum if wanted == record.version else None
        data = self.repo.read_bytes(tenant, user_id, wanted, checksum)
        stored = adapter_from_bytes(data, self.spec, dtype=torch.float32)
        kept = {k: v for k, v in stored.metadata.items() if k in EXPORTED_METADATA}
        adapter = Adapter(stored.rank, stored.alpha, stored.weights, kept)
        info = self._info(user_id, record)
        if wanted != record.version:
            info = dataclasses.replace(info, version=wanted)
        return write_peft(adapter, self.spec), info

    def delete_user(self, tenant: str, user_id: str) -> tuple[int, int]:
        """Forget a user: registry record first (nothing new is served), then cached copies, then objects."""
        self.registry.delete(tenant, user_id)
        CompletionLog(self.registry.client, self.registry.namespace).forget_user(tenant, user_id)
        events = self.stream.delete_user(tenant, user_id) if self.stream is not None else 0
        self.cache.invalidate(tenant, user_id)
        versions = self.repo.delete_versions(tenant, user_id)
        if self.stream is not None:  # the workers' hot lists name users too
            client, namespace = self.stream.client, MembershipConfig().namespace
            valkey.call(lambda: forget_hot(client, namespace, tenant, user_id), "registry")
            _rewrite_log(client)
        return versions, events

    # -- figures ----------------------------------------------------------------------------------------------
    def stats(self) -> NodeStats:
        s = self.cache.stats()
        return NodeStats(
            node_id=self.node_id,
            resident=s["resident"],
            bytes=s["bytes"],
            hits=s["hits"],
            misses=s["misses"],
            batch_occupancy=self.engine.mean_occupancy,
            max_batch_occupancy=self.engine.max_occupancy,
            queue_depth=self.engine.queue_depth,
            stream_lag=self._lag(),
            slot_bytes=self.slot_bytes,
            device_slots=self.engine.pool.num_slots if self.engine.pool is not None else 0,
        )

    @property
    def slot_bytes(self) -> int:
        """Bytes of one device slot: sized by the configured target modules and r_max (0 = no pool)."""
        return self.engine.pool.slot_nbytes if self.engine.pool is not None else 0

    def slots_summary(self) -> str:
        """One line for banners: slot count, bytes per slot and what a slot holds."""
        pool = self.engine.pool
        if pool is None:
            return "no device slots (base model only)"
        modules = ",".join(pool.target_modules)
        return f"{pool.num_slots} device slots of {pool.slot_nbytes / 2**20:.2f} MiB ({modules} at r_max {pool.r_max})"

    def _lag(self) -> int:
        try:
            return self.stream.lag() if self.stream is not None else 0
        except Unavailable:
            return -1
