"""`personalize up --workers 3`: worker processes behind the consistent-hash router, one cluster for the
module. The tests run in order: each user sticks to one worker; a SIGKILLed worker's users move to the
others and no acknowledged feedback is lost; a joining worker takes only its share of users (and gives
them back when it leaves)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from personalize.routing.membership import Membership, MembershipConfig, membership_client
from personalize_service.cli.embedded import running_url
from personalize_service.client import PersonalizeClient
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.net import find_free_port
from tests.e2e.upserver import TEST_FLAGS, Stubs, UpServer, start_server, start_up

TTL_S = 3.0
"""Membership TTL: a dead worker leaves the ring this long after its last beat."""
USERS = [f"user-{i}" for i in range(36)]


@dataclass
class Cluster:
    up: UpServer
    stubs: Stubs
    registry_url: str
    workers: dict[str, dict[str, int]]
    """workers.json: node id -> {pid, port}."""
    acked: dict[str, int] = field(default_factory=dict)
    """Feedback events acknowledged per user."""

    def logs(self) -> str:
        tails = [self.up.log()[-3000:]]
        for path in sorted((self.up.data_dir / "workers").glob("*/worker.log")):
            tails.append(f"--- {path}\n{path.read_text(errors='replace')[-1500:]}")
        return "\n".join(tails)

    def node_of(self, user: str) -> str:
        return self.stubs.api.Generate(
            pb.GenerateRequest(user_id=user, prompt="Hi", max_new_tokens=1), timeout=30
        ).node_id

    def live_nodes(self) -> dict[str, str]:
        return {n.node_id: n.state for n in self.stubs.admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    up = start_up(
        root / "data",
        root / "up.log",
        "--workers",
        "3",
        "--train-steps",
        "2",
        "--metrics-port",
        str(find_free_port()),
        "--worker-restarts",
        "0",
    )  # a killed worker stays down here
    registry = re.search(r"embedded Valkey (redis://\S+)", up.log())
    assert registry is not None and ":***@" in registry[1], up.log()  # the banner masks the password
    with up.channel() as channel:
        workers = json.loads((up.data_dir / "workers.json").read_text())
        yield Cluster(up, Stubs.on(channel), running_url(up.data_dir / "valkey"), workers)
    assert up.stop() == 0, up.log()[-4000:]
    assert not (up.data_dir / "workers.json").exists()


def test_each_user_sticks_to_one_worker_and_users_spread(cluster: Cluster) -> None:
    assert cluster.live_nodes() == {"worker-0": "up", "worker-1": "up", "worker-2": "up"}
    landed = {user: {cluster.node_of(user) for _ in range(2)} for user in USERS}
    assert all(len(nodes) == 1 for nodes in landed.values()), landed
    assert len(set().union(*landed.values())) >= 2
    chunks = list(
        cluster.stubs.api.GenerateStream(
            pb.GenerateRequest(user_id=USERS[0], prompt="Hi", max_new_tokens=4), timeout=30
        )
    )
    assert chunks[-1].done and {chunks[-1].final.node_id} == landed[USERS[0]]
    stats = cluster.stubs.admin.Stats(pb.StatsRequest(), timeout=30)
    assert sorted(n.node_id for n in stats.nodes) == ["worker-0", "worker-1", "worker-2"] and not stats.degraded
    metrics_url = re.search(r"metrics   (http://\S+)", cluster.up.log())
    assert metrics_url is not None
    samples = [
        sample
        for family in text_string_to_metric_families(urllib.request.urlopen(metrics_url[1], timeout=10).read().decode())
        for sample in family.samples
    ]
    forwarded = sum(
        s.value
        for s in samples
        if s.name == "personalize_router_forwarded_total" and s.labels["rpc"] == "Generate" and s.labels["code"] == "OK"
    )
    assert forwarded >= 2 * len(USERS)
    assert [s.value for s in samples if s.name == "personalize_router_workers"] == [3.0]


class Load:
    """Generate calls for every user in a loop on a thread, each call's outcome recorded with its time;
    through the router's stubs, or through the SDK (`client`: its retries on UNAVAILABLE on top)."""

    def __init__(self, cluster: Cluster, client: PersonalizeClient | None = None) -> None:
        self.cluster = cluster
        self.client = client
        self.outcomes: list[tuple[float, str, str]] = []  # (time, user, node id or status code name)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            for user in USERS:
                try:
                    if self.client is None:
                        outcome = self.cluster.node_of(user)
                    else:
                        outcome = self.client.generate(user, "Hi", max_new_tokens=1).node_id
                except grpc.RpcError as exc:
                    outcome = exc.code().name
                self.outcomes.append((time.monotonic(), user, outcome))
                if self._stop.is_set():
                    return


def _feedback_round(client: PersonalizeClient, cluster: Cluster, users: list[str], tag: str) -> None:
    for user in users:
        client.feedback(user, "Say hi", f"Hello from {tag}", kind="accept")
        cluster.acked[user] = cluster.acked.get(user, 0) + 1


