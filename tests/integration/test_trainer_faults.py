"""The trainer under faults, against real stores and a real Valkey, single and Cluster (`state_url`): a fault
hitting one user stays with that user, a corrupt adapter is never trained on, and no event is lost or applied
twice."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from personalize.adapters.registry import AdapterRecord, Registry
from personalize.adapters.repository import AdapterRepository
from personalize.adapters.store import FileStore, ObjectStore, user_prefix
from personalize.adapters.store.keys import adapter_key, adapter_version
from personalize.errors import Conflict, CorruptObject, NotFound, Unavailable
from personalize.feedback.events import FeedbackEvent
from personalize.feedback.examples import applied_event_ids, stored_examples
from personalize.feedback.notify import redis_client
from personalize.feedback.stream import Delivered, FeedbackStream, StreamConfig
from personalize.feedback.trainer import Trainer, TrainerConfig, UserJob, train_round
from personalize.lora.adapter import Adapter
from personalize.lora.format import AdapterSpec
from personalize.model import BaseModel
from tests.helpers import make_adapter

_ns = itertools.count()


class FlakyStore(FileStore):
    """A real file store that cannot be reached for the objects under `down` (a user's prefix) while set."""

    down = ""
    broken = ""
    """Objects under this prefix make the read raise an error of no domain type (a bug, a parser crash)."""

    def get(self, key: str, checksum: str | None = None) -> bytes:
        if self.down and key.startswith(self.down):
            raise Unavailable(f"store unreachable for {key!r}")
        if self.broken and key.startswith(self.broken):
            raise RuntimeError(f"unexpected failure reading {key!r}")
        return super().get(key, checksum)


class LostReplyRegistry(Registry):
    """A real registry whose next `lost` compare-and-sets take effect but whose replies never arrive."""

    lost = 0
    retried = False
    """Instead of failing, retry the CAS once like a client with retries on (the retry sees a Conflict)."""

    def compare_and_set(self, tenant: str, user_id: str, expected_version: int, record: AdapterRecord) -> None:
        super().compare_and_set(tenant, user_id, expected_version, record)
        if self.lost:
            self.lost -= 1
            if self.retried:
                super().compare_and_set(tenant, user_id, expected_version, record)
            raise Unavailable("registry connection dropped before the reply")


class CutStream(FeedbackStream):
    """A real stream that loses its connection for the named operations while `cut` holds them."""

    cut: frozenset[str] = frozenset()

    def read(self, consumer: str, count: int, block_ms: int) -> list[Delivered]:
        self._check("read")
        return super().read(consumer, count, block_ms)

    def ack(self, tenant: str, user_id: str, ids: Any) -> int:
        if ids:  # an empty ack sends nothing
            self._check("ack")
        return super().ack(tenant, user_id, ids)

    def _check(self, op: str) -> None:
        if op in self.cut:
            raise Unavailable(f"feedback stream unreachable ({op})")


@pytest.fixture
def parts(state_url: str, tmp_path: Path, base: BaseModel) -> dict[str, Any]:
    ns = f"tf{next(_ns)}"
    client = redis_client(state_url)
    stream = CutStream(client, StreamConfig(partitions=3, namespace=ns))
    stream.ensure_group()
    spec = AdapterSpec.for_model(base.model, 16, base_fingerprint=base.fingerprint)
    store = FlakyStore(tmp_path / "store")
    repo = AdapterRepository(LostReplyRegistry(client, namespace=ns), store, spec)
    return {"stream": stream, "repo": repo, "store": store}


def _trainer(base: BaseModel, parts: dict[str, Any], name: str = "t") -> Trainer:
    # No LoRA dropout: its masks are drawn over a round's whole batch, and _assert_trained_from retrains one
    # user of a shared round alone.
    config = TrainerConfig(
        steps=1, min_steps=1, max_steps=2, block_ms=50, linger_ms=0, claim_idle_ms=0, lora_dropout=0.0
    )
    return Trainer(config, base, parts["repo"], parts["stream"], consumer=name)


def _event(user: str, i: int) -> FeedbackEvent:
    return FeedbackEvent("acme", user, "correct", f"Q: {i}?\nA: ", "meh", correction=f"Ciao {user}! {i}")


def _append(parts: dict[str, Any], user: str, *numbers: int) -> list[Delivered]:
    stream: FeedbackStream = parts["stream"]
    out = []
    for i in numbers:
        event_id, p = stream.append(_event(user, i))
        out.append(Delivered(p, event_id, _event(user, i)))
    return out


def _corrupt(repo: AdapterRepository, user: str) -> AdapterRecord:
    """Flip a byte of the user's current object behind the repository's back."""
    record = repo.require("acme", user)
    (key,) = [
        k
        for k in repo.store.list(user_prefix("acme", user))
        if f"v{record.version:012d}-" in k and k.endswith(".safetensors")
    ]
    data = bytearray(repo.store.get(key))
    data[-1] ^= 0xFF
    repo.store.put(key, bytes(data))
    with pytest.raises(CorruptObject):
        repo.load("acme", user, record)
    return record


def _assert_applied_once(repo: AdapterRepository, user: str, events: list[Delivered]) -> None:
    """Every id of `events` is listed by exactly one stored version of the user, and no other id is (checked
    against the versions' own records, not the trainer's examples_seen)."""
    applied = applied_event_ids(repo, "acme", user)
    assert applied == {d.event_id: 1 for d in events}, applied


def _assert_trained_from(
    trainer: Trainer, start: Adapter, record: AdapterRecord, events: list[Delivered], result: Adapter
) -> None:
    """`result` is what training `events` (and `start`'s replay examples) on `start` gives."""
    user = events[0].event.user_id
    job = UserJob("acme", user, record, start, events, stored_examples(trainer.repo, "acme", user, start).replay)
    (expected,), _, _ = train_round(trainer.model, trainer.base.tokenizer, [job], trainer.config)
    for key, (a, b) in expected.weights.items():
        torch.testing.assert_close(result.weights[key][0], a, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(result.weights[key][1], b, atol=1e-4, rtol=1e-3)


# -- the repository's lookup of the newest intact version ---------------------------------------------------------


def test_load_intact_picks_the_newest_intact_older_version(store: ObjectStore, state_url: str, base: BaseModel) -> None:
    spec = AdapterSpec.for_model(base.model, 16, base_fingerprint=base.fingerprint)
    repo = AdapterRepository(Registry(redis_client(state_url), namespace=f"tf{next(_ns)}"), store, spec)
    record = None
    for seed in (1, 2, 3):
        record = repo.publish("acme", "u", make_adapter(base.config, 2, seed=seed), record, seed).record
    assert record is not None and record.version == 3
    assert repo.load_intact("acme", "u", 1) is None

    found = repo.load_intact("acme", "u", 3)
    assert found is not None and found[1] == 2
    assert torch.equal(
        found[0].weights["model.layers.0.self_attn.q_proj"][1],
        make_adapter(base.config, 2, seed=2).weights["model.layers.0.self_attn.q_proj"][1],
    )

    _corrupt(repo, "u")  # v3: the current one is never a candidate anyway
    keys = store.list(user_prefix("acme", "u"))
    v2 = next(k for k in keys if "v000000000002-" in k)
    store.put(v2, store.get(v2)[:-7])  # truncated
    found = repo.load_intact("acme", "u", 4)
    assert found is not None and found[1] == 1  # v3 corrupt, v2 truncated
    store.delete(next(k for k in keys if "v000000000001-" in k))
    assert repo.load_intact("acme", "u", 4) is None
    assert repo.load_intact("acme", "nobody", 10) is None


def test_a_publish_whose_cas_reply_was_lost_and_retried_is_kept(parts: dict[str, Any], base: BaseModel) -> None:
    """A client that retries a CAS whose reply was lost sees a Conflict with its own write: that is success,
    and the object the registry now points to must not be deleted."""
    repo: AdapterRepository = parts["repo"]
    registry: LostReplyRegistry = repo.registry  # type: ignore[assignment]
    registry.lost, registry.retried = 1, True
    published = repo.publish("acme", "r", make_adapter(base.config, 2, seed=1), None, 1)
    record = repo.require("acme", "r")
    assert published.record == record and record.version == 1
    assert repo.load("acme", "r", record).rank == 2
    with pytest.raises(Conflict):  # a real loser still loses, and its object is removed
        repo.publish("acme", "r", make_adapter(base.config, 2, seed=2), None, 1)
    assert len(repo.store.list(user_prefix("acme", "r"))) == 1


# -- the trainer ---------------------------------------------------------------------------------------------------


def test_corrupt_adapter_is_retrained_from_the_newest_intact_version_in_the_same_round(
    parts: dict[str, Any], base: BaseModel
) -> None:
    repo: AdapterRepository = parts["repo"]
    stream: FeedbackStream = parts["stream"]
    trainer = _trainer(base, parts)
    _append(parts, "a", 0, 1)
    _append(parts, "b", 0)
    assert len(trainer.run_round().published) == 2
    v1 = repo.load("acme", "a", repo.require("acme", "a"))
    _append(parts, "a", 2)
    assert trainer.run_round().published == [("acme", "a", 2)]
    current = _corrupt(repo, "a")  # v2, seen 3

    new_a = _append(parts, "a", 3, 4)
    _append(parts, "b", 1)
    report = trainer.run_round()
    assert sorted(report.published) == [("acme", "a", 3), ("acme", "b", 2)]
    assert report.recovered_users == 1
    record = repo.require("acme", "a")
    assert (record.version, record.examples_seen, record.last_event_id) == (3, 5, new_a[-1].event_id)
    assert repo.require("acme", "b").examples_seen == 2
    v3 = repo.load("acme", "a", record)
    _assert_trained_from(trainer, v1, current, new_a, v3)
    # Rehearsal continues from v1's examples: event 2 lived only in the lost v2.
    assert [e.prompt for e in stored_examples(repo, "acme", "a", v3).replay] == [f"Q: {i}?\nA: " for i in (0, 1, 3, 4)]
    assert stream.pending_count("acme", "a") == 0 and stream.lag() == 0
    assert trainer.run_round().published == []


@pytest.mark.parametrize("fault", ["corrupt", "missing"])
def test_lost_adapter_without_an_intact_version_restarts_from_the_seeded_zero(
    parts: dict[str, Any], base: BaseModel, fault: str
) -> None:
    repo: AdapterRepository = parts["repo"]
    trainer = _trainer(base, parts)
    _append(parts, "a", 0)
    trainer.run_round()
    if fault == "corrupt":
        current = _corrupt(repo, "a")
    else:
        current = repo.require("acme", "a")
        assert repo.delete_versions("acme", "a") == 1
        with pytest.raises(NotFound):
            repo.load("acme", "a", current)
    new = _append(parts, "a", 1, 2)
    report = trainer.run_round()
    assert report.published == [("acme", "a", 2)] and report.recovered_users == 1
    record = repo.require("acme", "a")
    assert (record.version, record.examples_seen) == (2, 3)
    _assert_trained_from(trainer, trainer._fresh_adapter("acme", "a"), current, new, repo.load("acme", "a", record))


def test_store_unavailable_for_one_user_defers_only_that_user(parts: dict[str, Any], base: BaseModel) -> None:
    repo: AdapterRepository = parts["repo"]
    stream: FeedbackStream = parts["stream"]
    store: FlakyStore = parts["store"]
    trainer = _trainer(base, parts)
    a = _append(parts, "a", 0)
    b = _append(parts, "b", 0)
    trainer.run_round()

    store.down = user_prefix("acme", "a")
    a += _append(parts, "a", 1, 2)
    b += _append(parts, "b", 1)
    for _ in range(2):
        report = trainer.run_round()
        assert report.deferred_users == 1 and report.users <= 1
        assert repo.require("acme", "a").version == 1 and stream.pending_count("acme", "a") == 2
    assert repo.require("acme", "b").examples_seen == 2  # applied in the first of those rounds
    b += _append(parts, "b", 2)
    trainer.run_round()

    store.down = ""
    assert trainer.run_round().published == [("acme", "a", 2)]
    assert trainer.run_round().published == []
    assert (repo.require("acme", "a").examples_seen, repo.require("acme", "b").examples_seen) == (3, 3)
    assert stream.lag() == 0
    _assert_applied_once(repo, "a", a)
    _assert_applied_once(repo, "b", b)


def test_events_survive_in_memory_when_the_stream_read_fails(parts: dict[str, Any], base: BaseModel) -> None:
    repo: AdapterRepository = parts["repo"]
    stream: CutStream = parts["stream"]
    store: FlakyStore = parts["store"]
    trainer = _trainer(base, parts)
    _append(parts, "a", 0)
    trainer.run_round()
    store.down = user_prefix("acme", "a")
    carried = _append(parts, "a", 1)
    assert trainer.run_round(claim=False).deferred_users == 1
    store.down = ""
    stream.cut = frozenset({"read"})
    with pytest.raises(Unavailable):
        trainer.run_round(claim=False)
    stream.cut = frozenset()
    assert [d.event_id for d in trainer._carry] == [carried[0].event_id]
    assert trainer.run_round(claim=False).published == [("acme", "a", 2)]
    assert repo.require("acme", "a").examples_seen == 2 and stream.lag() == 0


def test_cas_reply_lost_is_recognised_as_applied(parts: dict[str, Any], base: BaseModel) -> None:
    repo: AdapterRepository = parts["repo"]
    stream: FeedbackStream = parts["stream"]
    registry: LostReplyRegistry = repo.registry  # type: ignore[assignment]
    trainer = _trainer(base, parts)
    events = _append(parts, "a", 0, 1)
    registry.lost = 1
    report = trainer.run_round()
    assert report.published == [] and repo.require("acme", "a").version == 1  # written, the trainer never heard
    assert stream.pending_count("acme", "a") == 2
    again = trainer.run_round()
    assert again.skipped_applied == 2 and again.published == []
    record = repo.require("acme", "a")
    assert (record.version, record.examples_seen, record.last_event_id) == (1, 2, events[-1].event_id)
    assert stream.lag() == 0
    _assert_applied_once(repo, "a", events)


def test_ack_lost_after_publish_is_recognised_as_applied(parts: dict[str, Any], base: BaseModel) -> None:
    """Valkey goes away between the registry CAS and the acknowledgement: the round fails, nothing is forgotten,
    and the next round acknowledges the events without training them again."""
    repo: AdapterRepository = parts["repo"]
    stream: CutStream = parts["stream"]
    trainer = _trainer(base, parts)
    events = _append(parts, "a", 0, 1, 2)
    stream.cut = frozenset({"ack"})
    with pytest.raises(Unavailable):
        trainer.run_round()
    stream.cut = frozenset()
    assert repo.require("acme", "a").examples_seen == 3 and stream.pending_count("acme", "a") == 3
    report = trainer.run_round(claim=False)
    assert report.skipped_applied == 3 and report.published == []
    assert repo.require("acme", "a").version == 1 and stream.lag() == 0
    _assert_applied_once(repo, "a", events)


def test_an_older_event_held_by_another_trainer_is_never_skipped(parts: dict[str, Any], base: BaseModel) -> None:
    repo: AdapterRepository = parts["repo"]
    stream: FeedbackStream = parts["stream"]
    events = _append(parts, "a", 0)
    slow_got = stream.read("slow", 1, 0)  # a slower trainer took event 0 and is still training it
    events += _append(parts, "a", 1)
    fast = _trainer(base, parts, "fast")
    report = fast.run_round(claim=False)  # reads event 1 only
    assert report.published == [] and report.deferred_users == 1
    slow = _trainer(base, parts, "slow")
    slow._carry = slow_got
    assert slow.run_round(claim=False).published == [("acme", "a", 1)]
    assert fast.run_round(claim=False).published == [("acme", "a", 2)]
    assert repo.require("acme", "a").examples_seen == 2 and stream.lag() == 0
    _assert_applied_once(repo, "a", events)


def test_unreachable_stream_server_fails_the_round_and_keeps_the_events(
    valkey_url: str, parts: dict[str, Any], base: BaseModel
) -> None:
    """A real connection refused, not a double: the round fails as a whole, carried events stay in memory."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    trainer = _trainer(base, parts)
    held = _append(parts, "a", 0)
    trainer._carry = list(held)
    good = trainer.stream
    trainer.stream = FeedbackStream(redis_client(f"redis://127.0.0.1:{port}/0"), good.config)
    with pytest.raises(Unavailable):
        trainer.run_round()
    assert [d.event_id for d in trainer._carry] == [held[0].event_id]
    trainer.stream = good
    assert trainer.run_round(claim=False).published == [("acme", "a", 1)]


# -- one user's data never stops the trainer --------------------------------------------------------------------


@pytest.mark.parametrize(
    "replay",
    [
        '[{"tenant": "acme", "user_id": "m", "kind": "correct", "prompt": 5, "completion": "x", "correction": "y"}]',
        "[" * 100_000 + "]" * 100_000,  # nesting too deep for the JSON parser
        '{"prompt": "not a list"}',
        '[1, null, "s", [], {"kind": "nonsense", "prompt": "p", "completion": "c"}]',
        "not json",
    ],
)
def test_malformed_replay_metadata_is_skipped_and_every_user_trains(
    parts: dict[str, Any], base: BaseModel, replay: str
) -> None:
    repo: AdapterRepository = parts["repo"]
    stream: FeedbackStream = parts["stream"]
    poisoned = make_adapter(base.config, 2, seed=1)
    repo.publish("acme", "m", Adapter(2, 4.0, poisoned.weights, {"replay": replay}), None, 0)
    trainer = _trainer(base, parts)
    _append(parts, "m", 0)
    _append(parts, "ok", 0)
    report = trainer.run_round()
    assert sorted(report.published) == [("acme", "m", 2), ("acme", "ok", 1)] and report.failed_users == 0
    stored = stored_examples(repo, "acme", "m", repo.load("acme", "m", repo.require("acme", "m")))
    assert [e.prompt for e in stored.replay] == ["Q: 0?\nA: "]
    assert "replay" not in repo.load("acme", "m", repo.require("acme", "m")).metadata  # migrated
    assert stream.lag() == 0


@pytest.mark.parametrize("fault", ["raises", "non-finite"])
def test_a_user_whose_training_fails_is_dead_lettered_alone_and_run_forever_goes_on(
    parts: dict[str, Any], base: BaseModel, fault: str
) -> None:
    """Any exception type or a non-finite loss: the user's events are retried, then dead-lettered; everyone
    else's events are trained in the same rounds, and the trainer's loop never stops."""
    repo: AdapterRepository = parts["repo"]
    stream: FeedbackStream = parts["stream"]
    store: FlakyStore = parts["store"]
    weights = make_adapter(base.config, 2, seed=1).weights
    if fault == "non-finite":
        weights = {k: (a * 1e30, b * 1e30) for k, (a, b) in weights.items()}
    repo.publish("acme", "x", Adapter(2, 4.0, weights), None, 0)
    store.broken = user_prefix("acme", "x") if fault == "raises" else ""
    trainer = _trainer(base, parts)
    held = _append(parts, "x", 0)
    for n in range(trainer.config.max_attempts):
        _append(parts, "ok", n)
        report = trainer.run_round(claim=False)
        assert report.published == [("acme", "ok", n + 1)] and report.failed_users == 1
    assert report.dead_lettered == 1 and stream.pending_count("acme", "x") == 0
    dead = stream.dead_letters(held[0].partition)
    assert [d["id"] for d in dead] == [held[0].event_id] and dead[0]["reason"]
    assert repo.require("acme", "x").version == 1 and trainer._carry == []

    stop = threading.Event()  # the same poison, now under run_forever: it keeps training everyone else
    thread = threading.Thread(target=trainer.run_forever, args=(stop, 0.0), daemon=True)
    thread.start()
    try:
        _append(parts, "x", 1)
        _append(parts, "ok", 9)
        deadline = time.monotonic() + 120
        while (stream.lag() or repo.require("acme", "ok").examples_seen < 4) and time.monotonic() < deadline:
            assert thread.is_alive()
            time.sleep(0.1)
        assert repo.require("acme", "ok").examples_seen == 4 and stream.lag() == 0
        assert len(stream.dead_letters(held[0].partition)) == 2 and thread.is_alive()
    finally:
        stop.set()
        thread.join(30)


# -- retention of stored versions ----------------------------------------------------------------------------------


def test_old_versions_and_lost_race_objects_are_pruned_every_keep_versions_publishes(
    store: ObjectStore, state_url: str, base: BaseModel
) -> None:
    spec = AdapterSpec.for_model(base.model, 16, base_fingerprint=base.fingerprint)
    repo = AdapterRepository(
        Registry(redis_client(state_url), namespace=f"tf{next(_ns)}"), store, spec, keep_versions=3
    )

    def stored() -> list[int]:
        return sorted(v for k in store.list(user_prefix("acme", "u")) if (v := adapter_version(k)) is not None)

    record = None
    for seed in range(1, 6):
        record = repo.publish("acme", "u", make_adapter(base.config, 2, seed=seed), record, seed).record
    assert stored() == [1, 2, 3, 4, 5]  # v3 pruned nothing older than the newest three
    orphan = adapter_key("acme", "u", 6, "sha256:" + "0" * 64)  # a writer that lost the race for v6 and died
    store.put(orphan, b"never visible")
    store.put(adapter_key("acme", "u", 9, "sha256:" + "f" * 64), b"a publish in flight")  # above current: untouched
    assert record is not None
    record = repo.publish("acme", "u", make_adapter(base.config, 2, seed=6), record, 6).record
    assert record.version == 6 and stored() == [4, 5, 6, 9]  # the orphan at v6 went too
    assert repo.load("acme", "u", record) is not None and repo.load_intact("acme", "u", 6) is not None
    assert AdapterRepository(repo.registry, store, spec).prune("acme", "u", record) == 0  # keep all
