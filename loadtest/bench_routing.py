"""Routing benchmark: consistent hashing with bounded loads against round robin, simulated.

ring            lookup cost (route_key + owner / pick / balancer acquire+release), the share of users a
                joining worker takes (8 -> 9 workers) against the ideal 1/9, and max / average worker
                load when Zipf(1.1)-skewed requests are assigned with bounded loads.
cache_hit_rate  each worker an LRU of adapters; the same Zipf request stream routed by the ring (bounded
                loads, sticky spill), by the ring with stateless spill, by round robin, and to one ideal
                LRU with the whole capacity. miss_ratio = round-robin misses / consistent-hash misses.
cluster         (--cluster) `personalize up --workers 3` on the tiny model with 30 imported adapters, each
                worker's device tier sized for a third of them: the real per-tier hit rates (Admin.Stats
                counter deltas) of one Zipf stream sent through the router (consistent_hash), to the
                workers in turn (round_robin), and to one extra worker with all three device budgets
                (ideal); miss_ratio = round-robin device misses / consistent-hash device misses. Then
                router_overhead_ms_p50: p50 Generate(max_new_tokens=1) via the router minus straight to
                the owner, the same calls interleaved after an untimed warm-up of both paths (and the
                same for the SDK's routing client). router_balance: a skewed Zipf stream through the real
                router from many concurrent callers, each call's load released when it finishes (the
                router's own in-flight count); per worker, the calls it answered and its in-flight calls
                sampled while the stream runs, as max / average. --quick: < 2 minutes.

    python loadtest/bench_routing.py [--quick] [--json loadtest/results/bench_routing.json] [--cluster]

The simulation is pure CPU, one process. Zipf samples are a bounded Zipf over the user ranks (inverse CDF,
seeded); in the simulation the load of a worker is the number of requests assigned to it so far (no request
ever finishes, which is what the balancer caps: ring.max_over_avg_load holds by construction there; the
router's real balance under released load is --cluster's router_balance).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personalize.routing.ring import DEFAULT_STICKY_KEYS, DEFAULT_VNODES, BoundedLoadBalancer, Ring, route_key
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc

TENANT = "bench"
TARGETS: dict[str, tuple[str, float]] = {
    "ring.lookup_us_p50": ("<=", 5.0),
    "ring.moved_over_ideal": ("<=", 1.15),
    "ring.max_over_avg_load": ("<=", 1.25),
    "cache_hit_rate.consistent_hash_over_ideal": (">=", 0.97),
    "cache_hit_rate.miss_ratio": (">=", 1.5),
    "cache_hit_rate_cluster.miss_ratio": (">=", 1.5),
    "router_overhead_ms_p50": ("<=", 0.5),
    "router_balance.max_over_avg_in_flight": ("<=", 1.25),
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
    batches = [user_ids[i : i + 1000] for i in range(0, calls, 1000)]
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
    return {
        "lookup_us_p50": per_call_us(owner, batches),
        "pick_us_p50": per_call_us(pick, batches),
        "acquire_release_us_p50": per_call_us(acquire, batches),
    }


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
    return {
        "moved_fraction_on_join": moved / users,
        "ideal_fraction": ideal,
        "moved_over_ideal": moved / users / ideal,
        "moved_between_old_workers": elsewhere,
    }


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
    routes = {
        route: route_stream(ranks, nodes, route, cfg["eps"])
        for route in ("bounded", "stateless", "plain", "round_robin")
    }
    loads = {
        "max_over_avg_load": max_over_avg(routes["bounded"], n),
        "max_over_avg_load_stateless_spill": max_over_avg(routes["stateless"], n),
        "max_over_avg_load_unbounded": max_over_avg(routes["plain"], n),
    }
    hits = {
        "consistent_hash": lru_hit_rate(ranks, routes["bounded"], n, per_node),
        "consistent_hash_stateless_spill": lru_hit_rate(ranks, routes["stateless"], n, per_node),
        "consistent_hash_unbounded": lru_hit_rate(ranks, routes["plain"], n, per_node),
        "round_robin": lru_hit_rate(ranks, routes["round_robin"], n, per_node),
        "ideal": lru_hit_rate(ranks, [0] * len(ranks), 1, per_node * n),
    }
    hits["consistent_hash_over_ideal"] = hits["consistent_hash"] / hits["ideal"]
    hits["miss_ratio"] = (1 - hits["round_robin"]) / (1 - hits["consistent_hash"])
    return loads, hits


# ---- real cluster ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterConfig:
    """The --cluster run: `personalize up --workers 3` on the tiny model, Zipf traffic over imported adapters."""

    workers: int = 3
    adapters: int = 30
    rank: int = 8
    requests: int = 1500
    """Measured Generate calls per routing strategy."""
    warmup: int = 300
    """Unmeasured calls before each strategy's measurement (same distribution, another seed)."""
    concurrency: int = 4
    zipf_s: float = 1.1
    overhead_pairs: int = 300
    balance_callers: int = 24
    """Concurrent callers of the balance stream (above the workers' batch, so loads pile up)."""
    balance_zipf_s: float = 1.5
    """Skew of the balance stream: the hottest user alone is more than a worker's fair share."""
    balance_tokens: int = 16
    seed: int = 0

    @property
    def slots_per_worker(self) -> int:
        return math.ceil(self.adapters / self.workers)


