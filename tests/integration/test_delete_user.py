"""DeleteUser removes every copy of a user: a real worker (real Valkey, a real file:// or SeaweedFS S3 store,
the device, host and disk cache tiers, the feedback stream) is given a user with adapters resident in every
tier and feedback still pending, then each place is looked into after the delete."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from s3server import S3Server

from personalize import bootstrap
from personalize.adapters.registry import RegistryConfig
from personalize.adapters.store.keys import user_digest, user_prefix
from personalize.config import Config, LoraConfig
from personalize.engine.types import SamplingParams
from personalize.errors import NotFound, Unavailable
from personalize.feedback.events import FeedbackEvent
from personalize.feedback.trainer import Trainer, TrainerConfig
from personalize.lora.format import random_adapter, write_peft
from personalize.lora.slots import slot_nbytes
from personalize.model import default_llama_config
from personalize.worker import Worker

T = "acme"
R_MAX = 8
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(params=["file", "s3", "file-cluster"])
def worker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Worker]:
    """A started worker wired by `bootstrap` as `personalize serve` wires it: 4 device slots, host RAM and a
    disk tier under its data dir, the feedback stream on the (flushed) session Valkey, or for file-cluster
    on the (flushed) Valkey Cluster through a redis+cluster:// URL."""
    if request.param == "file-cluster":
        cluster = request.getfixturevalue("valkey_cluster")
        cluster.flush()
        valkey_url = cluster.url
    else:
        request.getfixturevalue("redis_client")  # flushes the session Valkey
        valkey_url = request.getfixturevalue("valkey_url")
    if request.param.startswith("file"):
        store_url = (tmp_path / "objects").as_uri()
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        store_url = server.s3_url("pz-tests", f"delete/{tmp_path.name}")
    slot = slot_nbytes(default_llama_config(), R_MAX)
    config = Config(
        data_dir=str(tmp_path / "data"),
        load_timeout_s=10.0,
        lora=LoraConfig(r_max=R_MAX, device_bytes=4 * slot, host_bytes=1 << 24, disk_bytes=1 << 24),
    )
    w = bootstrap.worker(replace(config, registry=RegistryConfig(url=valkey_url), store_url=store_url))
    w.start()
    yield w
    w.stop()


def give_adapter(worker: Worker, user_id: str, seed: int) -> int:
    adapter = random_adapter(worker.spec, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(seed), std=0.2)
    return worker.import_adapter(T, user_id, write_peft(adapter, worker.spec)).version


def serve_once(worker: Worker, user_id: str) -> str:
    """One generation with the user's current adapter; returns the tier it was found in."""
    generation = worker.generate(T, user_id, "Hello", GREEDY)
    generation.result(30)
    return generation.info.cache_tier


def feedback(worker: Worker, user_id: str, n: int) -> list[str]:
    return [
        worker.submit_feedback(FeedbackEvent(T, user_id, "accept", f"prompt {i}", f"answer {i}"))[0] for i in range(n)
    ]


def cached_users(worker: Worker) -> dict[str, set[str]]:
    """tier -> users with an entry in it, read from where each tier keeps its adapters: the slot table, the
    host LRU, and the files of the disk directory (named by a hash of the user, never the user id)."""
    cache = worker.cache
    disk_dir = Path(worker.config.data_dir).resolve() / "cache"
    users = {"u", "v"}
    digests = {user_digest(T, u)[:16].hex(): u for u in users}
    with cache._lock:  # no public listing of entries: look at the tiers' own containers
        device = {key[1] for key in cache._slots.keys if key is not None}
        host_keys = cache._host.keys()  # a ByteLRU, not a dict
    host = {key[1] for key in host_keys}
    disk = {digests[f.parent.name] for f in disk_dir.rglob("*.adapter") if f.parent.name in digests}
    return {"device": device, "host": host, "disk": disk}


def stream_ids(worker: Worker, user_id: str) -> tuple[set[str], set[str]]:
    """(ids in the user's partition stream, ids pending in the trainers' group) as Valkey holds them."""
    stream = worker.stream
    assert stream is not None
    key = stream.stream_key(stream.partition_of(T, user_id))
    entries = {i.decode() for i, _ in stream.client.xrange(key)}
    delivered = {
        row["message_id"].decode()
        for row in stream.client.xpending_range(key, stream.config.group, "-", "+", count=1000)
    }
    return entries, delivered


