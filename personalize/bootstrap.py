"""The one composition root: every part of a node built from the root `Config` alone, collaborators passed
to constructors. The service's launcher calls these; nothing else wires parts.

    worker = bootstrap.worker(config)                       # serving: model, slots, engine, cache, stream
    trainer = bootstrap.trainer(config)                      # training: model, repository, stream
    membership = bootstrap.membership(config)                # routers and routing clients: who serves

Every part reads the registry's Valkey/Redis at `config.registry.url` under `config.registry.namespace`
(registry records, the feedback stream and update notifications alike), and the adapter store at
`config.store_url`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from personalize.adapters.cache import AdapterCache, CacheConfig, slots_for_budget, store_fetch
from personalize.adapters.registry import open_registry
from personalize.adapters.repository import AdapterRepository
from personalize.adapters.store import open_store
from personalize.config import Config
from personalize.durability import check_durability, check_server_version
from personalize.engine.engine import Engine
from personalize.errors import InvalidArgument
from personalize.feedback.notify import UpdateListener, publish_update, redis_client
from personalize.feedback.stream import FeedbackStream
from personalize.feedback.trainer import RoundReport, Trainer
from personalize.lora.adapter import Adapter
from personalize.lora.format import AdapterSpec, adapter_from_bytes
from personalize.lora.slots import SlotPool, slot_nbytes
from personalize.model import BaseModel, load_base_model
from personalize.routing.announce import Ownership
from personalize.routing.membership import Membership, MembershipConfig, membership_client
from personalize.worker import Worker


def _check_urls(config: Config, *, store: bool = True) -> None:
    if not config.registry.url:
        raise InvalidArgument("registry.url is empty: set --registry-url (or run `personalize up`)")
    if store and not config.store_url:
        raise InvalidArgument("store_url is empty: set --store-url (or run `personalize up`)")


def adapter_spec(config: Config, base: BaseModel) -> AdapterSpec:
    """What adapters of this deployment look like on `base` (ranks, targets, fingerprint)."""
    return AdapterSpec.for_model(base.model, config.lora.r_max, config.lora.target_modules, base.fingerprint)


def worker(config: Config) -> Worker:
    """A serving node: base model, slot pool sized by the device budget, engine, tiered cache over the
    registry and store, the feedback stream and update notifications; not started."""
    _check_urls(config)
    client = redis_client(config.registry.url, config.registry.cluster)
    check_durability(client, config.allow_unsynced_registry)  # before the model loads: fail fast
    check_server_version(client)
    base = load_base_model(config.model)
    spec = adapter_spec(config, base)
    per_slot = slot_nbytes(base.config, config.lora.r_max, config.lora.target_modules, base.dtype)
    pool = SlotPool(
        base.config,
        slots_for_budget(config.lora.device_bytes, per_slot),
        config.lora.r_max,
        config.lora.target_modules,
        base.dtype,
        config.model.device,
    )
    engine = Engine(base, config.engine, pool)
    registry = open_registry(config.registry)
    store = open_store(config.store_url)
    disk_dir = str(Path(config.data_dir).resolve() / "cache") if config.lora.disk_bytes else ""

    def parse(data: bytes) -> Adapter:
        return adapter_from_bytes(data, spec, dtype=base.dtype)

    cache = AdapterCache(
        CacheConfig(
            host_bytes=config.lora.host_bytes,
            disk_bytes=config.lora.disk_bytes,
            disk_dir=disk_dir,
            max_tenant_slots=config.lora.max_tenant_slots(pool.num_slots),
        ),
        pool,
        engine.pool_lock,
        fetch=store_fetch(store, registry),
        parse=parse,
    )
    stream = FeedbackStream(client, config.feedback)
    updates = UpdateListener(client, config.registry.namespace)
    return Worker(
        config, base, registry, store, cache, engine, spec, stream, updates, ownership=Ownership(config.node_id)
    )


def trainer(config: Config, consumer: str = "", on_round: Callable[[RoundReport], None] | None = None) -> Trainer:
    """A trainer that reads the feedback stream and announces every version it publishes; `on_round`
    sees every round's report (the service's metrics and traces).

    `consumer` (default: the node id) must be stable across restarts of the same trainer (e.g. the pod
    name), so a restarted trainer picks up its own pending events first; a dead trainer's events are
    claimed by the others.
    """
    _check_urls(config)
    client = redis_client(config.registry.url, config.registry.cluster)
    check_durability(client, config.allow_unsynced_registry)
    check_server_version(client)
    base = load_base_model(config.model)
    repo = AdapterRepository(
        open_registry(config.registry),
        open_store(config.store_url),
        adapter_spec(config, base),
        config.lora.keep_versions,
    )
    stream = FeedbackStream(client, config.feedback)
    stream.ensure_group()
    namespace = config.registry.namespace

    def notify(tenant: str, user_id: str, version: int) -> None:
        publish_update(client, namespace, tenant, user_id, version)

    return Trainer(
        config.trainer, base, repo, stream, consumer=consumer or config.node_id, notify=notify, on_round=on_round
    )


def membership(config: Config, membership_config: MembershipConfig | None = None) -> Membership:
    """The live workers as the registry lists them: what a router (or a routing client) watches."""
    _check_urls(config, store=False)
    return Membership(
        membership_client(config.registry.url, config.registry.cluster), membership_config or MembershipConfig()
    )
