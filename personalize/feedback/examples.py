"""A version's training record: the stream ids of the events it was trained on, and the user's examples kept
for later rounds to rehearse. It is stored as its own object beside the version (never inside the adapter
file), so an export carries none of the user's text, and DeleteUser removes it with the versions.

The ids are an independent record of exactly-once training: every acknowledged event id appears in exactly
one version's record. Adapters stored before this object existed carry their examples in the adapter's
metadata ("replay"): they are read from there once, and the next version stores them in its own record.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

from personalize.adapters.repository import AdapterRepository
from personalize.adapters.store.base import checksum_of
from personalize.adapters.store.keys import adapter_key
from personalize.errors import AdapterError, CorruptObject, NotFound, PersonalizeError
from personalize.feedback.events import FeedbackEvent, messages_from_json, messages_json
from personalize.lora.adapter import Adapter
from personalize.lora.format import adapter_from_bytes

log = logging.getLogger(__name__)

LEGACY_REPLAY = "replay"
"""Adapter metadata that held the examples before they moved to their own object."""
TEXT_CAP = 2048
"""Longest text kept per example field (a prompt keeps its end, answers their start)."""
_FIELDS = ("tenant", "user_id", "kind", "prompt", "completion", "correction", "rejected")


@dataclass(frozen=True)
class VersionExamples:
    """What one version was trained on and keeps for rehearsal."""

    event_ids: list[str] = field(default_factory=list)
    """Stream ids of the new events this version applied (replayed examples are not counted)."""
    replay: list[FeedbackEvent] = field(default_factory=list)
    """The user's recent examples, oldest first, trained again with later events."""


def encode(examples: VersionExamples) -> bytes:
    """The object's bytes: JSON {"event_ids": [...], "replay": [{field: text}, ...]}."""
    items = [
        {
            "tenant": e.tenant,
            "user_id": e.user_id,
            "kind": e.kind,
            "prompt": e.prompt[-TEXT_CAP:],
            "completion": e.completion[:TEXT_CAP],
            "correction": e.correction[:TEXT_CAP],
            "rejected": e.rejected[:TEXT_CAP],
            **({"messages": messages_json(e.messages)} if e.messages else {}),
        }
        for e in examples.replay
    ]
    return json.dumps({"event_ids": examples.event_ids, "replay": items}, ensure_ascii=False).encode()


def decode(data: bytes) -> VersionExamples:
    """The record in `data`; items that are not what encode writes are skipped one by one."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        log.warning("ignoring an unreadable examples object")
        return VersionExamples()
    if not isinstance(raw, dict):
        return VersionExamples()
    ids = raw.get("event_ids")
    return VersionExamples(
        [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else [], _events(raw.get("replay"))
    )


def legacy_replay(adapter: Adapter) -> list[FeedbackEvent]:
    """The examples an adapter stored before they had their own object (metadata "replay": a JSON list).

    Anything but a list of objects of string fields is skipped, item by item, and a buffer that does not parse
    at all (bad JSON, nesting too deep) counts as empty."""
    raw = adapter.metadata.get(LEGACY_REPLAY, "")
    if not isinstance(raw, str) or not raw:
        return []
    try:
        return _events(json.loads(raw))
    except (ValueError, RecursionError):
        log.warning("ignoring an unreadable replay buffer")
        return []


def stored_examples(repo: AdapterRepository, tenant: str, user_id: str, adapter: Adapter) -> VersionExamples:
    """The record of the stored version `adapter` (its metadata names the version), from its examples object,
    else from legacy metadata. A missing or altered object counts as empty (the adapter itself is intact);
    Unavailable propagates."""
    version = adapter.metadata.get("version", "")
    if not (version.isascii() and version.isdigit()) or not 0 < int(version) <= 10**12 - 1:
        return VersionExamples(replay=legacy_replay(adapter))
    try:
        data = repo.examples(tenant, user_id, int(version), adapter)
    except (CorruptObject, NotFound) as exc:
        log.warning("user %r: the examples of adapter v%s are lost (%s); rehearsing none", user_id, version, exc)
        return VersionExamples()
    return decode(data) if data is not None else VersionExamples(replay=legacy_replay(adapter))


def applied_event_ids(repo: AdapterRepository, tenant: str, user_id: str) -> Counter[str]:
    """How many of the user's stored versions list each event id as trained on: the record, independent of the
    trainer's counters, that exactly-once is checked against (every acknowledged id appears exactly once).
    Versions whose adapter object is altered or unparsable are skipped; a lost examples object counts as none."""
    out: Counter[str] = Counter()
    for version, key in repo.stored(tenant, user_id):
        data = repo.store.get(key)
        if adapter_key(tenant, user_id, version, checksum_of(data)) != key:
            continue
        try:
            adapter = adapter_from_bytes(data, repo.spec)
        except AdapterError:
            continue
        out.update(stored_examples(repo, tenant, user_id, adapter).event_ids)
    return out


def without_legacy(adapter: Adapter) -> Adapter:
    """The adapter without the legacy metadata examples (a new version keeps them in its own object)."""
    meta = {k: v for k, v in adapter.metadata.items() if k != LEGACY_REPLAY}
    return Adapter(adapter.rank, adapter.alpha, adapter.weights, meta)


def _events(items: object) -> list[FeedbackEvent]:
    return [e for item in (items if isinstance(items, list) else []) if (e := _event(item)) is not None]


def _event(item: object) -> FeedbackEvent | None:
    if not isinstance(item, dict) or not all(isinstance(item.get(k, ""), str) for k in (*_FIELDS, "messages")):
        return None
    try:
        chat = messages_from_json(item.get("messages", ""))
        return FeedbackEvent(**{k: item.get(k, "") for k in _FIELDS}, messages=chat)
    except PersonalizeError:
        return None
