"""Worker membership against a real Valkey: heartbeats, TTL expiry, clean leave, drain, watching."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.cluster

from personalize.errors import InvalidArgument, Unavailable
from personalize.routing.membership import (
    DRAINING,
    SERVING,
    Heartbeat,
    Membership,
    MembershipConfig,
    NodeInfo,
    membership_client,
    pack_node,
    unpack_node,
)
from personalize.routing.ring import Ring
from personalize_service.cli.embedded import EmbeddedValkey, EmbeddedValkeyConfig

FAST = dict(ttl_s=2.0, heartbeat_s=0.1)  # a generous TTL: a busy test machine must not drop live nodes


@pytest.fixture
def client(state_url: str) -> Iterator[redis.Redis]:
    client = membership_client(state_url)  # a redis.Redis, or a RedisCluster for the cluster
    yield client
    client.close()


@pytest.fixture
def config() -> MembershipConfig:
    return MembershipConfig(namespace=f"m{uuid.uuid4().hex[:12]}", **FAST)  # type: ignore[arg-type]


def node(node_id: str, capacity: float = 1.0) -> NodeInfo:
    return NodeInfo(node_id, f"10.0.0.{len(node_id)}:50051", capacity, 0.0, SERVING)


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_node_info_round_trips_and_validates() -> None:
    info = NodeInfo("worker-0", "worker-0.workers:50051", 2.0, 3.5, DRAINING)
    assert unpack_node("worker-0", pack_node(info)) == info
    for bad in (
        dict(node_id=""),
        dict(node_id="a b"),
        dict(capacity=0.0),
        dict(load=-1.0),
        dict(state="gone"),
        dict(address=""),
    ):
        with pytest.raises(InvalidArgument):
            NodeInfo(**{"node_id": "w", "address": "h:1", "capacity": 1.0, "load": 0.0, "state": SERVING, **bad})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        unpack_node("w", b"{not json")
    with pytest.raises(InvalidArgument):
        MembershipConfig(ttl_s=1.0, heartbeat_s=1.0)


def test_heartbeat_appears_with_its_load(client: redis.Redis, config: MembershipConfig) -> None:
    load = [0.0]
    beat = Heartbeat(client, config, node("worker-0"), load_fn=lambda: load[0]).start()
    try:
        membership = Membership(client, config)
        assert membership.nodes() == {"worker-0": node("worker-0")}
        assert 0 < client.pttl(config.node_key("worker-0")) <= 2000
        load[0] = 7.0
        wait_for(lambda: membership.nodes()["worker-0"].load == 7.0)
        assert membership.ring() == Ring(["worker-0"])
    finally:
        beat.stop()


def test_clean_leave_is_immediate(client: redis.Redis, config: MembershipConfig) -> None:
    beats = [Heartbeat(client, config, node(f"worker-{i}")).start() for i in range(3)]
    membership = Membership(client, config)
    assert set(membership.nodes()) == {"worker-0", "worker-1", "worker-2"}
    beats[1].stop(leave=True)
    assert set(membership.nodes()) == {"worker-0", "worker-2"}
    assert client.zrange(config.index_key, 0, -1) == [b"worker-0", b"worker-2"]
    for beat in beats:
        beat.stop()
    assert membership.nodes() == {}


def test_a_silent_node_expires_after_the_ttl(client: redis.Redis, config: MembershipConfig) -> None:
    beat = Heartbeat(client, config, node("worker-0")).start()
    membership = Membership(client, config)
    past_one_ttl = time.monotonic() + 1.5 * config.ttl_s
    while time.monotonic() < past_one_ttl:  # beats keep it alive past one TTL (the TTL is 20 beats long)
        assert "worker-0" in membership.nodes()
        time.sleep(0.05)
    beat.stop(leave=False)  # as if the process died
    assert "worker-0" in membership.nodes() and client.pttl(config.node_key("worker-0")) > 0  # not deleted
    wait_for(lambda: membership.nodes() == {}, timeout_s=config.ttl_s + 10.0)  # expired by the server
    assert client.zcard(config.index_key) == 0  # the reader swept the index


def test_draining_is_visible_and_leaves_the_ring(client: redis.Redis, config: MembershipConfig) -> None:
    beats = [Heartbeat(client, config, node(f"worker-{i}", capacity=4.0)).start() for i in range(2)]
    try:
        membership = Membership(client, config)
        beats[0].drain()
        nodes = membership.nodes()
        assert nodes["worker-0"].state == DRAINING and nodes["worker-1"].state == SERVING
        time.sleep(3 * config.heartbeat_s)
        assert membership.nodes()["worker-0"].state == DRAINING  # later beats keep the state
        assert membership.ring() == Ring({"worker-1": 1.0})
    finally:
        for beat in beats:
            beat.stop()


class _HeldFirstWrite:
    """A real client whose first pipeline holds its write until `release` is set: a beat stalled between
    taking its snapshot and writing it (a slow round trip), as a periodic beat can be when drain() is called."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self.connection_pool = client.connection_pool
        self.holding, self.release = threading.Event(), threading.Event()

    def pipeline(self, transaction: bool = False) -> object:
        pipe, first = self._client.pipeline(transaction=transaction), not self.holding.is_set()
        if first:
            self.holding.set()
            execute = pipe.execute

            def held_execute() -> object:
                assert self.release.wait(10.0)
                return execute()

            pipe.execute = held_execute  # type: ignore[method-assign]
        return pipe


