"""Feedback stream and trainer against a real Valkey and a real file:// store: nothing lost, nothing twice."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from pathlib import Path
from typing import Any

import pytest

from personalize.adapters.registry import Registry
from personalize.adapters.repository import AdapterRepository
from personalize.adapters.store import open_store
from personalize.errors import InvalidArgument, ResourceExhausted, Unavailable
from personalize.feedback.events import FeedbackEvent
from personalize.feedback.notify import redis_client
from personalize.feedback.stream import FeedbackStream, StreamConfig
from personalize.feedback.trainer import Trainer, TrainerConfig
from personalize.lora.format import AdapterSpec
from personalize.model import BaseModel

_ns = itertools.count()


@pytest.fixture
def parts(state_url: str, tmp_path: Path, base: BaseModel) -> dict[str, Any]:
    ns = f"fb{next(_ns)}"
    client = redis_client(state_url)
    stream = FeedbackStream(client, StreamConfig(partitions=3, namespace=ns))
    stream.ensure_group()
    spec = AdapterSpec.for_model(base.model, 16, base_fingerprint=base.fingerprint)
    repo = AdapterRepository(Registry(client, namespace=ns), open_store(f"file://{tmp_path}/store"), spec)
    return {"stream": stream, "repo": repo, "client": client}


def _trainer(base: BaseModel, parts: dict[str, Any], name: str, **cfg: Any) -> Trainer:
    config = TrainerConfig(**{"steps": 1, "min_steps": 1, "max_steps": 2, "block_ms": 50, "claim_idle_ms": 0, **cfg})
    return Trainer(config, base, parts["repo"], parts["stream"], consumer=name)


def _event(user: str, i: int, key: str = "", tenant: str = "acme") -> FeedbackEvent:
    return FeedbackEvent(tenant, user, "correct", f"Q: {i}?\nA: ", "meh", correction=f"Ciao {user}! {i}", event_key=key)


def test_append_is_durable_partitioned_and_idempotent(parts: dict[str, Any]) -> None:
    stream: FeedbackStream = parts["stream"]
    first, p = stream.append(_event("alice", 1, key="k1"))
    again, p2 = stream.append(_event("alice", 1, key="k1"))
    other, _ = stream.append(_event("alice", 2, key="k2"))
    assert (first, p) == (again, p2) and other != first
    assert p == stream.partition_of("acme", "alice")
    assert stream.pending_count("acme", "alice") == 2
    assert stream.lag() == 2
    with pytest.raises(InvalidArgument, match="correction"):
        FeedbackEvent("acme", "alice", "correct", "p", "c")


def test_round_publishes_versions_then_acknowledges(base: BaseModel, parts: dict[str, Any]) -> None:
    stream: FeedbackStream = parts["stream"]
    ids = {u: [stream.append(_event(u, i))[0] for i in range(2)] for u in ("alice", "bob", "carol")}
    report = _trainer(base, parts, "t1").run_round()
    assert sorted(u for _, u, _ in report.published) == ["alice", "bob", "carol"]
    for user, user_ids in ids.items():
        record = parts["repo"].record("acme", user)
        assert (record.version, record.examples_seen, record.last_event_id) == (1, 2, user_ids[-1])
        assert stream.pending_count("acme", user) == 0
    assert stream.lag() == 0


def test_redelivered_events_are_never_applied_twice(base: BaseModel, parts: dict[str, Any]) -> None:
    stream: FeedbackStream = parts["stream"]
    for i in range(3):
        stream.append(_event("dave", i))
    crashed = _trainer(base, parts, "crashed")
    delivered = stream.read("crashed", 10, 0)  # it read the events, trained and published ... then died
    assert len(delivered) == 3
    jobs = crashed._jobs(delivered, crashed.last_report)
    parts["repo"].publish("acme", "dave", jobs[0].adapter, None, 3, delivered[-1].event_id)
    survivor = _trainer(base, parts, "survivor")
    report = survivor.run_round()  # claims the dead consumer's pending events
    assert report.skipped_applied == 3 and report.published == []
    assert parts["repo"].record("acme", "dave").examples_seen == 3
    assert stream.pending_count("acme", "dave") == 0 and stream.lag() == 0


def test_deleted_users_events_are_dropped_and_nothing_is_published(base: BaseModel, parts: dict[str, Any]) -> None:
    stream: FeedbackStream = parts["stream"]
    for i in range(2):
        stream.append(_event("erin", i))
    stream.append(_event("frank", 0))
    assert stream.delete_user("acme", "erin") == 2
    report = _trainer(base, parts, "t2").run_round()
    assert [u for _, u, _ in report.published] == ["frank"]
    assert parts["repo"].record("acme", "erin") is None


def test_an_event_key_resent_after_delete_user_is_a_new_event(parts: dict[str, Any]) -> None:
    stream: FeedbackStream = parts["stream"]
    first, _ = stream.append(_event("gina", 1, key="k1"))
    kept, _ = stream.append(_event("hank", 1, key="k1"))  # the same key of another user is another event
    assert stream.delete_user("acme", "gina") == 1
    again, _ = stream.append(_event("gina", 1, key="k1"))
    assert again != first and stream.pending_ids("acme", "gina") == {again}
    assert stream.append(_event("hank", 1, key="k1"))[0] == kept
    ttl = parts["client"].httl(stream._idempotency_key("acme", "gina"), hashlib.sha256(b"k1").hexdigest()[:32])
    assert 0 < ttl[0] <= stream.config.idempotency_ttl_s  # each key expires on its own


def test_non_finite_rounds_go_to_dead_letters(base: BaseModel, parts: dict[str, Any]) -> None:
    stream: FeedbackStream = parts["stream"]
    event_id, p = stream.append(_event("gina", 0))
    trainer = _trainer(base, parts, "t3", lr=float("inf"), min_steps=2, max_attempts=2)
    first = trainer.run_round()
    assert first.failed_users == 1 and first.published == []
    second = trainer.run_round()
    assert second.dead_lettered == 1
    dead = stream.dead_letters(p)
    assert dead[0]["id"] == event_id and "not finite" in dead[0]["reason"]
    assert parts["repo"].record("acme", "gina") is None
    assert stream.pending_count("acme", "gina") == 0


def test_tenants_are_separate_users(base: BaseModel, parts: dict[str, Any]) -> None:
    stream: FeedbackStream = parts["stream"]
    stream.append(_event("same", 0, tenant="a"))
    stream.append(_event("same", 1, tenant="b"))
    stream.append(_event("same", 2, tenant="b"))
    _trainer(base, parts, "t4").run_round()
    assert parts["repo"].record("a", "same").examples_seen == 1
    assert parts["repo"].record("b", "same").examples_seen == 2


def test_a_full_partition_refuses_appends_and_naming_the_limit(valkey_url: str) -> None:
    stream = FeedbackStream(redis_client(valkey_url), StreamConfig(partitions=1, namespace=f"fb{next(_ns)}", max_len=3))
    stream.ensure_group()
    for i in range(3):
        stream.append(_event("flooder", i))
    with pytest.raises(ResourceExhausted, match=r"max_len"):
        stream.append(_event("other", 0))
    assert stream.lag() == 3  # nothing acknowledged was trimmed


def test_delete_user_removes_their_dead_letters_only(parts: dict[str, Any]) -> None:
    stream: FeedbackStream = parts["stream"]
    client = parts["client"]
    for user in ("gone", "kept"):
        stream.append(_event(user, 1, tenant="acme"))
    p_gone = stream.partition_of("acme", "gone")
    p_kept = stream.partition_of("acme", "kept")
    for p in {p_gone, p_kept}:
        for d in stream.read_own_pending("c", 10) + stream.read("c", 10, 10):
            if d.partition == p:
                stream.dead_letter(d, "test")
    assert any(r["u"] == "gone" for r in stream.dead_letters(p_gone))
    stream.delete_user("acme", "gone")
    assert not any(r["u"] == "gone" for r in stream.dead_letters(p_gone))
    assert any(r["u"] == "kept" for r in stream.dead_letters(p_kept))
    marker = b"Ciao gone!"
    assert not any(
        marker in b"".join(v for f in client.xrange(k) for v in f[1].values())
        for k in client.scan_iter(f"{stream.config.namespace}:*")
        if client.type(k) == b"stream"
    )


def test_wait_replicas_acks_only_what_a_replica_holds(state_url: str) -> None:
    config = StreamConfig(partitions=3, namespace=f"fb{next(_ns)}", wait_replicas=1, wait_timeout_ms=200)
    stream = FeedbackStream(redis_client(state_url), config)
    event = _event("hana", 1, key="k1")
    if state_url.startswith("redis+cluster://"):  # every shard has a replica: wait for it as long as it takes
        stream = FeedbackStream(stream.client, dataclasses.replace(config, wait_timeout_ms=10_000))
        event_id, _ = stream.append(event)
        assert stream.append(event)[0] == event_id and stream.pending_ids("acme", "hana") == {event_id}
        fsynced = FeedbackStream(stream.client, dataclasses.replace(config, wait_aof=True, wait_timeout_ms=10_000))
        assert fsynced.append(_event("hana", 2, key="k2"))[0] != event_id
    else:  # one server, no replica: stored but never acknowledged
        with pytest.raises(Unavailable, match="0 of 1 replicas"):
            stream.append(event)
        assert stream.pending_count("acme", "hana") == 1
    with pytest.raises(InvalidArgument, match="wait_replicas"):
        StreamConfig(wait_replicas=-1)
