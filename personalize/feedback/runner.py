"""Wiring of the trainer role: model, registry, store and stream from the root config."""

from __future__ import annotations

from personalize.adapters.registry import Registry
from personalize.adapters.repository import AdapterRepository
from personalize.adapters.store import open_store
from personalize.config import Config
from personalize.feedback.notify import publish_update, redis_client
from personalize.feedback.stream import FeedbackStream
from personalize.feedback.trainer import Trainer
from personalize.lora.format import AdapterSpec
from personalize.model import load_base_model


def bootstrap_trainer(config: Config, registry_url: str, store_url: str, consumer: str) -> Trainer:
    """A trainer that reads the feedback stream and announces every version it publishes.

    `consumer` must be stable across restarts of the same trainer (e.g. the pod name), so a restarted
    trainer picks up its own pending events first; a dead trainer's events are claimed by the others.
    """
    base = load_base_model(config.model)
    spec = AdapterSpec.for_model(base.model, config.lora.r_max, config.lora.target_modules, base.fingerprint)
    client = redis_client(registry_url)
    repo = AdapterRepository(Registry(client, namespace=config.feedback.namespace), open_store(store_url), spec,
                             config.lora.keep_versions)
    stream = FeedbackStream(client, config.feedback)
    stream.ensure_group()
    namespace = config.feedback.namespace

    def notify(tenant: str, user_id: str, version: int) -> None:
        publish_update(client, namespace, tenant, user_id, version)

    return Trainer(config.trainer, base, repo, stream, consumer=consumer, notify=notify)
