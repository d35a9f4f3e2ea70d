"""The locust workload (loadtest/locustfile.py) against a running `personalize up`: ~15 s headless with 4
locust users; nothing fails, every call kind is measured, and the report's figures agree with the service's
own (feedback acknowledged = feedback applied to adapters, generations served from a tier = cache hits)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loadtest import loadtest_run
from personalize_service.client import PersonalizeClient
from tests.e2e.upserver import UpServer

DURATION_S = 15
USERS = 4
MAX_NEW_TOKENS = 8
WORKLOAD = {
    "population": 1_000_000,
    "zipf_s": 1.1,
    "seed": 7,
    "user_prefix": "locust-e2e-",
    "max_new_tokens": MAX_NEW_TOKENS,
    "prompt_chars": 32,
}
DRAIN_TIMEOUT_S = 300.0
"""The trainer applies every acknowledged event well within this on a busy 2-core machine; not drained by
then is a failure (a generous bound on progress, not a speed check)."""


@pytest.fixture(scope="module")
def run(up_server: UpServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One locust run and its summary (built the way `make loadtest` builds it)."""
    out = tmp_path_factory.mktemp("locust")
    command = loadtest_run.locust_command(up_server.target, out, USERS, USERS, DURATION_S, WORKLOAD)
    with PersonalizeClient(up_server.target) as client:
        with loadtest_run.StatsSampler(client) as sampler:
            done = subprocess.run(command, cwd=loadtest_run.ROOT, capture_output=True, timeout=DURATION_S + 120)
        assert done.returncode == 0, done.stdout.decode(errors="replace")[-4000:]
        sent, served_from = loadtest_run.read_records(out / "records")
        drained = loadtest_run.drain(client, sent, DRAIN_TIMEOUT_S)
        applied = loadtest_run.examples_seen(client, sent)
        summary = loadtest_run.build_summary(
            loadtest_run.read_final_stats(out),
            sampler.samples[0],
            sampler.samples[-1],
            sent,
            applied,
            drained,
            served_from,
            {"locust_exit_code": done.returncode, **WORKLOAD},
        )
    loadtest_run.write_report(out, summary, out / "results")
    return summary, out


def test_no_failures_and_every_call_measured(run: tuple[dict[str, Any], Path]) -> None:
    summary, _ = run
    assert summary["failures"] == 0, summary["calls"]
    assert summary["requests"] > 0 and summary["rps"] > 0
    for call in ("Generate", "GenerateStream", "GenerateStream:ttfp", "SubmitFeedback"):
        assert summary["latency_ms"][call]["p50"] > 0, call
        assert summary["latency_ms"][call]["p50"] <= summary["latency_ms"][call]["p99"]
    assert set(summary["cache_hit_rate"]) == {"device", "host", "disk", "store"}
    assert summary["ttft_ms"] == summary["latency_ms"]["GenerateStream:ttfp"] and summary["ttft_ms"]["p50"] > 0
    itl = summary["itl_ms"]  # a tiny model's gaps may round to 0 ms in locust's buckets
    assert itl == summary["latency_ms"]["GenerateStream:itl"] and 0 <= itl["p50"] <= itl["p99"]
    # A reader that falls behind the engine gets the pieces queued meanwhile joined into one message
    # (engine.RequestHandle.pieces), so on a loaded 2-core machine a stream may arrive as a single piece:
    # the gaps counted are bounded by the tokens asked for, and some stream must have had more than one.
    streams = summary["calls"]["GenerateStream"]["requests"]
    gaps = summary["calls"]["GenerateStream:itl"]["requests"]
    assert 0 < gaps <= streams * (MAX_NEW_TOKENS - 1), (gaps, streams)


def test_report_figures_match_the_service(run: tuple[dict[str, Any], Path]) -> None:
    summary, _ = run
    feedback = summary["feedback"]
    assert feedback["sent"] > 0 and feedback["sent"] == feedback["acked_by_record"]
    assert feedback["drained"], f"trainer still busy after {DRAIN_TIMEOUT_S} s: {feedback}"
    assert feedback["applied_at_load_end"] <= feedback["applied"]
    assert feedback["applied"] == feedback["sent"] and feedback["pending_after_drain"] == 0  # each once
    assert summary["served_from"].get("device", 0) <= summary["cache"]["device"]["hits"]


def test_report_files_written(run: tuple[dict[str, Any], Path]) -> None:
    _, out = run
    for name in (
        "locust_stats.csv",
        "locust_stats_history.csv",
        "locust_failures.csv",
        "report.html",
        "summary.json",
        "latency.png",
        "throughput.png",
        "cache.png",
        "streaming.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "results" / "latest" / "summary.json").read_text())["requests"] > 0
