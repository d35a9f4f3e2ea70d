"""Routing benchmark: consistent hashing with bounded loads against round robin, simulated.

ring            lookup cost (route_key + owner / pick / balancer acquire+release), the share of users a
                joining worker takes (8 -> 9 workers) against the ideal 1/9, and max / average worker
                load when Zipf(1.1)-skewed requests are assigned with bounded loads.
cache_hit_rate  each worker an LRU of adapters; the same Zipf request stream routed by the ring (bounded
                loads, sticky spill), by the ring with stateless spill, by round robin, and to one ideal
                LRU with the whole capacity. miss_ratio = round-robin misses / consistent-hash misses.
cluster         (--cluster) real workers and router: not implemented yet, reported as null.

    python loadtest/bench_routing.py [--quick] [--json loadtest/results/bench_routing.json] [--cluster]

Pure CPU, one process. Zipf samples are a bounded Zipf over the user ranks (inverse CDF, seeded); the
load of a worker is the number of requests assigned to it so far (no request ever finishes).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personalize.routing.ring import DEFAULT_STICKY_KEYS, DEFAULT_VNODES, BoundedLoadBalancer, Ring, route_key

TENANT = "bench"
TARGETS: dict[str, tuple[str, float]] = {
    "ring.lookup_us_p50": ("<=", 5.0),
    "ring.moved_over_ideal": ("<=", 1.15),
    "ring.max_over_avg_load": ("<=", 1.25),
    "cache_hit_rate.consistent_hash_over_ideal": (">=", 0.97),
    "cache_hit_rate.miss_ratio": (">=", 1.5),
}


def zipf_ranks(n_users: int, n_requests: int, s: float, seed: int) -> list[int]:
    """n_requests user ranks in [0, n_users), P(rank k) ∝ 1/(k+1)^s, rank 0 hottest."""
    cdf = np.cumsum(1.0 / np.arange(1, n_users + 1, dtype=np.float64) ** s)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, np.random.default_rng(seed).random(n_requests), side="right")
    return np.minimum(ranks, n_users - 1).tolist()  # type: ignore[no-any-return]


def user_key(rank: int) -> str:
    return route_key(TENANT, f"user-{rank}")


# ---- ring figures -------------------------------------------------------------------------------

def per_call_us(fn: Callable[[Sequence[str]], None], batches: list[list[str]]) -> float:
    """Median over batches of the mean time of one call in the batch, microseconds."""
    times = []
    for batch in batches:
        start = time.perf_counter_ns()
        fn(batch)
        times.append((time.perf_counter_ns() - start) / len(batch) / 1000)
    return statistics.median(times)


def lookup_timings(ring: Ring, calls: int) -> dict[str, float]:
    """p50 of route_key + owner, route_key + pick, and balancer acquire + release (8 busy workers)."""
    user_ids = [f"user-{i}" for i in range(calls)]
    batches = [user_ids[i:i + 1000] for i in range(0, calls, 1000)]
    loads = {name: 100.0 + i for i, name in enumerate(ring.nodes)}  # busy, nobody over the bound
    balancer = BoundedLoadBalancer(ring)

    def owner(batch: Sequence[str]) -> None:
        for user_id in batch:
            ring.owner(route_key(TENANT, user_id))

    def pick(batch: Sequence[str]) -> None:
        for user_id in batch:
            ring.pick(route_key(TENANT, user_id), loads)

    def acquire(batch: Sequence[str]) -> None:
        for user_id in batch:
            balancer.release(balancer.acquire(route_key(TENANT, user_id)))

    per_call_us(owner, batches[:10])  # warm up caches and the allocator
    return {"lookup_us_p50": per_call_us(owner, batches), "pick_us_p50": per_call_us(pick, batches),
            "acquire_release_us_p50": per_call_us(acquire, batches)}


def moved_on_join(nodes: int, users: int) -> dict[str, Any]:
    """Share of `users` whose owner changes when worker `nodes` joins workers 0..nodes-1."""
    before = Ring([f"worker-{i}" for i in range(nodes)])
    new = f"worker-{nodes}"
    after = before.with_node(new)
    moved = 0
    elsewhere = 0  # moved between two old workers: must stay 0
    for rank in range(users):
        key = user_key(rank)
        old, now = before.owner(key), after.owner(key)
        if old != now:
            moved += 1
            elsewhere += now != new
    ideal = 1 / (nodes + 1)
    return {"moved_fraction_on_join": moved / users, "ideal_fraction": ideal,
            "moved_over_ideal": moved / users / ideal, "moved_between_old_workers": elsewhere}


# ---- routing a request stream -------------------------------------------------------------------

def route_stream(ranks: list[int], nodes: list[str], route: str, eps: float) -> list[int]:
    """The worker index of every request: `bounded` (balancer, sticky spill), `stateless` (balancer,
    spill walks the ring every time), `plain` (owner, no bound) or `round_robin`."""
    if route == "round_robin":
        return [i % len(nodes) for i in range(len(ranks))]
    ring = Ring(nodes)
    index = {name: i for i, name in enumerate(nodes)}
    keys: dict[int, str] = {}
    if route == "plain":
        owner_of: dict[int, int] = {}
        for rank in set(ranks):
            owner_of[rank] = index[ring.owner(user_key(rank))]
        return [owner_of[rank] for rank in ranks]
    balancer = BoundedLoadBalancer(ring, eps, sticky_keys=0 if route == "stateless" else DEFAULT_STICKY_KEYS)
    out = []
    for rank in ranks:
        key = keys.get(rank)
        if key is None:
            key = keys[rank] = user_key(rank)
        out.append(index[balancer.acquire(key)])  # never released: load = requests so far
    return out


def max_over_avg(assigned: list[int], n_nodes: int) -> float:
    counts = Counter(assigned)
    return max(counts.values()) / (len(assigned) / n_nodes)


def lru_hit_rate(ranks: list[int], assigned: list[int], n_nodes: int, per_node: int) -> float:
    """Hit rate when request i goes to worker assigned[i], each worker an LRU of `per_node` adapters."""
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(n_nodes)]
    hits = 0
    for rank, node in zip(ranks, assigned, strict=True):
        cache = caches[node]
        if rank in cache:
            cache.move_to_end(rank)
            hits += 1
        else:
            cache[rank] = None
            if len(cache) > per_node:
                cache.popitem(last=False)
    return hits / len(ranks)


def simulate(cfg: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(ring load figures, cache hit rates) for one Zipf request stream."""
    ranks = zipf_ranks(cfg["users"], cfg["requests"], cfg["zipf_s"], cfg["seed"])
    cfg["hottest_user_share"] = Counter(ranks).most_common(1)[0][1] / len(ranks)
    n, per_node = cfg["nodes"], cfg["adapters_per_node"]
    nodes = [f"worker-{i}" for i in range(n)]
    routes = {route: route_stream(ranks, nodes, route, cfg["eps"])
              for route in ("bounded", "stateless", "plain", "round_robin")}
    loads = {"max_over_avg_load": max_over_avg(routes["bounded"], n),
             "max_over_avg_load_stateless_spill": max_over_avg(routes["stateless"], n),
             "max_over_avg_load_unbounded": max_over_avg(routes["plain"], n)}
    hits = {"consistent_hash": lru_hit_rate(ranks, routes["bounded"], n, per_node),
            "consistent_hash_stateless_spill": lru_hit_rate(ranks, routes["stateless"], n, per_node),
            "consistent_hash_unbounded": lru_hit_rate(ranks, routes["plain"], n, per_node),
            "round_robin": lru_hit_rate(ranks, routes["round_robin"], n, per_node),
            "ideal": lru_hit_rate(ranks, [0] * len(ranks), 1, per_node * n)}
    hits["consistent_hash_over_ideal"] = hits["consistent_hash"] / hits["ideal"]
    hits["miss_ratio"] = (1 - hits["round_robin"]) / (1 - hits["consistent_hash"])
    return loads, hits