def _cache_flags(base: Any, cfg: ClusterConfig, slots: int) -> list[str]:
    """Device and host budgets of `slots` adapters of rank cfg.rank (disk holds them all)."""
    from personalize.lora.adapter import TARGET_MODULES
    from personalize.lora.slots import slot_nbytes

    device = slots * slot_nbytes(base.config, cfg.rank, TARGET_MODULES, base.dtype)
    return [
        "--max-rank",
        str(cfg.rank),
        "--device-cache",
        str(device),
        "--host-cache",
        str(device),
        "--disk-cache",
        "64MiB",
    ]


def _import_adapters(client: Any, base: Any, cfg: ClusterConfig) -> list[str]:
    """cfg.adapters users with a random PEFT adapter each, imported through `client`; their ids."""
    import torch

    from personalize.lora.format import AdapterSpec, random_adapter, write_peft

    spec = AdapterSpec.for_model(base, cfg.rank)
    generator = torch.Generator().manual_seed(cfg.seed)
    users = [f"user-{i}" for i in range(cfg.adapters)]
    for user in users:
        client.import_adapter(user, write_peft(random_adapter(spec, cfg.rank, 2.0 * cfg.rank, generator), spec))
    return users


def _tier_counts(admin: Any, nodes: set[str]) -> Counter[str]:
    """Summed hit/miss counters of `nodes` from Admin.Stats: keys `hits.<tier>`, `misses.<tier>`."""
    counts: Counter[str] = Counter()
    for node in admin.Stats(pb.StatsRequest(), timeout=60).nodes:
        if node.node_id in nodes:
            for kind in ("hits", "misses"):
                counts.update({f"{kind}.{tier}": n for tier, n in getattr(node, kind).items()})
    return counts


def _tier_rates(before: Counter[str], after: Counter[str]) -> dict[str, float | None]:
    """Per tier: hits / (hits + misses) over the counter deltas (device: of all acquires; lower tiers: of
    the loads that reached them); None for a tier nothing reached."""
    rates: dict[str, float | None] = {}
    for tier in ("device", "host", "disk", "store"):
        hits = after[f"hits.{tier}"] - before[f"hits.{tier}"]
        misses = after[f"misses.{tier}"] - before[f"misses.{tier}"]
        rates[tier] = hits / (hits + misses) if hits + misses else None
    return rates


def _drive(cfg: ClusterConfig, calls: list[tuple[Any, str]]) -> None:
    """Generate(max_new_tokens=1) for each (stub, user), cfg.concurrency at a time; failures raise."""

    def one(call: tuple[Any, str]) -> None:
        stub, user = call
        stub.Generate(pb.GenerateRequest(user_id=user, prompt="Hello", max_new_tokens=1), timeout=120)

    with ThreadPoolExecutor(cfg.concurrency) as pool:
        list(pool.map(one, calls))


