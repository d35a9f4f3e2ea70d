"""Placement in service/client/cluster.py over a real small ring (no servers: channels are opened, never used),
and the pure helpers of the worker side and of `up --workers N`."""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from pathlib import Path

import grpc
import pytest

from personalize.errors import Unavailable
from personalize.routing.announce import advertised_address
from personalize.routing.membership import DRAINING, NodeInfo
from personalize.routing.placement import RouteConfig
from personalize.routing.ring import route_key
from personalize_service.cli import launcher, settings
from personalize_service.cli.local_cluster import advertise_list, worker_command, worker_environment
from personalize_service.client.cluster import Cluster

NODES = ("w0", "w1", "w2")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def cluster_of(capacity: float = 4.0, clock: Clock | None = None, **route: float) -> Cluster:
    cluster = Cluster(None, grpc.insecure_channel, RouteConfig(**route), clock=clock or Clock())  # type: ignore[arg-type]
    cluster.apply({n: NodeInfo(n, f"127.0.0.1:{7000 + i}", capacity) for i, n in enumerate(NODES)})
    return cluster


def owners(cluster: Cluster, user: str) -> list[str]:
    return cluster.ring().owners(route_key("t", user))


def test_a_users_calls_stay_on_its_owner_up_to_the_floor_then_bounded_loads_place_them() -> None:
    cluster = cluster_of(capacity=4.0, owner_share=0.5)  # floor: 2 calls of the owner's own keys
    key = route_key("t", "alice")
    first = [cluster.acquire(key) for _ in range(2)]
    assert [t.upstream.node_id for t in first] == [owners(cluster, "alice")[0]] * 2
    assert all(t.on_owner for t in first)
    third = cluster.acquire(key)  # past the floor: the balancer's own count starts at 0 -> owner again
    assert not third.on_owner and third.upstream.node_id == owners(cluster, "alice")[0]
    fourth = cluster.acquire(key)  # the balancer now spills: 1 overflow call in flight on the owner
    assert fourth.upstream.node_id == owners(cluster, "alice")[1]
    assert cluster.in_flight() == {owners(cluster, "alice")[0]: 3, owners(cluster, "alice")[1]: 1}
    for ticket in (*first, third, fourth):
        cluster.release(ticket)
    assert cluster.in_flight() == {}


def test_owner_share_zero_is_plain_bounded_loads() -> None:
    cluster = cluster_of(owner_share=0.0)
    key = route_key("t", "alice")
    tickets = [cluster.acquire(key) for _ in range(2)]
    assert not tickets[0].on_owner and tickets[0].upstream.node_id == owners(cluster, "alice")[0]
    assert tickets[1].upstream.node_id == owners(cluster, "alice")[1]  # 3 nodes, 1 in flight: bound is 1


def test_suspects_are_avoided_until_they_expire_unless_only_they_are_left() -> None:
    clock = Clock()
    cluster = cluster_of(clock=clock, suspect_s=3.0)
    order = owners(cluster, "bob")
    cluster.suspect(order[0])
    assert cluster.acquire(route_key("t", "bob")).upstream.node_id == order[1]
    cluster.suspect(order[1])
    cluster.suspect(order[2])
    assert cluster.acquire(route_key("t", "bob")).upstream.node_id == order[0]  # all suspect: try the owner
    assert cluster.acquire(route_key("t", "bob"), exclude=[order[0]]).upstream.node_id == order[1]
    clock.now += 3.5
    assert cluster.suspects() == set()
    with pytest.raises(Unavailable, match="no worker left"):
        cluster.acquire(route_key("t", "bob"), exclude=NODES)


def test_draining_nodes_leave_the_ring_and_departed_channels_close() -> None:
    cluster = cluster_of()
    channel = cluster.upstream("w1").channel
    view = {n: NodeInfo(n, f"127.0.0.1:{7000 + i}", 4.0) for i, n in enumerate(NODES)}
    cluster.apply({**view, "w1": NodeInfo("w1", view["w1"].address, 4.0, 0.0, DRAINING)})
    assert sorted(cluster.ring().nodes) == ["w0", "w2"] and cluster.upstream("w1").channel is channel
    cluster.apply({n: view[n] for n in ("w0", "w2")})
    with pytest.raises(Unavailable):
        cluster.upstream("w1")
    with pytest.raises(ValueError, match="closed channel"):
        channel.unary_unary("/x/y")(b"", timeout=1)
    cluster.apply({})
    with pytest.raises(Unavailable, match="ring is empty"):
        cluster.acquire(route_key("t", "bob"))


@pytest.mark.parametrize(
    ("host", "port", "advertise", "expected"),
    [
        ("127.0.0.1", 5, "", "127.0.0.1:5"),
        ("::1", 5, "", "[::1]:5"),
        ("0.0.0.0", 5, "worker-3.workers:50051", "worker-3.workers:50051"),
    ],
)
def test_advertised_address(host: str, port: int, advertise: str, expected: str) -> None:
    assert advertised_address(host, port, advertise) == expected


def test_a_wildcard_host_advertises_the_hostname() -> None:
    assert not advertised_address("0.0.0.0", 5).startswith("0.0.0.0")


