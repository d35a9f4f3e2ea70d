"""Registry benchmark: bytes per user on the server and single-lookup latency over loopback,
against the obvious layout (one Redis hash per user with named fields) in the same run.

    python loadtest/bench_registry.py --users 1000000 --json loadtest/results/bench_registry.json

Without --url it starts a private EmbeddedValkey (AOF on, as `personalize up` runs it).

    python loadtest/bench_registry.py --cluster --json loadtest/results/bench_registry_cluster.json

--cluster instead starts a Valkey Cluster of 1 primary, then one of 3 primaries (tests/valkeycluster.py,
no replicas, AOF fsynced on every write), and measures registry lookups/s and feedback appends/s on each
from --processes client processes (each its own cluster client), in one run: the ratio is what sharding
buys on this machine.
`run_registry_bench(url, users)` is importable (loadtest/bench_cache.py uses it).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # valkeycluster.py

from personalize.adapters.registry import AdapterRecord, CasUpdate, Registry
from personalize.adapters.store.keys import user_digest
from personalize_service.cli.embedded import EmbeddedValkey, EmbeddedValkeyConfig

FINGERPRINT = "sha256:" + "5e" * 32
FILL_BATCH = 10_000


def synthetic_record(i: int) -> AdapterRecord:
    """A plausible record for synthetic user i (realistic magnitudes: ms clocks, stream ids)."""
    now = 1_760_000_000_000 + i
    return AdapterRecord(
        version=1 + i % 40,
        rank=8 << (i % 3),
        fingerprint=FINGERPRINT,
        examples_seen=i % 5000,
        last_event_id=f"{now - 7}-{i % 3}",
        updated_at_ms=now,
        checksum="sha256:" + user_digest("bench", str(i)).hex(),
    )


def fill_synthetic(registry: Registry, users: int, tenant: str = "bench") -> float:
    """Write `users` records with pipelined compare-and-sets; returns users written per second."""
    start = time.perf_counter()
    for first in range(0, users, FILL_BATCH):
        updates = [
            CasUpdate(tenant, f"user-{i}", 0, synthetic_record(i)) for i in range(first, min(users, first + FILL_BATCH))
        ]
        lost = [c for c in registry.compare_and_set_many(updates) if c is not None]
        if lost:
            raise RuntimeError(f"fill lost {len(lost)} compare-and-sets, e.g. {lost[0]}")
    return users / (time.perf_counter() - start)


def fill_naive(client: redis.Redis, namespace: str, users: int) -> None:
    """The obvious layout to compare against: one hash per user, readable field names."""
    pipe = client.pipeline(transaction=False)
    for i in range(users):
        rec = synthetic_record(i)
        key = f"{namespace}:user:{user_digest('bench', f'user-{i}')[:16].hex()}"
        pipe.hset(
            key,
            mapping={
                "version": rec.version,
                "rank": rec.rank,
                "fingerprint": rec.fingerprint,
                "examples_seen": rec.examples_seen,
                "last_event_id": rec.last_event_id,
                "updated_at_ms": rec.updated_at_ms,
                "checksum": rec.checksum,
            },
        )
        if len(pipe) >= FILL_BATCH:
            pipe.execute()
    pipe.execute()


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def measure_bytes(client: redis.Redis, fill: Any) -> int:
    """Server memory grown by `fill()`, bytes."""
    before = used_memory(client)
    fill()
    return used_memory(client) - before


def lookup_latencies_us(registry: Registry, users: int, lookups: int) -> list[float]:
    """Latency of `lookups` single gets of random existing users, microseconds, sorted."""
    rng = random.Random(7)
    for _ in range(200):  # warm connections and the fingerprint cache
        registry.get("bench", f"user-{rng.randrange(users)}")
    samples = []
    for _ in range(lookups):
        user = f"user-{rng.randrange(users)}"
        start = time.perf_counter_ns()
        found = registry.get("bench", user)
        samples.append((time.perf_counter_ns() - start) / 1000)
        if found is None:
            raise RuntimeError(f"{user} vanished from the registry")
    return sorted(samples)


def naive_lookup_latencies_us(client: redis.Redis, namespace: str, users: int, lookups: int) -> list[float]:
    """The same random gets on the naive layout (HGETALL of the user's hash, fields decoded), microseconds."""
    rng = random.Random(7)

    def get(user: str) -> dict[str, str]:
        raw = client.hgetall(f"{namespace}:user:{user_digest('bench', user)[:16].hex()}")
        return {k.decode(): v.decode() for k, v in raw.items()}

    for _ in range(200):  # warm the connection, as the compact side is warmed
        get(f"user-{rng.randrange(users)}")
    samples = []
    for _ in range(lookups):
        user = f"user-{rng.randrange(users)}"
        start = time.perf_counter_ns()
        found = get(user)
        samples.append((time.perf_counter_ns() - start) / 1000)
        if not found:
            raise RuntimeError(f"{user} vanished from the naive layout")
    return sorted(samples)


def drop_namespace(client: redis.Redis, namespace: str) -> None:
    for keys in _chunks(client.scan_iter(match=f"{namespace}:*", count=5000), 5000):
        client.unlink(*keys)


def run_registry_bench(
    url: str, users: int, lookups: int = 5000, baseline_users: int | None = None, bucket_bits: int = 16
) -> dict[str, Any]:
    """Fill `users` records into a fresh namespace on the server at `url`, then time `lookups` gets.

    Returns users, bytes_per_user (server used_memory delta / users), lookup_p50_us, lookup_p99_us,
    plus fill rate and the naive layout's bytes per user and lookup latencies, measured with the same
    lookups on `baseline_users` (default: the same `users`, so both sides hold equal data). Everything it
    wrote is removed afterwards."""
    client = redis.Redis.from_url(url)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    registry = Registry(client, namespace=namespace, bucket_bits=bucket_bits)
    registry.get("warm", "up")  # layout check before the baseline
    registry.compare_and_set("warm", "up", 0, synthetic_record(0))  # fingerprint interned before it
    try:
        rate: list[float] = []
        used = measure_bytes(client, lambda: rate.append(fill_synthetic(registry, users)))
        latencies = lookup_latencies_us(registry, users, lookups)
        naive_users = users if baseline_users is None else baseline_users
        naive = measure_bytes(client, lambda: fill_naive(client, namespace + "-naive", naive_users))
        naive_latencies = naive_lookup_latencies_us(client, namespace + "-naive", naive_users, lookups)
    finally:
        drop_namespace(client, namespace)
        drop_namespace(client, namespace + "-naive")
    bytes_per_user = used / users
    naive_per_user = naive / max(naive_users, 1)
    return {
        "users": users,
        "bytes_per_user": round(bytes_per_user, 1),
        "lookup_p50_us": round(latencies[len(latencies) // 2], 1),
        "lookup_p99_us": round(latencies[int(len(latencies) * 0.99)], 1),
        "lookups": lookups,
        "fill_users_per_s": round(rate[0]),
        "bucket_bits": bucket_bits,
        "naive_users": naive_users,
        "naive_bytes_per_user": round(naive_per_user, 1),
        "naive_lookup_p50_us": round(naive_latencies[len(naive_latencies) // 2], 1),
        "naive_lookup_p99_us": round(naive_latencies[int(len(naive_latencies) * 0.99)], 1),
        "naive_over_compact": round(naive_per_user / bytes_per_user, 2),
    }


def _cluster_worker(task: tuple[str, str, str, int, float, int]) -> int:
    """One client process: `kind` ("lookup" or "append") as fast as it can for `seconds`; how many done."""
    from personalize import valkey
    from personalize.feedback.events import FeedbackEvent
    from personalize.feedback.stream import FeedbackStream, StreamConfig

    kind, url, namespace, users, seconds, seed = task
    client = valkey.connect(url, socket_timeout=10.0)
    rng = random.Random(seed)
    done = 0
    if kind == "lookup":
        registry = Registry(client, namespace=namespace)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            registry.get("bench", f"user-{rng.randrange(users)}")
            done += 1
    else:
        stream = FeedbackStream(client, StreamConfig(partitions=12, namespace=namespace))
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            user = f"user-{rng.randrange(users)}"
            stream.append(FeedbackEvent("bench", user, "accept", "Q: ?\nA: ", "ok", event_key=f"{seed}-{done}"))
            done += 1
    client.close()
    return done


def run_cluster_bench(users: int, seconds: float, processes: int, shapes: tuple[int, ...] = (1, 3)) -> dict[str, Any]:
    """Lookups/s and appends/s on a cluster of each number of primaries in `shapes`, and the ratios."""
    from valkeycluster import ValkeyCluster

    from personalize import valkey

    result: dict[str, Any] = {"users": users, "seconds": seconds, "processes": processes, "cpus": _cpus()}
    for primaries in shapes:
        with (
            tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp,
            ValkeyCluster(Path(tmp), primaries=primaries, replicas=0) as cluster,
        ):
            namespace = "bench"
            fill_synthetic(Registry(valkey.connect(cluster.url), namespace=namespace), users)
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(processes) as pool:
                for kind in ("lookup", "append"):
                    tasks = [(kind, cluster.url, namespace, users, seconds, i) for i in range(processes)]
                    start = time.perf_counter()
                    done = sum(pool.map(_cluster_worker, tasks))
                    elapsed = max(seconds, time.perf_counter() - start)
                    result[f"{kind}s_per_s_{primaries}p"] = round(done / elapsed)
    for kind in ("lookup", "append"):
        low, high = result[f"{kind}s_per_s_{shapes[0]}p"], result[f"{kind}s_per_s_{shapes[-1]}p"]
        result[f"{kind}s_{shapes[-1]}p_over_{shapes[0]}p"] = round(high / max(low, 1), 2)
    return result


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _chunks(items: Any, size: int) -> Any:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=5000)
    parser.add_argument("--bucket-bits", type=int, default=16)
    parser.add_argument("--url", help="an existing server instead of a private embedded one")
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--cluster", action="store_true", help="1 primary vs 3 primaries: lookups/s, appends/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="--cluster: length of each measurement")
    parser.add_argument("--processes", type=int, default=8, help="--cluster: client processes")
    args = parser.parse_args()
    if args.cluster:
        result = run_cluster_bench(min(args.users, 100_000), args.seconds, args.processes)
    elif args.url:
        result = run_registry_bench(args.url, args.users, args.lookups, bucket_bits=args.bucket_bits)
    else:
        with (
            tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp,
            EmbeddedValkey(EmbeddedValkeyConfig(data_dir=Path(tmp))) as server,
        ):
            result = run_registry_bench(server.url, args.users, args.lookups, bucket_bits=args.bucket_bits)
    width = max(len(k) for k in result)
    print(f"{'registry benchmark':<{width}}  value")
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        bench = "registry_cluster" if args.cluster else "registry"
        args.json.write_text(json.dumps({"bench": bench, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