def _strategy(
    cfg: ClusterConfig, admin: Any, nodes: set[str], route: Callable[[int, str], Any], users: list[str]
) -> dict[str, float | None]:
    """Warm up, then measure per-tier hit rates of the Zipf stream sent where route(index, user) says."""
    warm = [users[r] for r in zipf_ranks(len(users), cfg.warmup, cfg.zipf_s, cfg.seed + 1)]
    _drive(cfg, [(route(i, u), u) for i, u in enumerate(warm)])
    stream = [users[r] for r in zipf_ranks(len(users), cfg.requests, cfg.zipf_s, cfg.seed)]
    before = _tier_counts(admin, nodes)
    _drive(cfg, [(route(i, u), u) for i, u in enumerate(stream)])
    return _tier_rates(before, _tier_counts(admin, nodes))


def _p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _overhead(
    cfg: ClusterConfig, router: Any, direct: dict[str, Any], routing_client: Any, users: list[str]
) -> dict[str, float]:
    """p50 Generate(max_new_tokens=1) latency via the router, via the SDK's routing client and straight
    to the owner, interleaved call by call. An untimed call first makes the user's adapter resident on its
    owner, so all three timed calls are device hits (there are more users than slots: without it the first
    timed call would pay the adapter's load)."""
    times: dict[str, list[float]] = {"router": [], "routing_client": [], "direct": []}
    request = pb.GenerateRequest(prompt="Hello", max_new_tokens=1)
    for i in range(min(len(users), cfg.overhead_pairs)):  # warm-up of every path: channels, adapters
        request.user_id = users[i]
        owner = router.Generate(request, timeout=60).node_id
        direct[owner].Generate(request, timeout=60)
        routing_client.generate(request.user_id, "Hello", max_new_tokens=1)
    for i in range(cfg.overhead_pairs):
        request.user_id = users[i % len(users)]
        owner = router.Generate(request, timeout=60).node_id  # warm-up: loads the adapter if it must
        start = time.perf_counter()
        router.Generate(request, timeout=60)
        times["router"].append(time.perf_counter() - start)
        start = time.perf_counter()
        routing_client.generate(request.user_id, "Hello", max_new_tokens=1)
        times["routing_client"].append(time.perf_counter() - start)
        start = time.perf_counter()
        direct[owner].Generate(request, timeout=60)
        times["direct"].append(time.perf_counter() - start)
    p50 = {name: _p50_ms(samples) for name, samples in times.items()}
    return {
        "router_ms_p50": p50["router"],
        "routing_client_ms_p50": p50["routing_client"],
        "direct_ms_p50": p50["direct"],
        "router_overhead_ms_p50": p50["router"] - p50["direct"],
        "routing_client_overhead_ms_p50": p50["routing_client"] - p50["direct"],
    }


def _balance(cfg: ClusterConfig, router: Any, workers: dict[str, Any], users: list[str]) -> dict[str, Any]:
    """A Zipf(cfg.balance_zipf_s) stream through the real router from cfg.balance_callers threads; each
    call holds its worker until it answers, when the router releases its load. Per worker: the calls it
    answered, and its in-flight generations (its own ListNodes load: running + queued) sampled every
    20 ms while the stream runs; max / average of each."""
    import threading

    stream = [users[r] for r in zipf_ranks(len(users), cfg.requests, cfg.balance_zipf_s, cfg.seed + 2)]
    answered: Counter[str] = Counter()
    load: Counter[str] = Counter()
    lock, done = threading.Lock(), threading.Event()

    def one(user: str) -> None:
        request = pb.GenerateRequest(user_id=user, prompt="Hello", max_new_tokens=cfg.balance_tokens)
        node = router.Generate(request, timeout=120).node_id
        with lock:
            answered[node] += 1

    def poll() -> None:
        while not done.wait(0.02):
            for node, admin in workers.items():
                (info,) = admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes
                load[node] += info.load

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        with ThreadPoolExecutor(cfg.balance_callers) as pool:
            list(pool.map(one, stream))
    finally:
        done.set()
        poller.join()
    hottest = Counter(stream).most_common(1)[0][1] / len(stream)

    def max_avg(counts: Counter[str]) -> float | None:
        total = sum(counts[n] for n in workers)
        return max(counts[n] for n in workers) / (total / len(workers)) if total else None

    return {
        "callers": cfg.balance_callers,
        "zipf_s": cfg.balance_zipf_s,
        "hottest_user_share": hottest,
        "answered": {n: answered[n] for n in workers},
        "max_over_avg_answered": max_avg(answered),
        "max_over_avg_in_flight": max_avg(load),
    }


