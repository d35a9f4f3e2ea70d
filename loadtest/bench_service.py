"""The service against its own engine: `personalize up` (a subprocess, over gRPC) and the same `Engine`
driven in this process, under the same load, in one run.

Load: `clients` concurrent closed-loop callers (default 32, the engine's batch), each making `calls`
Generate calls back to back, for every new-token count (default 32, 64 and 512), unary and streaming,
on the base model and on 32 distinct adapters (user i has adapter i; the same random PEFT adapters are
imported into the service and written into the in-process engine's slots). Greedy, the same prompts on
both sides, so both generate the same tokens. tokens/s = completion tokens of all calls / wall seconds.

Each (engine, service) pair runs `repeat` times interleaved, in ABBA order (engine first in even repeats,
service first in odd ones, so a drifting machine load favours neither); medians are reported (the ratio
is the median of the per-pair ratios) with every pair's figures, the ratios' min and max and the 1-minute
load average before and after each pair; each pair must produce the same number of tokens.

Also, once per (new tokens, adapters): the engine alone (`engine_alone`), no caller threads at all:
waves of `clients` requests submitted at once and stepped on one thread until idle, the ceiling that
neither side's callers reach; `service_over_engine_alone` is the service against it.

Engine side: `Engine.start()` and `clients` threads of this process calling submit() then result()
(unary) or iterating the pieces (streaming). Service side: one client process apart (spawned, grpc's
Python client, one channel, `clients` threads, `x-user-id` metadata as the SDK sends), whose own CPU
seconds are reported: on a 2-core machine the client competes with the server for the cores.

CPU per token, the figure a loaded machine disturbs least: `service_cpu_over_engine_cpu` is the CPU seconds
of `up`'s process tree (worker, trainer, Valkey) over those of this process (engine and caller threads)
for the same tokens, the client's own excluded on both sides (the in-process callers are counted on the
engine's side, so the ratio slightly favours the service). Wall-clock ratios on a shared machine also
favour whichever side has more processes: the kernel shares the cores per thread, not per benchmark side.

    python loadtest/bench_service.py [--quick] [--json loadtest/results/bench_service.json] [--tokens 32,64,512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"unary": 0.90, "stream": 0.85}
"""service / engine tokens/s each mode must reach."""
RANK = 8


@dataclass(frozen=True)
class Load:
    clients: int
    calls: int
    """Calls per client per measurement."""
    new_tokens: int


def prompts(n: int) -> list[str]:
    return [f"User {i} asks: tell me something about the number {i * 7 + 3}." for i in range(n)]


# ---- the client process (service side) ------------------------------------------------------------------


def client_run(target: str, load: Load, streaming: bool, base: bool) -> dict[str, float]:
    """In the client process: `load` against `target`; tokens, wall and this process's CPU seconds."""
    import grpc

    from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
    from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc

    texts = prompts(load.clients)
    with grpc.insecure_channel(target) as channel:
        api = pb_grpc.PersonalizeStub(channel)

        def one(index: int) -> int:
            user = f"user-{index}"
            request = pb.GenerateRequest(
                user_id=user, prompt=texts[index], max_new_tokens=load.new_tokens, use_base_model=base
            )
            metadata = (("x-user-id", user),)
            tokens = messages = 0
            for _ in range(load.calls):
                if streaming:
                    for chunk in api.GenerateStream(request, timeout=600, metadata=metadata):
                        messages += 1
                        if chunk.done:
                            tokens += chunk.final.completion_tokens
                else:
                    tokens += api.Generate(request, timeout=600, metadata=metadata).completion_tokens
                    messages += 1
            return tokens, messages

        start_cpu, start = os.times(), time.perf_counter()
        with ThreadPoolExecutor(load.clients) as pool:
            counts = list(pool.map(one, range(load.clients)))
        wall, end_cpu = time.perf_counter() - start, os.times()
    cpu = (end_cpu.user - start_cpu.user) + (end_cpu.system - start_cpu.system)
    tokens, messages = sum(t for t, _ in counts), sum(m for _, m in counts)
    return {
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "client_cpu_s": cpu,
        "messages_per_call": messages / (load.clients * load.calls),
    }


