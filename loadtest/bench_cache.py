"""Adapter cache benchmark: the switch between users (a device hit), bringing an adapter into a slot from
each tier, loading the whole base model from the same S3 store instead (the alternative to a switch),
how many adapters stay resident in device slots at once, and the registry at scale.

    python loadtest/bench_cache.py [--quick] [--json loadtest/results/bench_cache.json]

Starts its own SeaweedFS S3 server (tests/s3server.py) and embedded Valkey; everything runs on this
machine's CPU. Times are medians (p50) unless named otherwise; ratios are what carries across machines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # s3server.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_registry.py, bench_engine.py

from bench_engine import BENCH_SHAPE
from s3server import S3Server, start_weed_mini

from personalize.adapters.cache import AdapterCache, CacheConfig, Fetch, store_fetch
from personalize.adapters.registry import Registry
from personalize.adapters.repository import AdapterRepository
from personalize.adapters.store import ObjectStore, open_store
from personalize.lora.adapter import TARGET_MODULES, Adapter, module_key
from personalize.lora.format import AdapterSpec, adapter_from_bytes, random_adapter
from personalize.lora.slots import SlotPool, module_shapes
from personalize.model import build_random_llama, default_llama_config
from personalize_service.cli.embedded import EmbeddedValkey, EmbeddedValkeyConfig
from tests.helpers import holds

# BENCH_SHAPE: the Llama shape of bench_engine.py (~206M parameters, ~820 MB in fp32)
RANK = 8
TENANT = "bench"


def spec_of(hf_config: Any, r_max: int = RANK) -> AdapterSpec:
    """The adapter spec of a config (no weights needed); the fingerprint is a hash of the config."""
    shapes = {
        module_key(layer, m): module_shapes(hf_config)[m]
        for layer in range(hf_config.num_hidden_layers)
        for m in TARGET_MODULES
    }
    fingerprint = "sha256:" + hashlib.sha256(hf_config.to_json_string().encode()).hexdigest()
    return AdapterSpec(r_max=r_max, target_modules=TARGET_MODULES, shapes=shapes, base_fingerprint=fingerprint)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def memory_cache(pool: SlotPool, adapters: list[Adapter], **config: Any) -> AdapterCache:
    """A cache whose store is a dict: user `u<i>` gets adapters[i % len]; no I/O (for the switch and fill)."""

    def fetch(tenant: str, user_id: str, version: int, checksum: str) -> bytes:
        return user_id.encode()

    def parse(data: bytes) -> Adapter:
        return adapters[int(data[1:]) % len(adapters)]

    return AdapterCache(CacheConfig(**config), pool, threading.Lock(), fetch, parse)


# -- the switch ------------------------------------------------------------------------------------------


def bench_switch(samples: int, users: int = 1000) -> dict[str, float]:
    """acquire+release of resident users through the public API, one timing per pair (microseconds)."""
    cfg = default_llama_config()
    adapters = [random_adapter(spec_of(cfg), RANK, 16.0, torch.Generator().manual_seed(i)) for i in range(8)]
    with memory_cache(SlotPool(cfg, users, RANK), adapters) as cache:
        names = [f"u{i}" for i in range(users)]
        for name in names:
            cache.release(cache.acquire(TENANT, name, 1))
        acquire, release, clock = cache.acquire, cache.release, time.perf_counter_ns
        timings = [0] * samples
        for n in range(samples):
            name = names[n % users]
            start = clock()
            release(acquire(TENANT, name, 1))
            timings[n] = clock() - start
        overhead = min(-clock() + clock() for _ in range(1000))  # one back-to-back pair of clock reads
        assert cache.stats()["hits"]["device"] >= samples
    micro = [t / 1000 for t in timings]
    return {
        "device_hit_p50": round(percentile(micro, 0.5), 3),
        "device_hit_p99": round(percentile(micro, 0.99), 3),
        "samples": samples,
        "timer_overhead_us": round(overhead / 1000, 3),
    }


# -- loads from each tier ----------------------------------------------------------------------------------


def timed_loads(cache: AdapterCache, users: list[str], samples: int, tier: str) -> list[float]:
    """Cycle through more users than slots so every acquire misses the device; ms per acquire+release."""
    for name in users:  # warm the lower tiers
        cache.release(cache.acquire(TENANT, name, 1, timeout=120))
    times = []
    for n in range(samples):
        start = time.perf_counter()
        lease = cache.acquire(TENANT, users[n % len(users)], 1, timeout=120)
        cache.release(lease)
        times.append((time.perf_counter() - start) * 1000)
        assert lease.tier == tier, f"expected a {tier} load, got {lease.tier}"
    return times


def bench_loads(stores: dict[str, ObjectStore], client: redis.Redis, samples: int, tmp: Path) -> dict[str, Any]:
    """ms to bring one BENCH-shape rank-8 fp32 adapter into a slot from host, disk, file and S3 stores."""
    cfg = default_llama_config(**BENCH_SHAPE)
    spec = spec_of(cfg)
    users = [f"load-{i}" for i in range(4)]
    adapters = [random_adapter(spec, RANK, 16.0, torch.Generator().manual_seed(i)) for i in range(len(users))]
    fetches: dict[str, Fetch] = {}
    for name, store in stores.items():  # published as a trainer does: the object, then the registry CAS
        registry = Registry(client, namespace=f"bench-cache-{name}")
        repository = AdapterRepository(registry, store, spec)
        for user, adapter in zip(users, adapters, strict=True):
            repository.publish(TENANT, user, adapter, None, examples_seen=0)
        fetches[name] = store_fetch(store, registry)

    def parse(data: bytes) -> Adapter:
        return adapter_from_bytes(data, spec)

    def run(tier: str, fetch: Fetch, **config: Any) -> list[float]:
        with AdapterCache(
            CacheConfig(load_threads=1, **config), SlotPool(cfg, 2, RANK), threading.Lock(), fetch, parse
        ) as cache:
            return timed_loads(cache, users, samples, tier)

    times = {
        "host_p50": run("host", fetches["file"]),
        "disk_p50": run("disk", fetches["file"], host_bytes=0, disk_dir=str(tmp / "disk-tier")),
        "store_file_p50": run("store", fetches["file"], host_bytes=0),
        "store_s3_p50": run("store", fetches["s3"], host_bytes=0),
    }
    return {
        "ms": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "adapter_nbytes": adapters[0].nbytes,
        "samples": samples,
    }


# -- the alternative: loading the whole model ------------------------------------------------------------------


def bench_full_model(store: ObjectStore, repeats: int) -> dict[str, Any]:
    """ms to get the bench base model's safetensors from the S3 store and load its tensors."""
    model = build_random_llama(default_llama_config(**BENCH_SHAPE), seed=7)
    data = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
    del model
    key = "models/bench-llama/model.safetensors"
    checksum = store.put(key, data)
    size = len(data)
    del data
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tensors = load_safetensors(store.get(key, checksum))
        times.append((time.perf_counter() - start) * 1000)
        del tensors
    return {"p50_ms": round(statistics.median(times), 1), "bytes": size, "repeats": repeats}


