"""`make loadtest`: start `personalize up`, run the locust workload against it, write a report.

    python loadtest/loadtest_run.py [--duration 60] [--users 20] [--spawn-rate 5] [--workers 2]
        [--population 1000000] [--zipf-s 1.1] [--mix generate=80,stream=10,feedback=10] [--seed 0]
        [--prompt-chars 64] [--max-new-tokens 32] [--adapters 1000] [--drain-timeout 180]
        [--target HOST:PORT [--http-target http://HOST:PORT]] [--protocol grpc|http] [--up-arg=--flag ...]

Steps: `personalize up --workers N` on a temp data dir and a free port (the built-in tiny model; if `up`
refuses N > 1 it warns and uses one worker), wait for SERVING; import an adapter for the --adapters (1000)
hottest users; `locust -f loadtest/locustfile.py --headless` for the bounded time, sampling `Admin.Stats`
every 2 s meanwhile; wait (bounded) for the trainer to apply every feedback event; stop the server.
With --target it uses that running server instead of starting one (give --user-prefix a prefix no earlier
run used, so 'applied' counts this run's events only). `--protocol http` drives the same workload through
the OpenAI-compatible API (`up`'s --http-port, chosen free) instead of the SDK, so two runs compare the
protocols call for call: `make loadtest LOADTEST_ARGS=--protocol=http`.

Writes loadtest/results/<timestamp>/ (and copies it to loadtest/results/latest/):
    locust_stats.csv, locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv
                        locust's CSV (once-a-second snapshots; the history has a row per call name)
    locust_final.json   locust's final stats (what its HTML report and summary.json are computed from)
    report.html         locust's HTML report
    cache_timeline.csv  Admin.Stats samples: cache hits and misses per tier, stream lag
    records/            what each locust process sent feedback for and which tiers served it
    summary.json        requests, failures, rps, latency_ms per call (p50/p95/p99), cache_hit_rate per tier,
                        feedback sent/applied, and the run's parameters and machine
    latency.png, throughput.png, cache.png   (loadtest/plots.py)
    up.log, locust.log  the server's and locust's output

Exit status 0 when locust ran and nothing failed, and no feedback event was lost or applied twice (checked
once the trainer drained the streams; a trainer still busy after --drain-timeout is a warning).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `loadtest` when run as a script

from loadtest import plots
from personalize_service.client import NotFoundError, PersonalizeClient
from personalize_service.net import find_free_port

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
RESULTS = ROOT / "loadtest" / "results"
BANNER_RE = re.compile(rb"personalize up: serving on 127\.0\.0\.1:(\d+)")
HTTP_RE = re.compile(rb"openai\s+http://127\.0\.0\.1:(\d+)/v1")
"""The OpenAI-compatible edge's base URL in up's banner (--protocol http drives it)."""
"""The first line `up` prints once it serves (the router's port when it runs several workers)."""
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
TTFP_SUFFIX = ":ttfp"
"""Request names ending so are a stream's time to first piece, not calls of their own."""
ITL_SUFFIX = ":itl"
"""... and these the gaps between a stream's pieces (inter-token latency)."""
STREAM = "GenerateStream"
PERCENTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
WORKLOAD_FLAGS = (
    "population",
    "zipf_s",
    "mix",
    "feedback_kinds",
    "prompt_chars",
    "max_new_tokens",
    "seed",
    "user_prefix",
    "think_time",
    "call_timeout",
    "protocol",
)


# ---- the server --------------------------------------------------------------------------------------


@dataclass
class Server:
    """A `personalize up` this script started (its own process group), or None fields for --target."""

    target: str
    workers: int
    process: subprocess.Popen[bytes] | None = None
    http_url: str = ""
    """http://host:port of its OpenAI-compatible API ('' if unknown)."""

    def stop(self) -> int | None:
        """SIGTERM, wait; the whole process group is killed if it does not stop in time."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return proc.returncode


def server_env() -> dict[str, str]:
    """This environment without PERSONALIZE_* settings, so `up` runs its defaults (the tiny model)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PERSONALIZE_")}


def launch_up(data_dir: Path, log_path: Path, workers: int, extra: Sequence[str]) -> Server | None:
    """Start `personalize up --workers N` on a free port; the Server once it prints its banner, None if it
    exited refusing `--workers` (AssertionError, with the log tail, for any other failure to start)."""
    command = [
        sys.executable,
        "-m",
        "personalize_service.cli",
        "up",
        "--data-dir",
        str(data_dir),
        "--port",
        "0",
        "--workers",
        str(workers),
        "--http-port",
        str(find_free_port()),
        *extra,
    ]
    offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=server_env(),
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        text = log_path.read_bytes()[offset:]
        found, http = BANNER_RE.search(text), HTTP_RE.search(text)
        if found and http:
            return Server(f"127.0.0.1:{int(found[1])}", workers, proc, f"http://127.0.0.1:{int(http[1])}")
        if proc.poll() is not None:
            if b"--workers" in text and workers > 1:
                return None
            tail = text[-3000:].decode(errors="replace")
            raise AssertionError(f"personalize up exited with {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            Server("", workers, proc).stop()
            raise AssertionError(f"personalize up did not serve within {START_TIMEOUT_S:.0f} s (log: {log_path})")
        time.sleep(0.2)


def start_server(data_dir: Path, log_path: Path, workers: int, extra: Sequence[str]) -> Server:
    """`up --workers N`, falling back to one worker (with a warning) while `up` refuses N > 1."""
    server = launch_up(data_dir, log_path, workers, extra)
    if server is None:
        print(
            f"WARNING: `personalize up --workers {workers}` was refused (see {log_path}); running with "
            "--workers 1 instead",
            file=sys.stderr,
            flush=True,
        )
        server = launch_up(data_dir, log_path, 1, extra)
        assert server is not None
    wait_serving(server.target, time.monotonic() + START_TIMEOUT_S)
    return server


def wait_serving(target: str, deadline: float) -> None:
    """Return once the gRPC health service at `target` answers SERVING."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.RpcError):
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"{target} never answered SERVING")
            time.sleep(0.2)


# ---- the service's own figures: Admin.Stats -----------------------------------------------------------


@dataclass(frozen=True)
class StatsSample:
    """Admin.Stats summed over nodes: cache hits and misses per tier, stream lag (max over nodes)."""

    at: float
    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    stream_lag: int = 0
    nodes: int = 0


def sample_stats(client: PersonalizeClient) -> StatsSample:
    reply = client.stats()
    hits: Counter[str] = Counter()
    misses: Counter[str] = Counter()
    for node in reply.nodes:
        hits.update(dict(node.hits))
        misses.update(dict(node.misses))
    lag = max((node.stream_lag for node in reply.nodes), default=0)  # every node sees the same streams
    return StatsSample(time.time(), dict(hits), dict(misses), lag, len(reply.nodes))


class StatsSampler:
    """Samples Admin.Stats every `period_s` on a thread while the load runs."""

    def __init__(self, client: PersonalizeClient, period_s: float = 2.0) -> None:
        self.client = client
        self.period_s = period_s
        self.samples: list[StatsSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats-sampler", daemon=True)

    def __enter__(self) -> StatsSampler:
        self.samples.append(sample_stats(self.client))
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(sample_stats(self.client))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            with contextlib.suppress(grpc.RpcError):
                self.samples.append(sample_stats(self.client))


def write_timeline(samples: Sequence[StatsSample], path: Path) -> None:
    """cache_timeline.csv: unix time, seconds since the first sample, tier, hits, misses, stream lag."""
    tiers = sorted({t for s in samples for t in (*s.hits, *s.misses)})
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["unix_time", "t_s", "tier", "hits", "misses", "stream_lag"])
        for sample in samples:
            for tier in tiers:
                writer.writerow(
                    [
                        f"{sample.at:.3f}",
                        f"{sample.at - samples[0].at:.2f}",
                        tier,
                        sample.hits.get(tier, 0),
                        sample.misses.get(tier, 0),
                        sample.stream_lag,
                    ]
                )


def cache_figures(before: StatsSample, after: StatsSample) -> tuple[dict[str, float | None], dict[str, Any]]:
    """(hit rate per tier, {tier: {hits, misses}}) over the run: deltas of the service's counters.

    A tier nobody looked up during the run has hit rate None."""
    counts: dict[str, dict[str, int]] = {}
    rates: dict[str, float | None] = {}
    for tier in sorted({*after.hits, *after.misses}):
        hits = after.hits.get(tier, 0) - before.hits.get(tier, 0)
        misses = after.misses.get(tier, 0) - before.misses.get(tier, 0)
        counts[tier] = {"hits": hits, "misses": misses}
        rates[tier] = round(hits / (hits + misses), 4) if hits + misses else None
    return rates, counts


# ---- feedback: sent by locust, applied by the trainer ----------------------------------------------------


def read_records(record_dir: Path) -> tuple[Counter[str], Counter[str]]:
    """(events acknowledged per end user, generations per serving cache tier) over every locust process."""
    feedback: Counter[str] = Counter()
    tiers: Counter[str] = Counter()
    for path in sorted(record_dir.glob("record-*.json")):
        data = json.loads(path.read_text())
        feedback.update(data.get("feedback", {}))
        tiers.update(data.get("cache_tiers", {}))
    return feedback, tiers


@dataclass(frozen=True)
class Drain:
    """How the trainer caught up after the load: applied when the load stopped, whether it drained within
    the wait, after how long, and the events still in the streams then."""

    applied_at_load_end: int
    drained: bool
    seconds: float
    pending: int


def wait_drained(client: PersonalizeClient, users: Mapping[str, int], timeout_s: float) -> bool:
    """Wait until the feedback streams are empty and none of `users` has events pending; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        if sample_stats(client).stream_lag == 0 and not any(pending_events(client, u) for u in users):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


def drain(client: PersonalizeClient, users: Mapping[str, int], timeout_s: float) -> Drain:
    """Read what the trainer applied at the end of the load, then wait (bounded) for it to apply the rest."""
    at_end = examples_seen(client, users)
    started = time.monotonic()
    drained = wait_drained(client, users, timeout_s)
    return Drain(at_end, drained, round(time.monotonic() - started, 1), sample_stats(client).stream_lag)


def pending_events(client: PersonalizeClient, user_id: str) -> int:
    try:
        return int(client.get_adapter(user_id).pending_events)
    except NotFoundError:
        return 0


def examples_seen(client: PersonalizeClient, users: Mapping[str, int]) -> int:
    """Sum of the users' registry `examples_seen` (0 for a user without an adapter)."""
    total = 0
    for user_id in users:
        with contextlib.suppress(NotFoundError):
            total += int(client.get_adapter(user_id).examples_seen)
    return total


# ---- users that already have an adapter ---------------------------------------------------------------

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def tiny_model_adapter(rank: int = 8, seed: int = 0) -> dict[str, bytes]:
    """PEFT files of a LoRA adapter for the built-in tiny model, made by PEFT itself (the README's recipe)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from personalize.model import ModelConfig, load_base_model

    torch.manual_seed(seed)
    model = get_peft_model(
        load_base_model(ModelConfig()).model,
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    with tempfile.TemporaryDirectory(prefix="loadtest-adapter-") as tmp:
        model.save_pretrained(tmp)
        return {name: (Path(tmp) / name).read_bytes() for name in ADAPTER_FILES}


def preload_adapters(
    client: PersonalizeClient, prefix: str, count: int, files: Mapping[str, bytes], threads: int = 8
) -> float:
    """Import `files` as the adapter of the `count` hottest users (ranks 0..count-1); returns seconds taken.

    Real apps have users with adapters from the first request on; without this, only users whose feedback
    the trainer already applied have one, and the cache tiers see little traffic."""
    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda rank: client.import_adapter(f"{prefix}{rank}", files), range(count)):
            pass
    return round(time.monotonic() - started, 1)


# ---- locust ------------------------------------------------------------------------------------------


def locust_command(
    target: str,
    out: Path,
    users: int,
    spawn_rate: float,
    duration_s: int,
    workload: Mapping[str, Any],
    api_key: str = "",
) -> list[str]:
    """The headless locust run writing CSV (full history), final JSON stats and the HTML report to `out`."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        target,
        "-u",
        str(users),
        "-r",
        str(spawn_rate),
        "-t",
        f"{duration_s}s",
        "--stop-timeout",
        "30",
        "--csv",
        str(out / "locust"),
        "--csv-full-history",
        "--json-file",
        str(out / "locust_final"),
        "--html",
        str(out / "report.html"),
        "--record-dir",
        str(out / "records"),
        "--only-summary",
    ]
    for name, value in workload.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    if api_key:
        command += ["--api-key", api_key]
    return command


def run_locust(command: Sequence[str], log_path: Path) -> int:
    """Run locust (bounded by its own -t and --stop-timeout), its output going to the console and `log_path`;
    returns its exit status."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            sys.stdout.write(line.decode(errors="replace"))
        return proc.wait()


def request_figures(final_stats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """requests, failures, rps and latency_ms per call from locust's final stats (its --json-file).

    Time-to-first-piece (':ttfp') and inter-token (':itl') entries get latencies but are not calls: they
    are left out of the request and failure counts and of rps. Percentiles are computed as locust computes
    them (the figures of its console summary and HTML report)."""
    calls = [e for e in final_stats if not e["name"].endswith((TTFP_SUFFIX, ITL_SUFFIX))]
    requests = sum(int(e["num_requests"]) for e in calls)
    failures = sum(int(e["num_failures"]) for e in calls)
    started = min((float(e["start_time"]) for e in final_stats), default=0.0)
    ended = max((float(e["last_request_timestamp"] or 0) for e in final_stats), default=0.0)
    latency: dict[str, dict[str, float]] = {}
    for entry in sorted(final_stats, key=lambda e: str(e["name"])):
        times = {int(float(ms)): int(n) for ms, n in entry["response_times"].items()}
        count = sum(times.values())
        if count:
            latency[entry["name"]] = {key: response_time_percentile(times, count, q) for key, q in PERCENTILES.items()}
    return {
        "requests": requests,
        "failures": failures,
        "rps": round(requests / (ended - started), 3) if ended > started else 0.0,
        "latency_ms": latency,
        "calls": {
            e["name"]: {"requests": int(e["num_requests"]), "failures": int(e["num_failures"])} for e in final_stats
        },
    }


def response_time_percentile(response_times: Mapping[int, int], count: int, q: float) -> int:
    """locust.stats.calculate_response_time_percentile, restated: importing locust here would monkey-patch
    this process with gevent. The smallest bucketed time (ms) with at most (1-q) of `count` above it."""
    within = int(count * q)
    seen = 0
    for ms in sorted(response_times, reverse=True):
        seen += response_times[ms]
        if count - seen <= within:
            return ms
    return 0


def read_final_stats(out: Path) -> list[dict[str, Any]]:
    path = out / "locust_final.json"
    return json.loads(path.read_text()) if path.exists() else []


# ---- the report --------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures came from."""
    model = ""
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = found[1].strip() if found else ""
    memory = 0
    with contextlib.suppress(OSError, ValueError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "device": "cpu (built-in tiny model)",
    }


def build_summary(
    final_stats: Sequence[Mapping[str, Any]],
    before: StatsSample,
    after: StatsSample,
    sent: Counter[str],
    applied: int,
    drained: Drain,
    served_from: Counter[str],
    run: Mapping[str, Any],
) -> dict[str, Any]:
    """summary.json: the figures people read first, then where they came from."""
    figures = request_figures(final_stats)
    rates, counts = cache_figures(before, after)
    locust_sent = figures["calls"].get("SubmitFeedback", {"requests": 0, "failures": 0})
    return {
        "requests": figures["requests"],
        "failures": figures["failures"],
        "rps": figures["rps"],
        "latency_ms": figures["latency_ms"],
        "ttft_ms": figures["latency_ms"].get(STREAM + TTFP_SUFFIX),
        "itl_ms": figures["latency_ms"].get(STREAM + ITL_SUFFIX),
        "cache_hit_rate": rates,
        "feedback": {
            "sent": locust_sent["requests"] - locust_sent["failures"],
            "applied": applied,
            "users": len(sent),
            "acked_by_record": sum(sent.values()),
            "applied_at_load_end": drained.applied_at_load_end,
            "drained": drained.drained,
            "drain_s": drained.seconds,
            "pending_after_drain": drained.pending,
        },
        "cache": counts,
        "served_from": dict(sorted(served_from.items())),
        "calls": figures["calls"],
        "run": dict(run),
        "machine": machine(),
    }


def print_summary(summary: Mapping[str, Any]) -> None:
    print(f"\n{summary['requests']} requests, {summary['failures']} failures, {summary['rps']} requests/s")
    print(f"{'call':<24}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}")
    for name, q in summary["latency_ms"].items():
        print(f"{name:<24}{q['p50']:>9}{q['p95']:>9}{q['p99']:>9}")
    print("streams: time to first token", json.dumps(summary["ttft_ms"]), "inter-token", json.dumps(summary["itl_ms"]))
    print("cache hit rate:", json.dumps(summary["cache_hit_rate"]))
    print("feedback:", json.dumps(summary["feedback"]))


def write_report(out: Path, summary: Mapping[str, Any], results: Path) -> None:
    """summary.json and the plots in `out`, then `out` copied to results/latest."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plots.make_plots(out)
    latest = results / "latest"
    shutil.rmtree(latest, ignore_errors=True)
    shutil.copytree(out, latest, ignore=shutil.ignore_patterns("data"))


def results_dir(results: Path) -> Path:
    out = results / datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=False)
    return out


@contextlib.contextmanager
def serving(args: argparse.Namespace, out: Path) -> Iterator[Server]:
    """The server under test: --target, or a `personalize up` on a temp data dir, stopped afterwards."""
    if args.target:
        yield Server(args.target, 0, http_url=args.http_target)
        return
    with tempfile.TemporaryDirectory(prefix="personalize-loadtest-") as tmp:
        server = start_server(Path(tmp) / "data", out / "up.log", args.workers, args.up_arg)
        print(f"personalize up ({server.workers} worker(s)) serving on {server.target}", flush=True)
        try:
            yield server
        finally:
            code = server.stop()
            print(f"personalize up stopped (exit {code})", flush=True)


def prepare(client: PersonalizeClient, args: argparse.Namespace) -> tuple[int, float]:
    """Give the hottest users adapters (--adapters); returns (how many, seconds it took)."""
    adapters = args.adapters if args.adapters is not None else (0 if args.target else 1000)
    if not adapters:
        return 0, 0.0
    print(f"importing an adapter for each of the {adapters} hottest users...", flush=True)
    return adapters, preload_adapters(client, args.user_prefix, adapters, tiny_model_adapter())


def load(client: PersonalizeClient, server: Server, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run locust while sampling Admin.Stats, then wait for the trainer; returns the summary."""
    adapters, preload_s = prepare(client, args)
    workload = {name: getattr(args, name) for name in WORKLOAD_FLAGS}
    target = server.http_url if args.protocol == "http" else server.target
    if not target:
        raise SystemExit("--protocol http with --target needs --http-target http://HOST:PORT")
    command = locust_command(target, out, args.users, args.spawn_rate, args.duration, workload, args.api_key)
    with StatsSampler(client) as sampler:
        code = run_locust(command, out / "locust.log")
    write_timeline(sampler.samples, out / "cache_timeline.csv")
    sent, served_from = read_records(out / "records")
    print(
        f"waiting up to {args.drain_timeout:.0f} s for the trainer to apply {sum(sent.values())} feedback "
        f"event(s) of {len(sent)} user(s)...",
        flush=True,
    )
    drained = drain(client, sent, args.drain_timeout)
    applied = examples_seen(client, sent)
    run_info = {
        "started": out.name,
        "duration_s": args.duration,
        "users": args.users,
        "spawn_rate": args.spawn_rate,
        "workers": server.workers,
        "nodes": sampler.samples[-1].nodes,
        "target": server.target,
        "external_target": bool(args.target),
        "adapters_preloaded": adapters,
        "preload_s": preload_s,
        "drain_timeout_s": args.drain_timeout,
        "locust_exit_code": code,
        **workload,
    }
    return build_summary(
        read_final_stats(out), sampler.samples[0], sampler.samples[-1], sent, applied, drained, served_from, run_info
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole run; returns the summary (also written to disk)."""
    out = results_dir(args.results)
    with (
        serving(args, out) as server,
        PersonalizeClient(
            server.target, api_key=args.api_key or None, operator_key=args.operator_key or None
        ) as client,
    ):
        summary = load(client, server, args, out)
    write_report(out, summary, args.results)
    print_summary(summary)
    print(f"\nreport: {out} (also {args.results / 'latest'})")
    return summary


def succeeded(summary: Mapping[str, Any]) -> bool:
    """Locust ran clean, something was measured, no event was applied twice, and once the trainer drained
    the streams every acknowledged event was applied (a trainer still busy after the wait only warns)."""
    fb = summary["feedback"]
    if fb["applied"] > fb["sent"] or (fb["drained"] and fb["applied"] != fb["sent"]):
        return False
    return summary["run"]["locust_exit_code"] == 0 and summary["requests"] > 0 and summary["failures"] == 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=60, help="seconds of load")
    ap.add_argument("--users", type=int, default=20, help="locust users (concurrent app connections)")
    ap.add_argument("--spawn-rate", type=float, default=5.0, help="locust users started per second")
    ap.add_argument("--workers", type=int, default=2, help="`personalize up --workers N` (1 while N > 1 is refused)")
    ap.add_argument("--target", default="", help="a running server instead of starting `personalize up`")
    ap.add_argument("--api-key", default=os.environ.get("PERSONALIZE_API_KEY", ""), help="for --target")
    ap.add_argument(
        "--protocol",
        choices=("grpc", "http"),
        default="grpc",
        help="drive the gRPC API (the SDK) or the OpenAI-compatible HTTP API with the same workload",
    )
    ap.add_argument("--http-target", default="", help="http://HOST:PORT of --target's HTTP API (--protocol http)")
    ap.add_argument(
        "--operator-key", default=os.environ.get("PERSONALIZE_OPERATOR_KEY", ""), help="for --target's Stats"
    )
    ap.add_argument(
        "--up-arg",
        action="append",
        default=[],
        help="extra `personalize up` flag (repeatable), e.g. --up-arg=--device-cache --up-arg=64MiB",
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="results folder")
    ap.add_argument(
        "--drain-timeout",
        type=float,
        default=180.0,
        help="seconds to wait after the load for the trainer to apply every feedback event",
    )
    ap.add_argument(
        "--adapters",
        type=int,
        default=None,
        help="the N hottest users get an adapter (ImportAdapter) before the load; default 1000 "
        "(0 with --target: the adapter is made for the built-in tiny model)",
    )
    ap.add_argument("--population", type=int, default=1_000_000)
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--mix", default="generate=80,stream=10,feedback=10")
    ap.add_argument("--feedback-kinds", default="accept=5,correct=3,reject=1,prefer=1")
    ap.add_argument("--prompt-chars", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--user-prefix", default="user-")
    ap.add_argument("--think-time", type=float, default=0.0)
    ap.add_argument("--call-timeout", type=float, default=120.0)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    feedback = summary["feedback"]
    if not feedback["drained"]:
        print(
            f"WARNING: the trainer had applied {feedback['applied']} of {feedback['sent']} feedback events "
            f"{args.drain_timeout:.0f} s after the load ({feedback['pending_after_drain']} still in the "
            "streams); --drain-timeout waits longer",
            file=sys.stderr,
        )
    if not succeeded(summary):
        print("FAILED: failures, a locust error, or feedback not applied (see summary.json)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