# ---- the engine in process ---------------------------------------------------------------------------------


def engine_run(engine: Any, load: Load, streaming: bool, base: bool) -> dict[str, float]:
    from personalize.engine.types import SamplingParams

    texts = prompts(load.clients)
    params = SamplingParams(max_new_tokens=load.new_tokens)

    def one(index: int) -> int:
        tokens = 0
        for _ in range(load.calls):
            handle = engine.submit(texts[index], params, slot=None if base else index)
            if streaming:
                for _piece in handle:
                    pass
            tokens += handle.result().completion_tokens
        return tokens

    start, start_cpu = time.perf_counter(), process_cpu_s()
    with ThreadPoolExecutor(load.clients) as pool:
        tokens = sum(pool.map(one, range(load.clients)))
    wall, cpu = time.perf_counter() - start, process_cpu_s() - start_cpu
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall, "cpu_s": cpu}


def process_cpu_s() -> float:
    """User + system CPU seconds of this process (the engine and its caller threads)."""
    t = os.times()
    return t.user + t.system


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` and every live descendant (up's worker, trainer, Valkey)."""
    import psutil  # comes with locust, a dev dependency

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def engine_ceiling(engine: Any, load: Load, base: bool) -> dict[str, float]:
    """The engine alone, no caller threads: `load.calls` waves of `load.clients` requests submitted at once
    and stepped on this thread until idle (the engine's own thread paused meanwhile)."""
    from personalize.engine.types import SamplingParams

    texts = prompts(load.clients)
    params = SamplingParams(max_new_tokens=load.new_tokens)
    engine.stop()
    try:
        start, tokens = time.perf_counter(), 0
        for _ in range(load.calls):
            handles = [engine.submit(texts[i], params, slot=None if base else i) for i in range(load.clients)]
            engine.run_until_idle()
            tokens += sum(h.result().completion_tokens for h in handles)
        wall = time.perf_counter() - start
    finally:
        engine.start()
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall}


def build_engine(base_model: Any, adapters: list[Any], max_batch: int, stream_interval: int) -> Any:
    from personalize.engine.engine import Engine, EngineConfig
    from personalize.lora.slots import SlotPool

    pool = SlotPool(base_model.config, len(adapters), RANK, dtype=base_model.dtype, device=base_model.device)
    for slot, adapter in enumerate(adapters):
        pool.set_slot(slot, adapter)
    engine = Engine(base_model, EngineConfig(max_batch=max_batch, stream_interval=stream_interval), pool)
    engine.start()
    return engine


def random_adapters(base_model: Any, n: int) -> list[Any]:
    import torch

    from personalize.lora.format import AdapterSpec, random_adapter

    spec = AdapterSpec.for_model(base_model, RANK)
    generator = torch.Generator().manual_seed(0)
    return [random_adapter(spec, RANK, 2.0 * RANK, generator) for _ in range(n)]


def service_run(client: Any, up: Any, load: Load, streaming: bool, base: bool) -> dict[str, float]:
    """`client_run` in the client process, with the CPU seconds `up`'s process tree spent meanwhile."""
    before = tree_cpu_s(up.process.pid)
    out = client.submit(client_run, up.target, load, streaming, base).result()
    return {**out, "server_cpu_s": tree_cpu_s(up.process.pid) - before}


# ---- one run ---------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from personalize.lora.format import AdapterSpec, write_peft
    from personalize.model import ModelConfig, load_base_model
    from personalize_service.client import PersonalizeClient
    from tests.e2e.upserver import start_up

    base_model = load_base_model(ModelConfig())
    adapters = random_adapters(base_model, args.clients)
    spec = AdapterSpec.for_model(base_model, RANK)
    engine = build_engine(base_model, adapters, args.clients, args.stream_interval)
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-service-") as tmp,
        ProcessPoolExecutor(1, mp_context=get_context("spawn")) as client,
    ):
        root = Path(tmp)
        torch.set_num_threads(args.torch_threads)  # as many as the service's worker gets: the same compute
        up = start_up(
            root / "data",
            root / "up.log",
            "--threads",
            "128",
            "--max-rank",
            str(RANK),
            "--max-batch",
            str(args.clients),
            "--torch-threads",
            str(args.torch_threads),
            "--stream-interval",
            str(args.stream_interval),
        )
        try:
            with PersonalizeClient(up.target, timeout=120) as sdk:
                for i, adapter in enumerate(adapters):
                    sdk.import_adapter(f"user-{i}", write_peft(adapter, spec))
            warm = Load(args.clients, 1, 8)
            for base in (True, False):  # warm-up of both sides: channels, adapters resident, allocator
                engine_run(engine, warm, False, base)
                client.submit(client_run, up.target, warm, False, base).result()
                client.submit(client_run, up.target, warm, True, base).result()
            for new_tokens in args.tokens:
                load = Load(args.clients, args.calls if new_tokens <= 64 else max(1, args.calls // 2), new_tokens)
                once = Load(args.clients, 1, new_tokens)  # warm-up at this length: KV pages touched on both sides
                engine_run(engine, once, False, True)
                client.submit(client_run, up.target, once, False, True).result()
                for base in (True, False):
                    ceiling = engine_ceiling(engine, load, base)
                    for streaming in [mode == "stream" for mode in args.modes]:
                        engine_tps, service_tps, ratios, cpu, wall, cpu_ratios, msgs = [], [], [], [], [], [], []
                        load_avg = [os.getloadavg()[0]]
                        for rep in range(args.repeat):  # interleaved ABBA: both sides see the same machine
                            if rep % 2 == 0:
                                ours = engine_run(engine, load, streaming, base)
                                service = service_run(client, up, load, streaming, base)
                            else:
                                service = service_run(client, up, load, streaming, base)
                                ours = engine_run(engine, load, streaming, base)
                            load_avg.append(os.getloadavg()[0])
                            assert ours["tokens"] == service["tokens"], (ours, service)  # the same work
                            engine_tps.append(ours["tokens_per_s"])
                            service_tps.append(service["tokens_per_s"])
                            ratios.append(service["tokens_per_s"] / ours["tokens_per_s"])
                            cpu.append(service["client_cpu_s"])
                            cpu_ratios.append(service["server_cpu_s"] / ours["cpu_s"])
                            wall.append(service["seconds"])
                            msgs.append(service["messages_per_call"])
                        row = {
                            "new_tokens": new_tokens,
                            "adapters": "base" if base else f"{args.clients} distinct",
                            "mode": "stream" if streaming else "unary",
                            "calls": load.calls * load.clients,
                            "tokens": ours["tokens"],
                            "engine_tokens_per_s": statistics.median(engine_tps),
                            "service_tokens_per_s": statistics.median(service_tps),
                            "service_over_engine": statistics.median(ratios),
                            "service_over_engine_each": ratios,
                            "service_over_engine_min": min(ratios),
                            "service_over_engine_max": max(ratios),
                            "engine_tokens_per_s_each": engine_tps,
                            "service_tokens_per_s_each": service_tps,
                            "load_avg_1m": [round(a, 2) for a in load_avg],
                            "engine_alone_tokens_per_s": ceiling["tokens_per_s"],
                            "service_over_engine_alone": statistics.median(service_tps) / ceiling["tokens_per_s"],
                            "client_cpu_s": statistics.median(cpu),
                            "service_cpu_over_engine_cpu": statistics.median(cpu_ratios),
                            "service_cpu_over_engine_cpu_each": [round(r, 3) for r in cpu_ratios],
                            "service_seconds": statistics.median(wall),
                            "messages_per_call": statistics.median(msgs),
                        }
                        rows.append(row)
                        print_row(row)
        finally:
            up.stop()
            engine.stop()
    return {"config": {**vars(args), "json": str(args.json)}, "rows": rows, "summary": summarize(rows, args.tokens)}


def summarize(rows: list[dict[str, Any]], tokens: list[int]) -> dict[str, Any]:
    """Worst service/engine ratio per mode, and tokens/s at the longest vs the shortest new-token count."""
    out: dict[str, Any] = {}
    for mode, target in TARGETS.items():
        if not any(r["mode"] == mode for r in rows):
            continue
        worst = min(r["service_over_engine"] for r in rows if r["mode"] == mode)
        out[f"{mode}_service_over_engine_alone_min"] = min(
            r["service_over_engine_alone"] for r in rows if r["mode"] == mode
        )
        out[f"{mode}_service_over_engine_min"] = worst
        out[f"{mode}_service_cpu_over_engine_cpu_max"] = max(
            r["service_cpu_over_engine_cpu"] for r in rows if r["mode"] == mode
        )
        out[f"{mode}_target"] = target
        out[f"{mode}_ok"] = worst >= target
    lo, hi = min(tokens), max(tokens)
    for side in ("engine", "service"):
        for mode in TARGETS:
            for kind in ("base", "distinct"):
                pick = [r for r in rows if r["mode"] == mode and r["adapters"].endswith(kind)]
                short = [r[f"{side}_tokens_per_s"] for r in pick if r["new_tokens"] == lo]
                long = [r[f"{side}_tokens_per_s"] for r in pick if r["new_tokens"] == hi]
                if short and long:
                    out[f"{side}_{mode}_{kind}_tokens_per_s_{hi}_over_{lo}"] = long[0] / short[0]
    return out


def print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['new_tokens']:>5} {row['adapters']:>12} {row['mode']:>6}  engine {row['engine_tokens_per_s']:8.0f} tok/s"
        f"  service {row['service_tokens_per_s']:8.0f} tok/s  ratio {row['service_over_engine']:.2f}"
        f" [{row['service_over_engine_min']:.2f}-{row['service_over_engine_max']:.2f}]"
        f"  (engine alone {row['engine_alone_tokens_per_s']:.0f}: {row['service_over_engine_alone']:.2f})"
        f"  cpu service/engine {row['service_cpu_over_engine_cpu']:.2f}"
        f"  client cpu {row['client_cpu_s']:.1f}s of {row['service_seconds']:.1f}s"
        f"  msgs/call {row['messages_per_call']:.1f}  load {row['load_avg_1m'][-1]}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 calls per client (1 above 64 new tokens)")
    ap.add_argument("--json", type=Path, help="write the result here")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--calls", type=int, default=0, help="calls per client per measurement (default 4; --quick 2)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads of both engines (the worker's)")
    ap.add_argument("--repeat", type=int, default=0, help="interleaved repetitions, median (default 3; --quick 1)")
    ap.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=[32, 64, 512])
    ap.add_argument(
        "--modes", type=lambda s: s.split(","), default=["unary", "stream"], help="unary,stream or either alone"
    )
    ap.add_argument(
        "--stream-interval",
        type=int,
        default=4,
        help="tokens per streamed piece after the first, on both sides (the engine's stream_interval; up's default 4)",
    )
    args = ap.parse_args()
    args.calls = args.calls or (2 if args.quick else 4)
    args.repeat = args.repeat or (1 if args.quick else 3)
    started = time.perf_counter()
    result = measure(args)
    result["seconds"] = round(time.perf_counter() - started, 1)
    for key, value in result["summary"].items():
        print(f"{key:<48} {value:.3f}" if isinstance(value, float) else f"{key:<48} {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