def test_a_killed_worker_is_routed_around_and_no_feedback_is_lost(cluster: Cluster) -> None:
    owner = {user: cluster.node_of(user) for user in USERS}
    victim = max(set(owner.values()), key=lambda n: list(owner.values()).count(n))
    victims = [u for u in USERS if owner[u] == victim]
    fed = USERS[::3] + [u for u in victims if u not in USERS[::3]][:4]
    with (
        PersonalizeClient(cluster.up.target, timeout=30) as client,
        Load(cluster) as load,
        PersonalizeClient(cluster.up.target, timeout=30) as sdk,
        Load(cluster, sdk) as sdk_load,
    ):
        _feedback_round(client, cluster, fed, "before")
        deadline = time.monotonic() + 60
        while len(load.outcomes) < len(USERS) or len(sdk_load.outcomes) < len(USERS):  # both loads running
            assert time.monotonic() < deadline, cluster.logs()
            time.sleep(0.05)
        killed_at = time.monotonic()
        os.kill(cluster.workers[victim]["pid"], signal.SIGKILL)
        _feedback_round(client, cluster, fed, "during")  # every ack must come, retried on another worker
        moved = {user: cluster.node_of(user) for user in victims}
        assert victim not in moved.values()
        deadline = killed_at + TTL_S + 5.0
        while victim in cluster.live_nodes():
            assert time.monotonic() < deadline, f"{victim} still listed:\n{cluster.logs()}"
            time.sleep(0.2)
        _feedback_round(client, cluster, fed, "after")
        while time.monotonic() < killed_at + TTL_S + 2.5:  # the load runs on past the TTL
            time.sleep(0.1)
    # Through the SDK (router failover + 2 retries with backoff) no call fails at all, kill included.
    during = [o for t, _, o in sdk_load.outcomes if t > killed_at]
    assert during and all(o.startswith("worker-") for _, _, o in sdk_load.outcomes), [
        (round(t - killed_at, 2), u, o) for t, u, o in sdk_load.outcomes if not o.startswith("worker-")
    ][:10]
    late = [(t - killed_at, u, o) for t, u, o in load.outcomes if t > killed_at + TTL_S + 1.0]
    assert late and all(o.startswith("worker-") and o != victim for _, _, o in late), late[:10]
    assert cluster.up.process.poll() is None  # up keeps serving (--worker-restarts 0: the worker stays down)
    _wait_trained(cluster, fed)


def _wait_trained(cluster: Cluster, users: list[str], timeout_s: float = 90.0) -> None:
    """Every acknowledged event of `users` is applied exactly once: examples_seen == acks, none pending."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {}
        for user in users:
            info = cluster.stubs.api.GetAdapter(pb.GetAdapterRequest(user_id=user), timeout=30)
            seen[user] = (info.examples_seen, info.pending_events)
        if all(seen[u] == (cluster.acked[u], 0) for u in users):
            return
        assert all(examples <= cluster.acked[u] for u, (examples, _) in seen.items()), (seen, cluster.acked)
        assert time.monotonic() < deadline, f"not all trained: {seen} vs {cluster.acked}\n{cluster.logs()}"
        time.sleep(0.5)


def test_a_joining_worker_takes_only_its_share_and_gives_it_back(cluster: Cluster, tmp_path: Path) -> None:
    before = {user: cluster.node_of(user) for user in USERS}
    live = len(cluster.live_nodes())
    command = [
        sys.executable,
        "-m",
        "personalize_service.cli",
        "serve",
        "--role",
        "worker",
        "--node-id",
        "worker-3",
        "--registry-url",
        cluster.registry_url,
        "--store-url",
        (cluster.up.data_dir / "store").as_uri(),
        "--data-dir",
        str(tmp_path / "worker-3"),
        "--port",
        "0",
        "--grace-s",
        "5",
        *TEST_FLAGS,
    ]
    joiner = start_server(command, tmp_path / "worker-3", tmp_path / "worker-3.log")
    try:
        deadline = time.monotonic() + 30  # a start and a router poll; CI's 2 cores are busy with the others
        while cluster.live_nodes().get("worker-3") != "up":
            assert time.monotonic() < deadline, joiner.log()[-3000:]
            time.sleep(0.1)
        after = {user: cluster.node_of(user) for user in USERS}
    finally:
        assert joiner.stop() == 0, joiner.log()[-3000:]
    moved = [u for u in USERS if after[u] != before[u]]
    assert moved and all(after[u] == "worker-3" for u in moved), (before, after)
    assert len(moved) <= 1.6 * len(USERS) / (live + 1), (len(moved), live)
    # A clean leave deletes the record at once (ordering, not timing: it is gone before the TTL could have
    # expired it, since the worker was beating until SIGTERM); the router drops it at a later poll.
    members = Membership(membership_client(cluster.registry_url), MembershipConfig())
    assert "worker-3" not in members.nodes()
    deadline = time.monotonic() + 60
    while "worker-3" in cluster.live_nodes():
        assert time.monotonic() < deadline, cluster.logs()
        time.sleep(0.1)
    assert {user: cluster.node_of(user) for user in USERS} == before