# ---- real cluster (later) -----------------------------------------------------------------------

def measure_cluster(args: argparse.Namespace) -> dict[str, Any] | None:
    """Router overhead and hit rates on real worker processes behind the router. Not implemented
    yet: returns None, and the figures it will provide are reported as null."""
    return None


# ---- report -------------------------------------------------------------------------------------

def flatten(result: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_targets(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    checks = {}
    for name, (op, bound) in TARGETS.items():
        value = flat[name]
        ok = value <= bound if op == "<=" else value >= bound
        checks[name] = {"target": f"{op} {bound}", "value": value, "ok": bool(ok)}
    return checks


def print_table(flat: dict[str, Any], checks: dict[str, dict[str, Any]]) -> None:
    width = max(len(k) for k in flat)
    print(f"{'routing benchmark':<{width}}  {'value':>12}  target")
    for name, value in flat.items():
        if name.startswith(("config.", "targets.")):
            continue
        shown = "null" if value is None else f"{value:12.6f}" if isinstance(value, float) else f"{value!s:>12}"
        check = checks.get(name)
        target = f"{check['target']:>8}  {'ok' if check['ok'] else 'MISSED'}" if check else ""
        print(f"{name:<{width}}  {shown:>12}  {target}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer lookup timings and join users (same stream)")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--cluster", action="store_true", help="also measure a real router + workers (not yet)")
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--eps", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    cfg: dict[str, Any] = {"requests": args.requests, "users": args.users, "zipf_s": 1.1, "seed": args.seed,
                           "nodes": 8, "eps": args.eps, "cache_fraction_of_users": 0.025,
                           "lookup_calls": 100_000 if args.quick else 500_000,
                           "join_users": 200_000 if args.quick else 1_000_000, "vnodes": DEFAULT_VNODES,
                           "sticky_keys": DEFAULT_STICKY_KEYS, "load": "requests assigned so far (none finish)"}
    cfg["adapters_per_node"] = math.floor(cfg["cache_fraction_of_users"] * cfg["users"] / cfg["nodes"])
    started = time.perf_counter()
    ring8 = Ring([f"worker-{i}" for i in range(cfg["nodes"])])
    ring: dict[str, Any] = {**lookup_timings(ring8, cfg["lookup_calls"]),
                            **moved_on_join(cfg["nodes"], cfg["join_users"])}
    loads, hits = simulate(cfg)
    ring.update(loads)
    cluster = measure_cluster(args) if args.cluster else None
    if args.cluster and cluster is None:
        print("--cluster: the real-cluster measurement is not implemented yet; its figures are null",
              file=sys.stderr)
    overhead = None if cluster is None else cluster.get("router_overhead_ms_p50")
    result: dict[str, Any] = {"bench": "routing", "config": cfg, "ring": ring, "cache_hit_rate": hits,
                              "router_overhead_ms_p50": overhead, "cluster": cluster}
    checks = check_targets(flatten(result))
    result["targets"] = checks
    result["seconds"] = round(time.perf_counter() - started, 1)
    print_table(flatten({k: v for k, v in result.items() if k != "targets"}), checks)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
