"""Metrics live in a registry per server and are served over HTTP."""

from __future__ import annotations

import urllib.request

from personalize_service.server.metrics import ServiceMetrics, start_metrics_server

NAMES = (
    "personalize_requests_total",
    "personalize_request_seconds",
    "personalize_cache_hits_total",
    "personalize_cache_misses_total",
    "personalize_adapter_load_seconds",
    "personalize_batch_occupancy",
    "personalize_tokens_generated_total",
    "personalize_queue_depth",
    "personalize_feedback_stream_lag",
    "personalize_train_round_seconds",
)


def test_two_servers_in_one_process_keep_separate_metrics() -> None:
    first, second = ServiceMetrics(), ServiceMetrics()
    first.observe_call("personalize.v1.Personalize/Generate", "OK", 0.01)
    first.cache_hits.labels(tier="device").inc(3)
    labels = {"rpc": "personalize.v1.Personalize/Generate", "code": "OK"}
    assert first.registry.get_sample_value("personalize_requests_total", labels) == 1
    assert first.registry.get_sample_value("personalize_cache_hits_total", {"tier": "device"}) == 3
    assert second.registry.get_sample_value("personalize_requests_total", labels) is None


def test_metrics_endpoint_serves_every_metric() -> None:
    metrics = ServiceMetrics()
    metrics.cache_misses.labels(tier="host").inc()
    metrics.adapter_load_seconds.labels(tier="disk").observe(0.02)
    metrics.batch_occupancy.observe(5)
    metrics.tokens_generated.inc(42)
    metrics.queue_depth.set(2)
    metrics.feedback_stream_lag.set(7)
    metrics.train_round_seconds.observe(1.5)
    metrics.observe_call("personalize.v1.Admin/Stats", "OK", 0.001)
    metrics.cache_hits.labels(tier="device").inc()
    server = start_metrics_server(metrics.registry, 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as reply:
            body = reply.read().decode()
    finally:
        server.stop()
    for name in NAMES:
        assert name in body, name
    assert "personalize_tokens_generated_total 42.0" in body


def test_observe_call_counts_each_rpc_and_code_apart() -> None:
    """observe_call keeps the label children it counts in: interleaved pairs still land each in its own."""
    metrics = ServiceMetrics()
    calls = [("a/Generate", "OK"), ("a/Generate", "NOT_FOUND"), ("a/GetAdapter", "OK"), ("a/Generate", "OK")]
    for rpc, code in calls:
        metrics.observe_call(rpc, code, 0.01)
    sample = metrics.registry.get_sample_value
    assert sample("personalize_requests_total", {"rpc": "a/Generate", "code": "OK"}) == 2
    assert sample("personalize_requests_total", {"rpc": "a/Generate", "code": "NOT_FOUND"}) == 1
    assert sample("personalize_requests_total", {"rpc": "a/GetAdapter", "code": "OK"}) == 1
    assert sample("personalize_request_seconds_count", {"rpc": "a/Generate"}) == 3
    assert sample("personalize_request_seconds_count", {"rpc": "a/GetAdapter"}) == 1
