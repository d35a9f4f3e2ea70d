"""Consistent hashing with bounded loads (personalize/routing/ring.py): pure, no servers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from personalize.errors import InvalidArgument, Unavailable
from personalize.routing.ring import BoundedLoadBalancer, Ring, key_hash, load_bound, node_points, route_key

ROOT = Path(__file__).resolve().parents[2]
WORKERS = [f"worker-{i}" for i in range(8)]
RING8 = Ring(WORKERS)

node_names = st.text(min_size=1, max_size=12)
node_sets = st.lists(node_names, min_size=1, max_size=6, unique=True)
keys = st.text(max_size=40)


def zipf_users(n_users: int, n_requests: int, s: float = 1.1, seed: int = 0) -> list[int]:
    """Bounded Zipf(s) over ranks 0..n_users-1 (rank 0 hottest), sampled by inverse CDF."""
    cdf = np.cumsum(1.0 / np.arange(1, n_users + 1) ** s)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, np.random.default_rng(seed).random(n_requests), side="right")
    return [int(r) for r in ranks]


# ---- determinism --------------------------------------------------------------------------------


def test_hashes_are_pinned() -> None:
    # A change here re-routes every user of a running cluster during a rolling upgrade: never casual.
    assert key_hash("") == 0x58143F61139CB91B
    assert key_hash(route_key("acme", "alice")) == 0x2EAEECE533052241
    assert node_points("worker-0", 2) == (13443051664704333876, 17162095641441175315)
    assert [RING8.owner(route_key("acme", f"user-{i}")) for i in range(5)] == [
        "worker-7",
        "worker-3",
        "worker-2",
        "worker-4",
        "worker-0",
    ]


@given(node_sets, st.lists(keys, max_size=20))
def test_separately_built_rings_agree(names: list[str], some_keys: list[str]) -> None:
    forward, backward = Ring(names), Ring(list(reversed(names)))
    assert forward == backward
    for key in some_keys:
        assert forward.owner(key) == backward.owner(key)
        assert forward.owners(key) == backward.owners(key)


def test_owners_agree_across_processes_with_other_hash_seeds() -> None:
    script = (
        "import json, sys; from personalize.routing.ring import Ring, route_key; "
        "ring = Ring({f'worker-{i}': 1.0 + i % 3 for i in range(8)}); "
        "json.dump([ring.owners(route_key('t', f'u{i}'), 3) for i in range(1000)], sys.stdout)"
    )
    here = Ring({f"worker-{i}": 1.0 + i % 3 for i in range(8)})
    expected = [here.owners(route_key("t", f"u{i}"), 3) for i in range(1000)]
    for seed in ("1", "4242"):
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": seed},
            timeout=60,
        ).stdout
        assert json.loads(out) == expected


# ---- route keys ---------------------------------------------------------------------------------


@given(st.text(), st.text(), st.text(), st.text())
def test_route_key_is_unambiguous(t1: str, u1: str, t2: str, u2: str) -> None:
    assert (route_key(t1, u1) == route_key(t2, u2)) == ((t1, u1) == (t2, u2))


def test_route_key_length_prefix() -> None:
    assert route_key("ab", "c") != route_key("a", "bc")
    assert route_key("acme", "alice") == "4:acmealice"
    with pytest.raises(TypeError):
        route_key("acme", 7)  # type: ignore[arg-type]


# ---- owners and spill order ---------------------------------------------------------------------


@given(node_sets, keys, st.integers(1, 8))
def test_owners_are_distinct_prefixes_of_the_spill_order(names: list[str], key: str, n: int) -> None:
    ring = Ring(names)
    order = ring.owners(key)
    assert sorted(order) == sorted(names)
    assert order[0] == ring.owner(key)
    assert ring.owners(key, n) == order[:n]


def test_bad_arguments_are_refused() -> None:
    for nodes in ({"a": 0.0}, {"a": -1.0}, {"a": math.nan}, {"": 1.0}, {"a": math.inf}):
        with pytest.raises(InvalidArgument):
            Ring(nodes)
    with pytest.raises(InvalidArgument):
        Ring(["a"], vnodes=0)
    with pytest.raises(InvalidArgument):
        RING8.owners("k", 0)
    with pytest.raises(InvalidArgument):
        RING8.pick("k", {}, eps=-0.1)
    with pytest.raises(Unavailable):
        Ring([]).owner("k")
    with pytest.raises(Unavailable):
        Ring([]).pick("k", {})
    with pytest.raises(KeyError):
        RING8.without_node("nope")


def test_with_and_without_node_return_new_rings() -> None:
    bigger = RING8.with_node("worker-8", 2.0)
    assert len(RING8) == 8 and "worker-8" not in RING8
    assert bigger.nodes["worker-8"] == 2.0 and len(bigger) == 9
    assert bigger.without_node("worker-8") == RING8
    with pytest.raises(TypeError):
        bigger.nodes["x"] = 1.0  # type: ignore[index]


# ---- membership changes move only the changed node's keys ----------------------------------------


@settings(max_examples=50)
@given(node_sets, node_names, st.lists(keys, min_size=1, max_size=50))
def test_a_join_moves_keys_only_to_the_new_node(names: list[str], new: str, some_keys: list[str]) -> None:
    if new in names:
        return
    before, after = Ring(names), Ring(names).with_node(new)
    for key in some_keys:
        assert after.owner(key) in (before.owner(key), new)
        assert [n for n in after.owners(key) if n != new] == before.owners(key)  # spill order kept too


@settings(max_examples=50)
@given(node_sets.filter(lambda names: len(names) > 1), st.lists(keys, min_size=1, max_size=50))
def test_a_leave_moves_only_the_leavers_keys(names: list[str], some_keys: list[str]) -> None:
    before = Ring(names)
    after = before.without_node(names[0])
    for key in some_keys:
        if before.owner(key) != names[0]:
            assert after.owner(key) == before.owner(key)
        else:
            assert after.owner(key) == before.owners(key, 2)[1]  # the next in its spill order


def test_a_join_moves_about_its_fair_share() -> None:
    some_keys = [route_key("t", f"user-{i}") for i in range(100_000)]
    grown = RING8.with_node("worker-8")
    moved = [k for k in some_keys if RING8.owner(k) != grown.owner(k)]
    assert {grown.owner(k) for k in moved} == {"worker-8"}
    assert 0.85 / 9 <= len(moved) / len(some_keys) <= 1.15 / 9


def test_weights_shift_shares_proportionally() -> None:
    ring = Ring({"small": 1.0, "medium": 2.0, "large": 4.0})
    counts = Counter(ring.owner(f"key-{i}") for i in range(70_000))
    for name, weight in ring.nodes.items():
        share = counts[name] / 70_000
        assert share == pytest.approx(weight / 7.0, rel=0.15), name


# ---- bounded loads ------------------------------------------------------------------------------


@given(node_sets, keys, st.lists(st.integers(0, 50), min_size=6, max_size=6), st.sampled_from([0.0, 0.1, 0.25, 1.0]))
def test_pick_takes_the_first_node_with_room(names: list[str], key: str, raw_loads: list[int], eps: float) -> None:
    ring = Ring(names)
    loads = dict(zip(names, raw_loads, strict=False))
    total = sum(loads.values())
    chosen = ring.pick(key, loads, eps)
    order = ring.owners(key)

    def room(n: str) -> bool:
        return loads.get(n, 0) + 1 <= load_bound(total, ring.nodes[n], ring.total_weight, eps)

    assert room(chosen)
    assert not any(room(n) for n in order[: order.index(chosen)])
    assert ring.pick_ranked(key, loads, eps, total_load=total) == (chosen, order.index(chosen))


def test_pick_without_load_is_the_owner() -> None:
    for i in range(100):
        assert RING8.pick(f"k{i}", {}) == RING8.owner(f"k{i}")


@pytest.mark.parametrize("sticky_keys", [0, 65_536])
def test_bounded_loads_hold_under_zipf_skew(sticky_keys: int) -> None:
    eps = 0.25
    requests = zipf_users(100_000, 100_000)
    plain = Counter(RING8.owner(route_key("t", f"user-{user}")) for user in requests)
    assert max(plain.values()) > 1.5 * len(requests) / 8  # the skew overloads plain consistent hashing
    balancer = BoundedLoadBalancer(RING8, eps, sticky_keys=sticky_keys)
    for user in requests:
        balancer.acquire(route_key("t", f"user-{user}"))  # load = requests assigned so far
    loads = balancer.loads()
    assert sum(loads.values()) == len(requests)
    assert max(loads.values()) <= math.ceil((1 + eps) * len(requests) / 8)


def test_pick_with_exclude_skips_and_falls_back() -> None:
    key = "k"
    first, second = RING8.owners(key, 2)
    assert RING8.pick(key, {}, exclude={first}) == second
    # with `first` (the only node with room) excluded, the least loaded of the rest serves
    lightest = next(n for n in WORKERS if n not in (first, second))
    loads = dict.fromkeys(WORKERS, 10.0) | {first: 0.0, lightest: 9.0}
    assert RING8.pick(key, loads, eps=0.0) == first
    assert RING8.pick(key, loads, eps=0.0, exclude={first}) == lightest
    with pytest.raises(Unavailable):
        RING8.pick(key, {}, exclude=set(WORKERS))


def test_balancer_counts_in_flight_requests() -> None:
    balancer = BoundedLoadBalancer(RING8, eps=8.0)  # room for 3 on a node: no spill here
    node = balancer.acquire("k")
    assert node == RING8.owner("k") and balancer.loads()[node] == 1 and balancer.total_load == 1
    with balancer.lease("k") as again:
        assert again == node and balancer.loads()[node] == 2
    balancer.release(node)
    assert balancer.loads()[node] == 0 and balancer.total_load == 0
    with pytest.raises(ValueError):
        balancer.release(node)


def test_balancer_follows_a_new_ring() -> None:
    balancer = BoundedLoadBalancer(RING8, eps=8.0)  # room for 3 on a node: no spill here
    node = balancer.acquire("k")
    balancer.set_ring(RING8.without_node(node))
    assert balancer.total_load == 0  # the leaver's in-flight request no longer counts
    assert balancer.acquire("k") == RING8.owners("k", 2)[1]
    balancer.release(node)  # the old request finishing is still accepted
    assert node not in balancer.loads()


def test_spill_is_sticky_while_the_spill_node_has_room() -> None:
    ring = Ring(["a", "b"])
    key = next(f"k{i}" for i in range(100) if ring.owner(f"k{i}") == "a")
    balancer = BoundedLoadBalancer(ring, eps=0.0)
    filler = next(f"f{i}" for i in range(100) if ring.owner(f"f{i}") == "a")
    balancer.acquire(filler)  # a:1, total 1 -> a's bound for the next request is ceil(2/2) = 1: full
    assert balancer.acquire(key) == "b"
    assert balancer.spilled() == {key: "b"}
    balancer.release("a")
    balancer.release("b")  # a has room again, yet the key stays where its adapter now is
    assert balancer.acquire(key) == "b"
    stateless = BoundedLoadBalancer(ring, eps=0.0, sticky_keys=0)
    stateless.acquire(filler)
    assert stateless.acquire(key) == "b" and stateless.spilled() == {}
    stateless.release("a")
    stateless.release("b")
    assert stateless.acquire(key) == "a"


def test_sticky_memory_is_bounded_and_forgets_departed_nodes() -> None:
    ring = Ring(["a", "b", "c"])
    balancer = BoundedLoadBalancer(ring, eps=0.0, sticky_keys=4)
    for i in range(300):
        balancer.acquire(f"k{i}")  # never released: plenty of spills
    assert 0 < len(balancer.spilled()) <= 4
    gone = next(iter(balancer.spilled().values()))
    balancer.set_ring(ring.without_node(gone))
    assert gone not in balancer.spilled().values()
