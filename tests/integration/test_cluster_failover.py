"""A primary of the Valkey Cluster SIGKILLed while feedback is being appended: its replica takes over, and
with feedback wait_replicas = 1 every acknowledged event is still there, once, and trained once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from valkeycluster import ValkeyCluster

from personalize.adapters.registry import Registry
from personalize.adapters.repository import AdapterRepository
from personalize.adapters.store import open_store
from personalize.errors import Unavailable
from personalize.feedback.events import FeedbackEvent
from personalize.feedback.notify import redis_client
from personalize.feedback.stream import FeedbackStream, StreamConfig
from personalize.feedback.trainer import Trainer, TrainerConfig
from personalize.lora.format import AdapterSpec
from personalize.model import BaseModel

USERS = [f"user{i}" for i in range(12)]
EVENTS_PER_WRITER = 60


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ValkeyCluster]:
    with ValkeyCluster(tmp_path / "cluster", node_timeout_ms=1000) as cluster:  # its own: this test kills a node
        yield cluster


RETRIES = Counter[str]()


def _append_until_acked(stream: FeedbackStream, event: FeedbackEvent) -> str:
    """What a client does: retry with the same event_key until the append is acknowledged."""
    for _ in range(600):
        try:
            return stream.append(event)[0]
        except Unavailable:
            RETRIES["unavailable"] += 1
            time.sleep(0.05)
    raise AssertionError(f"append of {event.event_key} never acknowledged")


def test_acked_feedback_survives_a_primary_failover(cluster: ValkeyCluster, tmp_path: Path, base: BaseModel) -> None:
    client = redis_client(cluster.url)
    config = StreamConfig(partitions=6, namespace="fo", wait_replicas=1, wait_timeout_ms=2000)
    stream = FeedbackStream(client, config)
    stream.ensure_group()
    acked: dict[str, tuple[str, str]] = {}  # event_key -> (user, event id)
    lock = threading.Lock()
    started = threading.Barrier(3)

    def writer(w: int) -> None:
        started.wait()
        for i in range(EVENTS_PER_WRITER):
            user = USERS[(w * 7 + i) % len(USERS)]
            key = f"w{w}-{i}"
            event = FeedbackEvent(
                "acme", user, "correct", f"Q: {i}?\nA: ", "meh", correction=f"Ciao {i}", event_key=key
            )
            event_id = _append_until_acked(stream, event)
            with lock:
                acked[key] = (user, event_id)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    started.wait()
    while len(acked) < EVENTS_PER_WRITER // 2:  # mid-load
        time.sleep(0.01)
    victim = cluster.kill_primary_of(stream.stream_key(stream.partition_of("acme", USERS[0])))
    cluster.wait_healthy()  # its replica took over; with no replica left that shard cannot ack (WAIT 1) ...
    assert victim.revive()  # ... until the old primary restarts and rejoins as the new primary's replica
    cluster.wait_healthy()
    for t in threads:
        t.join(timeout=300)
    assert len(acked) == 2 * EVENTS_PER_WRITER and RETRIES["unavailable"] > 0  # the failover was felt

    stored = Counter()
    for p in range(config.partitions):
        for event_id, fields in client.xrange(stream.stream_key(p)):
            stored[(fields[b"e"].decode(), event_id.decode())] += 1
    stored_ids = {event_id for (_, event_id) in stored}
    lost = [key for key, (_, event_id) in acked.items() if event_id not in stored_ids]
    assert lost == []
    assert len(stored) == len(acked) == len({key for key, _ in stored})  # no event stored twice

    spec = AdapterSpec.for_model(base.model, 16, base_fingerprint=base.fingerprint)
    repo = AdapterRepository(Registry(client, namespace="fo"), open_store(f"file://{tmp_path}/store"), spec)
    trainer = Trainer(
        TrainerConfig(steps=1, min_steps=1, max_steps=1, block_ms=50, claim_idle_ms=0), base, repo, stream, "t"
    )
    for _ in range(40):
        trainer.run_round()
        if stream.lag() == 0:
            break
    assert stream.lag() == 0
    per_user = Counter(user for user, _ in acked.values())
    applied = {user: repo.record("acme", user).examples_seen for user in per_user}
    assert applied == dict(per_user)  # every acked event applied once: none lost, none twice
    client.close()