def test_up_workers_get_the_resolved_settings_and_secrets_only_by_environment(tmp_path: Path) -> None:
    values = settings.resolve(
        settings.UP,
        {"device_cache": "64MiB", "max_batch": "8"},
        {"PERSONALIZE_API_KEYS": "acme:s3cret", "PERSONALIZE_PORT": "1"},
    )
    store = "s3://b/p?endpoint=h:9&access_key=a&secret_key=topsecret"
    command = worker_command(values, "worker-1", tmp_path, 4321, "127.0.0.1:9999")
    text = " ".join(command)
    assert "--role worker --node-id worker-1" in text and "--port 4321" in text and "--device-cache 64MiB" in text
    assert "--advertise-address 127.0.0.1:9999" in text
    assert "--max-batch 8" in text and "s3cret" not in text and "--workers" not in text and "--store-url" not in text
    env = worker_environment(values, store, "redis://:pw@h:1/0")
    assert env["PERSONALIZE_API_KEYS"] == "acme:s3cret" and "PERSONALIZE_PORT" not in env
    assert env["PERSONALIZE_STORE_URL"] == store and env["PERSONALIZE_REGISTRY_URL"] == "redis://:pw@h:1/0"
    assert "pw@" not in text and "--registry-url" not in text


def test_worker_advertise_names_one_address_per_worker() -> None:
    assert advertise_list("", 3) == ["", "", ""]
    assert advertise_list("127.0.0.1:1, h:2,[::1]:3", 3) == ["127.0.0.1:1", "h:2", "[::1]:3"]
    for bad in ("127.0.0.1:1,127.0.0.1:2", "a:1,b:2,c", "a:1,b:x,c:3"):
        with pytest.raises(ValueError, match="give 3 comma-separated host:port"):
            advertise_list(bad, 3)


def test_cluster_banner_lists_the_workers(tmp_path: Path) -> None:
    text = launcher.up_banner(
        50051,
        0,
        "router",
        "built-in tiny model on cpu",
        "",
        "redis://h:1/0",
        tmp_path,
        "file:///x",
        (),
        workers={"worker-1": "127.0.0.1:2", "worker-0": "127.0.0.1:1"},
    )
    assert text.splitlines()[0] == "personalize up: serving on 127.0.0.1:50051"
    assert "over 2 workers" in text and "worker-0 127.0.0.1:1, worker-1 127.0.0.1:2" in text
    assert "workers.json" in text and "  model     built-in tiny model on cpu\n" in text


def test_router_role_needs_only_the_registry() -> None:
    values = settings.resolve(settings.SERVE, {}, {})
    with pytest.raises(launcher.LaunchError, match="--registry-url / PERSONALIZE_REGISTRY_URL;"):
        launcher.run_serve("router", values)
    with pytest.raises(launcher.LaunchError, match="choose one of worker, router, trainer"):
        launcher.run_serve("proxy", values)


def test_up_splits_the_cores_over_its_processes_unless_told() -> None:
    cores = len(os.sched_getaffinity(0))
    values = settings.resolve(settings.UP, {}, {})
    assert values["model.threads"] == 0
    assert launcher.share_cores(values, 4)["model.threads"] == max(1, cores // 4)
    assert launcher.share_cores(values, 1)["model.threads"] == cores
    assert launcher.share_cores({**values, "model.threads": 3}, 4)["model.threads"] == 3
    command = worker_command(launcher.share_cores(values, 10_000), "worker-0", Path("/d"), 1)
    assert "--torch-threads 1" in " ".join(command)


@pytest.mark.parametrize("seed", range(3))
def test_the_router_load_bound_under_skew(seed: int) -> None:
    """What Cluster (the router's placement) promises, checked after every acquire of a skewed, interleaved
    workload (70% of calls for one user): a node holds at most floor = owner_share x capacity calls of its own
    keys, and a call past the floors goes to a node left with at most ceil((1 + eps) x overflow / nodes) of
    the overflow calls in flight (bounded loads; releases elsewhere may later leave it above the new average)."""
    rng = random.Random(seed)
    capacity, eps = 8.0, 0.25
    cluster = cluster_of(capacity=capacity, owner_share=0.5, eps=eps)
    floor = int(0.5 * capacity)
    users = [f"u{i}" for i in range(20)]
    held: list = []
    peak_overflow = 0
    for _ in range(2000):
        if held and rng.random() < 0.45:
            cluster.release(held.pop(rng.randrange(len(held))))
            continue
        user = "hot" if rng.random() < 0.7 else rng.choice(users)
        ticket = cluster.acquire(route_key("t", user))
        held.append(ticket)
        on_owner, overflow = Counter[str](), Counter[str]()
        for each in held:
            (on_owner if each.on_owner else overflow)[each.upstream.node_id] += 1
        total_overflow = sum(overflow.values())
        peak_overflow = max(peak_overflow, total_overflow)
        bound = math.ceil((1 + eps) * total_overflow / len(NODES))
        assert max(on_owner.values(), default=0) <= floor
        if not ticket.on_owner:
            assert overflow[ticket.upstream.node_id] <= bound, (overflow, total_overflow)
        assert cluster.in_flight() == {n: on_owner[n] + overflow[n] for n in NODES if on_owner[n] + overflow[n]}
    assert peak_overflow > 3 * len(NODES)  # the balancer really was exercised past the floors
    for ticket in held:
        cluster.release(ticket)
    assert cluster.in_flight() == {}
