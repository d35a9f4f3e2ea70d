"""Serving metrics, traces and access logs over a real worker (Valkey registry and stream, file store)
behind a real router, all on loopback in this process, spans kept by an in-memory exporter."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from personalize import bootstrap
from personalize.adapters.registry import RegistryConfig
from personalize.config import Config, LoraConfig
from personalize.feedback.stream import StreamConfig
from personalize.feedback.trainer import Trainer, TrainerConfig
from personalize.lora.format import random_adapter, write_peft
from personalize.lora.slots import slot_nbytes
from personalize.model import default_llama_config
from personalize.routing.membership import NodeInfo
from personalize.worker import Worker
from personalize_service.client import NotFoundError, PersonalizeClient
from personalize_service.client.cluster import Cluster
from personalize_service.server.base import ServiceConfig
from personalize_service.server.metrics import ServiceMetrics, TrainerMetrics, start_metrics_server
from personalize_service.server.observe import AccessLog, TrainerObserver
from personalize_service.server.router import RouterConfig, create_router, worker_channel_opener
from personalize_service.server.worker import MetricsRefresher, create_server

USER = "observed-user-7f3a"
ACCESS_KEY = "test-access-key"
SLOT = slot_nbytes(default_llama_config(), 8)


@pytest.fixture(scope="module")
def exporter(span_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    return span_exporter


@dataclass
class Stack:
    worker: Worker
    metrics: ServiceMetrics
    router_address: str
    access_log: Path


@pytest.fixture
def stack(
    tmp_path: Path, valkey_url: str, redis_client: redis.Redis, exporter: InMemorySpanExporter
) -> Iterator[Stack]:
    config = Config(
        node_id="worker-obs",
        data_dir=str(tmp_path / "data"),
        load_timeout_s=10.0,
        lora=LoraConfig(r_max=8, device_bytes=2 * SLOT, host_bytes=1 << 24, disk_bytes=1 << 24),
        registry=RegistryConfig(url=valkey_url),
        store_url=(tmp_path / "objects").as_uri(),
        feedback=StreamConfig(partitions=2),
    )
    worker = bootstrap.worker(config)
    worker.start()
    metrics = ServiceMetrics()
    access_log = tmp_path / "access.jsonl"
    service = ServiceConfig(port=0, access_log=str(access_log), access_log_key=ACCESS_KEY)
    server, port = create_server(service, worker, metrics)
    server.start()
    cluster = Cluster(None, worker_channel_opener(RouterConfig()))
    cluster.apply({"worker-obs": NodeInfo("worker-obs", f"127.0.0.1:{port}", 4.0)})
    router, router_port = create_router(replace(service, access_log=""), cluster, ServiceMetrics())
    router.start()
    exporter.clear()
    try:
        yield Stack(worker, metrics, f"127.0.0.1:{router_port}", access_log)
    finally:
        router.stop(None)
        cluster.stop()
        server.stop(None)
        worker.stop()


def _give_adapter(worker: Worker) -> None:
    import torch

    adapter = random_adapter(worker.spec, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(3), std=0.2)
    worker.import_adapter("default", USER, write_peft(adapter, worker.spec))


def _trace(exporter: InMemorySpanExporter, trace_id: int) -> dict[str, ReadableSpan]:
    spans = [s for s in exporter.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id]
    return {s.name: s for s in spans}


def test_one_generate_through_the_router_is_one_trace(stack: Stack, exporter: InMemorySpanExporter) -> None:
    _give_adapter(stack.worker)
    with (
        PersonalizeClient(stack.router_address) as client,
        trace.get_tracer("test").start_as_current_span("app") as app,
    ):
        client.generate(USER, "Tell me about LoRA", max_new_tokens=4)
    spans = _trace(exporter, app.get_span_context().trace_id)
    wanted = {"router Generate", "worker Generate", "adapter.load", "engine.queue", "engine.prefill", "engine.decode"}
    assert wanted <= set(spans), sorted(spans)
    parent = {name: span.parent.span_id if span.parent else None for name, span in spans.items()}
    assert parent["router Generate"] == app.get_span_context().span_id
    assert parent["worker Generate"] == spans["router Generate"].context.span_id
    for stage in ("adapter.load", "engine.queue", "engine.prefill", "engine.decode"):
        assert parent[stage] == spans["worker Generate"].context.span_id, stage
    assert spans["adapter.load"].attributes["cache_tier"] in ("device", "host", "disk", "store")


def test_a_feedback_events_trace_holds_the_trainers_round_and_publish(
    stack: Stack, exporter: InMemorySpanExporter
) -> None:
    with (
        PersonalizeClient(stack.router_address) as client,
        trace.get_tracer("test").start_as_current_span("app") as app,
    ):
        client.feedback(USER, "Q: hi?\nA: ", "meh", kind="correct", correction="Ciao!")
    worker = stack.worker
    assert worker.stream is not None
    metrics = TrainerMetrics()
    config = TrainerConfig(steps=1, max_steps=1, block_ms=50, claim_idle_ms=0, linger_ms=0)
    observer = TrainerObserver(metrics, worker.stream.lag_by_partition)
    trainer = Trainer(config, worker.base, worker.repo, worker.stream, consumer="t-obs", on_round=observer)
    worker.stream.ensure_group()
    report = trainer.run_round()
    assert report.published, report
    spans = _trace(exporter, app.get_span_context().trace_id)
    assert {"router SubmitFeedback", "worker SubmitFeedback", "trainer.round", "trainer.publish"} <= set(spans)
    assert spans["trainer.round"].parent.span_id == spans["worker SubmitFeedback"].context.span_id
    assert spans["trainer.publish"].parent.span_id == spans["trainer.round"].context.span_id
    assert metrics.rounds._value.get() == 1 and metrics.published._value.get() == 1
    assert sum(metrics.stream_lag.labels(partition=str(p))._value.get() for p in range(2)) == 0


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        families = text_string_to_metric_families(reply.read().decode())
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_metrics_show_latencies_and_the_responses_token_usage(stack: Stack) -> None:
    with PersonalizeClient(stack.router_address) as client:
        answers = [client.generate(f"m-user-{i}", "Hello, world", max_new_tokens=3 + i) for i in range(3)]
        stream = client.generate_stream("m-user-9", "The quick brown fox", max_new_tokens=5)
        list(stream)
    MetricsRefresher(stack.metrics, stack.worker).refresh()
    http = start_metrics_server(stack.metrics.registry, 0)
    try:
        samples = _scrape(http.port)
    finally:
        http.stop()
    calls = len(answers) + 1
    final = stream.response
    assert final is not None
    completion = sum(a.completion_tokens for a in answers) + final.completion_tokens
    prompt = sum(a.prompt_tokens for a in answers) + final.prompt_tokens
    assert samples[("personalize_completion_tokens_total", ())] == completion
    assert samples[("personalize_prompt_tokens_total", ())] == prompt
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_seconds"):
        assert samples[(f"personalize_{name}_count", ())] == calls, name
        assert samples[(f"personalize_{name}_sum", ())] > 0, name
    assert samples[("personalize_inter_token_latency_seconds_count", ())] == completion - calls
    assert samples[("personalize_requests_running", ())] == 0
    assert ("personalize_lane_occupancy", ()) in samples and ("personalize_slot_occupancy", ()) in samples


def test_an_access_log_line_per_call_without_the_user_id(stack: Stack) -> None:
    _give_adapter(stack.worker)
    with PersonalizeClient(stack.router_address) as client:
        client.generate(USER, "Hello, world", max_new_tokens=2)
        with pytest.raises(NotFoundError):
            client.get_adapter("nobody-" + USER)
    text = stack.access_log.read_text(encoding="utf-8")
    assert USER not in text
    lines = [json.loads(line) for line in text.splitlines()]
    by_rpc = {line["rpc"]: line for line in lines}
    generate = by_rpc["personalize.v1.Personalize/Generate"]
    assert generate["code"] == "OK" and generate["tenant"] == "default" and generate["role"] == "worker"
    assert generate["user"] == AccessLog(ACCESS_KEY).user_hash("default", USER)
    assert generate["adapter_version"] == 1 and generate["cache_tier"] in ("device", "host", "disk", "store")
    assert generate["node"] == "worker-obs" and generate["latency_ms"] > 0
    missing = by_rpc["personalize.v1.Personalize/GetAdapter"]
    assert missing["code"] == "NOT_FOUND" and missing["user"] == AccessLog(ACCESS_KEY).user_hash(
        "default", "nobody-" + USER
    )