def test_delete_user_removes_every_copy(worker: Worker) -> None:
    assert worker.stream is not None
    for user_id, seed in (("u", 1), ("v", 2)):
        assert give_adapter(worker, user_id, seed) == 1
        assert serve_once(worker, user_id) == "store"
    assert give_adapter(worker, "u", seed=3) == 2  # u has two stored versions
    assert serve_once(worker, "u") == "store"
    assert cached_users(worker) == {"device": {"u", "v"}, "host": {"u", "v"}, "disk": {"u", "v"}}

    worker.stream.ensure_group()  # a trainer read the first events and died before acknowledging them
    delivered_early = feedback(worker, "u", 3) + feedback(worker, "v", 1)
    assert {d.event_id for d in worker.stream.read("crashed-trainer", count=100, block_ms=0)} == set(delivered_early)
    u_events = delivered_early[:3] + feedback(worker, "u", 1)  # and one no trainer has seen
    v_events = [delivered_early[3]]
    assert worker.stream.pending_ids(T, "u") == set(u_events)
    assert len(worker.store.list(user_prefix(T, "u"))) == 2

    assert worker.delete_user(T, "u") == (2, 4)

    assert worker.store.list(user_prefix(T, "u")) == []  # store: no object under the user's prefix
    assert worker.registry.get(T, "u") is None  # registry: no record
    assert cached_users(worker) == {"device": {"v"}, "host": {"v"}, "disk": {"v"}}  # no cached copy
    disk_dir = Path(worker.config.data_dir).resolve() / "cache"
    assert not (disk_dir / user_digest(T, "u")[:16].hex()).exists()
    entries, delivered = stream_ids(worker, "u")  # feedback: gone from the stream and the group's pending list
    assert not set(u_events) & (entries | delivered)
    assert worker.stream.pending_ids(T, "u") == set()
    pending_key = worker.stream._pending_key(T, "u")[1]
    assert not worker.stream.client.exists(pending_key)
    with pytest.raises(NotFound):
        worker.get_adapter(T, "u")

    # the other user is untouched
    assert worker.get_adapter(T, "v").version == 1 and worker.stream.pending_ids(T, "v") == set(v_events)
    assert set(v_events) <= stream_ids(worker, "v")[0] and len(worker.store.list(user_prefix(T, "v"))) == 1
    assert serve_once(worker, "v") == "device"

    # and the deleted user starts over: base model, then a new v1 served from the store
    generation = worker.generate(T, "u", "Hello", GREEDY)
    generation.result(30)
    assert (generation.info.adapter_version, generation.info.cache_tier) == (0, "none")
    assert give_adapter(worker, "u", seed=4) == 1 and serve_once(worker, "u") == "store"


def test_a_user_deleted_through_another_worker_leaves_this_workers_hot_list(worker: Worker) -> None:
    """DeleteUser runs on one worker (the user's owner); another that served the user before a ring change
    still caches the adapter until it ages out, and must stop naming the user in its published hot list."""
    for user_id, seed in (("u", 1), ("v", 2)):
        give_adapter(worker, user_id, seed)
        serve_once(worker, user_id)
    assert sorted(worker.hot_users(64)) == [(T, "u"), (T, "v")]
    worker.registry.delete(T, "u")  # what the owner's delete_user does first; this worker's cache is untouched
    assert (T, "u") in worker.cache.hottest(64)
    assert worker.hot_users(64) == [(T, "v")]


def test_delete_user_while_a_generation_holds_the_slot(worker: Worker) -> None:
    """A request in flight keeps its pinned slot to the end; the slot is freed when it is released, and no
    new request finds the deleted adapter meanwhile."""
    give_adapter(worker, "u", seed=5)
    running = worker.generate(T, "u", "Hello", SamplingParams(max_new_tokens=600, ignore_eos=True))
    assert running.info.adapter_version == 1  # it holds the slot of the adapter about to be deleted
    assert worker.delete_user(T, "u") == (1, 0)
    after = worker.generate(T, "u", "Hello", GREEDY)
    after.result(30)
    assert (after.info.adapter_version, after.info.cache_tier) == (0, "none")
    assert running.result(60).completion_tokens == 600  # ran to the end, not cut off by the delete
    worker.engine.submit("flush", GREEDY).result(30)  # the engine released the lease before this finished
    assert cached_users(worker) == {"device": set(), "host": set(), "disk": set()}
    assert worker.cache.stats()["resident"] == {"device": 0, "host": 0, "disk": 0}


def test_import_keeps_applied_events_applied_after_a_trainer_crash(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer publishes a user's events and dies before acking them; the user then imports an adapter. The
    restarted trainer must see those events as applied, not train them onto the imported adapter."""
    assert worker.stream is not None
    worker.stream.ensure_group()
    ids = feedback(worker, "crash", 2)
    config = TrainerConfig(steps=1, min_steps=1, max_steps=1, block_ms=50, linger_ms=0, claim_idle_ms=0)
    trainer = Trainer(config, worker.base, worker.repo, worker.stream, consumer="t")

    real_ack = worker.stream.ack

    def crash(tenant: str, user_id: str, ids: list[str]) -> int:
        if ids:
            raise Unavailable("trainer killed between publish and ack")
        return real_ack(tenant, user_id, ids)

    with monkeypatch.context() as patch:
        patch.setattr(worker.stream, "ack", crash)
        with pytest.raises(Unavailable, match="between publish and ack"):
            trainer.run_round()
    assert worker.repo.require(T, "crash").last_event_id == ids[-1]
    assert worker.stream.pending_count(T, "crash") == 2  # published, never acked

    assert give_adapter(worker, "crash", seed=5) == 2
    assert worker.repo.require(T, "crash").last_event_id == ids[-1]
    restarted = Trainer(config, worker.base, worker.repo, worker.stream, consumer="t")
    report = restarted.run_round()
    assert report.published == [] and report.skipped_applied == 2
    assert worker.repo.require(T, "crash").version == 2 and worker.stream.pending_count(T, "crash") == 0