# -- how many adapters stay resident ----------------------------------------------------------------------------


def meminfo_bytes(field: str) -> int:
    """A /proc/meminfo figure (MemTotal, MemAvailable) in bytes."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def bench_resident(requested: int, verify: int = 200) -> dict[str, Any]:
    """Allocate a float32 pool of `requested` tiny-model rank-8 slots (or the most that fits in half of
    the available memory), fill every slot through the cache, then check they are all device hits."""
    cfg = default_llama_config()
    probe = SlotPool(cfg, 1, RANK)
    per_slot = probe.slot_nbytes
    usable = meminfo_bytes("MemAvailable") // 2  # leave room for everything else on the machine
    fits = requested * per_slot <= usable
    slots = requested if fits else usable // per_slot // 1000 * 1000
    adapters = [random_adapter(spec_of(cfg), RANK, 16.0, torch.Generator().manual_seed(i)) for i in range(64)]
    pool = SlotPool(cfg, slots, RANK)
    start = time.perf_counter()
    with memory_cache(pool, adapters, host_bytes=64 * adapters[0].nbytes, load_threads=2) as cache:
        for first in range(0, slots, 2000):  # prefetch in batches: loads overlap on the load threads
            futures = [cache.prefetch(TENANT, f"u{i}", 1) for i in range(first, min(slots, first + 2000))]
            wait(futures)
            assert all(f.exception() is None for f in futures)
        fill_s = time.perf_counter() - start
        leases = [cache.acquire(TENANT, f"u{i}", 1) for i in range(slots)]
        assert all(lease.tier == "device" for lease in leases), "an adapter was evicted during the fill"
        step = max(1, slots // verify)
        assert all(holds(pool, leases[i].slot, adapters[i % len(adapters)]) for i in range(0, slots, step))
        for lease in leases:
            cache.release(lease)
        resident = cache.stats()["resident"]["device"]
    return {
        "resident_adapters": resident,
        "bytes_per_adapter": per_slot,
        "requested": requested,
        "requested_fits": fits,
        "pool_bytes": pool.nbytes,
        "memory_total": meminfo_bytes("MemTotal"),
        "fill_s": round(fill_s, 1),
        "verified_slots": len(range(0, slots, step)),
    }


# -- wiring -------------------------------------------------------------------------------------------------------


@contextmanager
def servers(tmp: Path) -> Iterator[tuple[S3Server, EmbeddedValkey]]:
    s3 = start_weed_mini(tmp / "s3")
    try:
        with EmbeddedValkey(EmbeddedValkeyConfig(data_dir=tmp / "valkey")) as valkey:
            yield s3, valkey
    finally:
        s3.stop()


def timed(label: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    print(f"  {label}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return result


def run(quick: bool, tmp: Path) -> dict[str, Any]:
    from bench_registry import run_registry_bench

    switch = timed("switch", lambda: bench_switch(100_000 if quick else 1_000_000))
    with servers(tmp) as (s3, valkey):
        client = redis.Redis.from_url(valkey.url)
        stores = {"file": open_store((tmp / "objects").as_uri()), "s3": open_store(s3.s3_url("bench", "cache"))}
        loads = timed("loads", lambda: bench_loads(stores, client, 10 if quick else 40, tmp))
        full = timed("full model", lambda: bench_full_model(stores["s3"], 2 if quick else 5))
        reg = timed("registry", lambda: run_registry_bench(valkey.url, 100_000 if quick else 1_000_000))
        client.close()
    resident = timed("resident", lambda: bench_resident(10_000 if quick else 100_000))
    return {
        "switch_us": {k: switch[k] for k in ("device_hit_p50", "device_hit_p99")},
        "load_ms": loads["ms"],
        "full_model_store_p50": full["p50_ms"],
        # same model family on both sides: a BENCH_SHAPE adapter vs the BENCH_SHAPE model, both from S3
        "adapter_vs_full_model_from_s3": round(full["p50_ms"] / loads["ms"]["store_s3_p50"], 1),
        "resident_adapters": resident["resident_adapters"],
        "bytes_per_adapter": resident["bytes_per_adapter"],
        "registry": reg,
        "details": {
            "quick": quick,
            "switch": switch,
            "loads": loads,
            "full_model": full,
            "resident": resident,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
    }


def print_table(result: dict[str, Any]) -> None:
    rows = [
        (
            "switch (device hit) p50 / p99",
            f"{result['switch_us']['device_hit_p50']} / {result['switch_us']['device_hit_p99']} us",
        )
    ]
    rows += [(f"load from {k.removesuffix('_p50')} p50", f"{v} ms") for k, v in result["load_ms"].items()]
    rows += [
        ("full base model from S3 p50", f"{result['full_model_store_p50']} ms"),
        ("full model vs its adapter, both from S3", f"{result['adapter_vs_full_model_from_s3']:,}x"),
        (
            "adapters resident in device slots",
            f"{result['resident_adapters']:,} ({result['bytes_per_adapter']:,} B each)",
        ),
        ("registry users", f"{result['registry']['users']:,}"),
        ("registry bytes per user", f"{result['registry']['bytes_per_user']}"),
        ("registry lookup p99", f"{result['registry']['lookup_p99_us']} us"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'adapter cache benchmark':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if not result["details"]["resident"]["requested_fits"]:
        print(
            f"note: {result['details']['resident']['requested']:,} fp32 slots do not fit in memory; "
            f"used the largest round number that does"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under 2 minutes")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        result = run(args.quick, Path(tmp))
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bench": "cache", **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