def test_a_beat_in_flight_cannot_overwrite_draining(valkey_url: str, config: MembershipConfig) -> None:
    client = membership_client(valkey_url)
    held = _HeldFirstWrite(client)
    beat = Heartbeat(held, config, node("worker-0"))  # not started: the test plays the periodic beat
    in_flight = threading.Thread(target=beat.beat)
    in_flight.start()
    assert held.holding.wait(10.0)  # the beat took its SERVING snapshot and is writing it
    draining = threading.Thread(target=beat.drain)
    draining.start()
    time.sleep(0.3)  # drain() had time to write DRAINING if nothing orders it after the beat in flight
    held.release.set()
    in_flight.join(10.0)
    draining.join(10.0)
    try:
        assert Membership(client, config).nodes()["worker-0"].state == DRAINING
    finally:
        beat.stop()
        client.close()


def test_ring_weights_follow_capacity(client: redis.Redis, config: MembershipConfig) -> None:
    beats = [Heartbeat(client, config, node("small", 2.0)).start(), Heartbeat(client, config, node("big", 4.0)).start()]
    try:
        assert Membership(client, config).ring(vnodes=40) == Ring({"small": 0.5, "big": 1.0}, vnodes=40)
    finally:
        for beat in beats:
            beat.stop()


def test_watch_fires_on_join_drain_and_leave_not_on_load(client: redis.Redis, config: MembershipConfig) -> None:
    seen: list[dict[str, str]] = []
    changed = threading.Event()

    def on_change(nodes: dict[str, NodeInfo]) -> None:
        seen.append({node_id: info.state for node_id, info in nodes.items()})
        changed.set()

    load = [0.0]
    first = Heartbeat(client, config, node("worker-0"), load_fn=lambda: load[0]).start()
    with Membership(client, config).watch(on_change, poll_s=0.05) as watcher:
        assert seen == [{"worker-0": SERVING}]  # the first view, synchronously
        second = Heartbeat(client, config, node("worker-1")).start()
        wait_for(lambda: len(seen) == 2)
        assert seen[1] == {"worker-0": SERVING, "worker-1": SERVING}
        assert watcher.ring() == Ring(["worker-0", "worker-1"])
        load[0] = 5.0  # load changes are not membership changes, yet the view carries them
        wait_for(lambda: watcher.current()["worker-0"].load == 5.0)
        second.drain()
        wait_for(lambda: len(seen) == 3)
        assert seen[2] == {"worker-0": SERVING, "worker-1": DRAINING}
        second.stop()
        wait_for(lambda: len(seen) == 4)
        assert seen[3] == {"worker-0": SERVING}
    first.stop()
    assert len(seen) == 4


def test_binary_clients_only(valkey_url: str, config: MembershipConfig) -> None:
    text_client = redis.Redis.from_url(valkey_url, decode_responses=True)
    with pytest.raises(InvalidArgument):
        Membership(text_client, config)
    text_client.close()


def test_unreachable_server_is_unavailable_and_the_watcher_keeps_its_view(
    tmp_path: Path, config: MembershipConfig
) -> None:
    server = EmbeddedValkey(EmbeddedValkeyConfig(data_dir=tmp_path)).start()
    client = redis.Redis.from_url(server.url, decode_responses=False, socket_timeout=0.5, socket_connect_timeout=0.5)
    beat = Heartbeat(client, config, node("worker-0")).start()
    watcher = Membership(client, config).watch(poll_s=0.05)
    try:
        assert set(watcher.current()) == {"worker-0"}
        server.stop()
        wait_for(lambda: watcher.last_error is not None)
        assert set(watcher.current()) == {"worker-0"}  # stale, not empty
        with pytest.raises(Unavailable):
            Membership(client, config).nodes()
        with pytest.raises(Unavailable):
            Heartbeat(client, config, node("worker-1")).beat()
    finally:
        watcher.stop()
        beat.stop()  # best effort while the server is down: must not raise
        client.close()
        server.stop()