class _Stages:
    """Seconds per stage of the run, for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 1)
        self._last = now


def measure_cluster(args: argparse.Namespace) -> dict[str, Any]:
    """Real per-tier cache hit rates of one Zipf request stream on `personalize up --workers 3` (each
    worker's device tier holds a third of the adapters): routed by the router (consistent hashing), sent
    to the workers in turn (round robin), and sent to one extra worker with the devices of all three
    (ideal; started during the round-robin phase, which does not use the router); then the router's
    overhead. Rates come from Admin.Stats counter deltas."""
    from personalize.model import ModelConfig, load_base_model
    from personalize_service.cli.embedded import running_url
    from personalize_service.client import PersonalizeClient
    from tests.e2e.upserver import start_server, start_up

    cfg = ClusterConfig(
        requests=300 if args.quick else 1500,
        warmup=90 if args.quick else 300,
        overhead_pairs=60 if args.quick else 300,
        seed=args.seed,
    )
    base = load_base_model(ModelConfig())
    stages = _Stages()
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp, ThreadPoolExecutor(1) as background:
        root = Path(tmp)
        up = start_up(
            root / "data",
            root / "up.log",
            "--workers",
            str(cfg.workers),
            "--threads",
            "64",
            *_cache_flags(base, cfg, cfg.slots_per_worker),
        )
        stages.done("start_cluster")
        ideal = None
        try:
            registry = running_url(up.data_dir / "valkey")  # the banner masks the password
            with up.channel() as channel, PersonalizeClient(up.target, timeout=120) as client:
                router, admin = pb_grpc.PersonalizeStub(channel), pb_grpc.AdminStub(channel)
                users = _import_adapters(client, base, cfg)
                nodes = {n.node_id: n.address for n in admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes}
                direct = {n: pb_grpc.PersonalizeStub(grpc.insecure_channel(a)) for n, a in nodes.items()}
                order = sorted(direct)
                stages.done("import_adapters")
                rates = {"consistent_hash": _strategy(cfg, admin, set(nodes), lambda i, u: router, users)}
                stages.done("consistent_hash")
                worker_admin = {n: pb_grpc.AdminStub(grpc.insecure_channel(a)) for n, a in nodes.items()}
                balance = _balance(cfg, router, worker_admin, users)
                stages.done("balance")
                starting = background.submit(
                    start_server,
                    _ideal_command(base, cfg, up.data_dir, root),
                    root / "ideal",
                    root / "ideal.log",
                    {"PERSONALIZE_REGISTRY_URL": registry},  # by environment: argv (and its password) shows in ps
                )
                rates["round_robin"] = _strategy(
                    cfg, admin, set(nodes), lambda i, u: direct[order[i % len(order)]], users
                )
                stages.done("round_robin")
                ideal = starting.result()
                ideal_stub = pb_grpc.PersonalizeStub(grpc.insecure_channel(ideal.target))
                rates["ideal"] = _strategy(cfg, admin, {"ideal"}, lambda i, u: ideal_stub, users)
                stages.done("ideal")
                direct["ideal"] = ideal_stub  # it joined the ring too: the router now routes to it as well
                with PersonalizeClient.discover(registry, timeout=60) as routing_client:
                    overhead = _overhead(cfg, router, direct, routing_client, users)
                stages.done("overhead")
        finally:
            if ideal is not None:
                ideal.process.terminate()
            up.stop()
            if ideal is not None:
                ideal.stop()
            stages.done("stop")
    return {**_cluster_result(cfg, rates, overhead, stages.seconds), "router_balance": balance}


def _ideal_command(base: Any, cfg: ClusterConfig, data_dir: Path, root: Path) -> list[str]:
    """One more worker with the device and host budgets of all the cluster's workers together (its registry
    URL, password included, comes by PERSONALIZE_REGISTRY_URL)."""
    return [
        sys.executable,
        "-m",
        "personalize_service.cli",
        "serve",
        "--role",
        "worker",
        "--node-id",
        "ideal",
        "--store-url",
        (data_dir / "store").as_uri(),
        "--data-dir",
        str(root / "ideal"),
        "--port",
        "0",
        "--threads",
        "64",
        *_cache_flags(base, cfg, cfg.slots_per_worker * cfg.workers),
    ]


def _cluster_result(
    cfg: ClusterConfig, rates: dict[str, dict[str, float | None]], overhead: dict[str, float], stages: dict[str, float]
) -> dict[str, Any]:
    device = {name: tiers["device"] for name, tiers in rates.items()}
    ch, rr = device["consistent_hash"], device["round_robin"]
    miss_ratio = (1 - rr) / (1 - ch) if ch is not None and rr is not None and ch < 1 else None
    return {
        "config": asdict(cfg),
        "cache_hit_rate_cluster": {**device, "miss_ratio": miss_ratio},
        "tiers": rates,
        **overhead,
        "stage_seconds": stages,
        "seconds": round(sum(stages.values()), 1),
    }


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
        value = flat.get(name)
        if value is None:  # not measured in this run (--cluster figures)
            continue
        ok = value <= bound if op == "<=" else value >= bound
        checks[name] = {"target": f"{op} {bound}", "value": value, "ok": bool(ok)}
    return checks


def print_table(flat: dict[str, Any], checks: dict[str, dict[str, Any]]) -> None:
    width = max(len(k) for k in flat)
    print(f"{'routing benchmark':<{width}}  {'value':>12}  target")
    for name, value in flat.items():
        if name.startswith(("config.", "targets.", "cluster.config.")):
            continue
        shown = "null" if value is None else f"{value:12.6f}" if isinstance(value, float) else f"{value!s:>12}"
        check = checks.get(name)
        target = f"{check['target']:>8}  {'ok' if check['ok'] else 'MISSED'}" if check else ""
        print(f"{name:<{width}}  {shown:>12}  {target}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer lookup timings and join users (same stream)")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument(
        "--cluster",
        action="store_true",
        help="also measure `personalize up --workers 3`: real hit rates and the router's overhead",
    )
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--eps", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    cfg: dict[str, Any] = {
        "requests": args.requests,
        "users": args.users,
        "zipf_s": 1.1,
        "seed": args.seed,
        "nodes": 8,
        "eps": args.eps,
        "cache_fraction_of_users": 0.025,
        "lookup_calls": 100_000 if args.quick else 500_000,
        "join_users": 200_000 if args.quick else 1_000_000,
        "vnodes": DEFAULT_VNODES,
        "sticky_keys": DEFAULT_STICKY_KEYS,
        "load": "requests assigned so far (none finish)",
    }
    cfg["adapters_per_node"] = math.floor(cfg["cache_fraction_of_users"] * cfg["users"] / cfg["nodes"])
    started = time.perf_counter()
    ring8 = Ring([f"worker-{i}" for i in range(cfg["nodes"])])
    ring: dict[str, Any] = {
        **lookup_timings(ring8, cfg["lookup_calls"]),
        **moved_on_join(cfg["nodes"], cfg["join_users"]),
    }
    loads, hits = simulate(cfg)
    ring.update(loads)
    cluster = measure_cluster(args) if args.cluster else None
    result: dict[str, Any] = {
        "bench": "routing",
        "config": cfg,
        "ring": ring,
        "cache_hit_rate": hits,
        "cache_hit_rate_cluster": cluster.pop("cache_hit_rate_cluster") if cluster else None,
        "router_overhead_ms_p50": cluster.pop("router_overhead_ms_p50") if cluster else None,
        "router_balance": cluster.pop("router_balance") if cluster else None,
        "cluster": cluster,
    }
    checks = check_targets(flatten(result))
    result["targets"] = checks
    result["seconds"] = round(time.perf_counter() - started, 1)
    print_table(flatten({k: v for k, v in result.items() if k != "targets"}), checks)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
