"""Prometheus metrics of one server instance.

Each `ServiceMetrics` owns its own CollectorRegistry, so several servers (and tests) can live in one
process. Names (all prefixed `personalize_`):

    requests_total{rpc,code}            calls finished, by method and gRPC status code
                                        (rpc="personalize.v1.Personalize/Generate", code="NOT_FOUND")
    request_seconds{rpc}                call latency (streams: until the last chunk)
    request_bytes_total{rpc}            bytes of request messages parsed for the handlers (a call refused
                                        on its headers adds nothing: its messages are never read)
    cache_hits_total{tier}              adapter found in tier (device, host, disk, store)
    cache_misses_total{tier}            adapter not in tier (looked further down)
    adapter_load_seconds{tier}          time to bring an adapter into a device slot from tier
    batch_occupancy                     running requests per decode step (histogram; mean = sum/count)
    tokens_generated_total              completion tokens produced (tokens/s = rate())
    queue_depth                         requests waiting to join the running batch
    feedback_stream_lag                 feedback events not yet applied to an adapter
    train_round_seconds                 duration of one trainer round
    time_to_first_token_seconds         submit -> first completion token (histogram, as vLLM's)
    inter_token_latency_seconds         between consecutive completion tokens (histogram, one per token)
    e2e_request_latency_seconds         submit -> last token of a finished request (histogram)
    request_queue_seconds               waiting before the request joined the running batch (histogram)
    prompt_tokens_total                 prompt tokens of finished requests
    completion_tokens_total             completion tokens of finished requests (= the responses' usage)
    requests_running, requests_waiting  requests in the running batch / waiting to join it
    lane_occupancy                      running requests / max_batch (0..1)
    slot_occupancy                      device adapter slots holding an adapter / slots (0..1)
    cache_evictions_total{tier}         adapters pushed out of a tier (device, host, disk) to make room

`TrainerMetrics` (the trainer's own port, `trainer.metrics_port`), prefixed `personalize_trainer_`:

    rounds_total                        rounds that took events
    round_seconds                       duration of one round (histogram)
    round_users, round_events           users trained and events taken per round (histograms)
    events_total, published_total       events taken, versions published
    stream_lag{partition}               events appended but not yet acknowledged, per partition
    dead_letters_total                  events moved to the dead-letter stream
    publish_failures_total              publishes that failed (store or registry unreachable)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from personalize.engine.types import GenerationResult
    from personalize.feedback.trainer import RoundReport

PREFIX = "personalize"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_OCCUPANCY_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_ROUND_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class ServiceMetrics:
    """All metric objects of one server, registered in `registry` (a fresh one by default)."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "gRPC calls finished, by method and status code.", ["rpc", "code"], registry=r
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_request_seconds", "gRPC call latency in seconds.", ["rpc"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self._call_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        """(rpc, code) -> the requests and request_seconds children observe_call counts in."""
        self.request_bytes = Counter(
            f"{PREFIX}_request_bytes", "Bytes of request messages parsed for the handlers.", ["rpc"], registry=r
        )
        self.cache_hits = Counter(
            f"{PREFIX}_cache_hits", "Adapter lookups answered by a cache tier.", ["tier"], registry=r
        )
        self.cache_misses = Counter(
            f"{PREFIX}_cache_misses", "Adapter lookups a cache tier could not answer.", ["tier"], registry=r
        )
        self.adapter_load_seconds = Histogram(
            f"{PREFIX}_adapter_load_seconds",
            "Seconds to load an adapter into a device slot, by tier.",
            ["tier"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_occupancy = Histogram(
            f"{PREFIX}_batch_occupancy", "Running requests per decode step.", buckets=_OCCUPANCY_BUCKETS, registry=r
        )
        self.tokens_generated = Counter(f"{PREFIX}_tokens_generated", "Completion tokens generated.", registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting to join the running batch.", registry=r)
        self.feedback_stream_lag = Gauge(
            f"{PREFIX}_feedback_stream_lag", "Feedback events appended but not yet applied to an adapter.", registry=r
        )
        self.train_round_seconds = Histogram(
            f"{PREFIX}_train_round_seconds", "Seconds per trainer round.", buckets=_ROUND_BUCKETS, registry=r
        )

        def seconds(name: str, doc: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Histogram:
            return Histogram(f"{PREFIX}_{name}_seconds", doc, buckets=buckets, registry=r)

        self.time_to_first_token = seconds("time_to_first_token", "Seconds from submit to the first completion token.")
        self.inter_token_latency = seconds(
            "inter_token_latency", "Seconds between consecutive completion tokens of a request.", _TOKEN_BUCKETS
        )
        self.e2e_latency = seconds(
            "e2e_request_latency", "Seconds from submit to the last token of a finished request."
        )
        self.queue_seconds = seconds("request_queue", "Seconds a request waited before joining the running batch.")
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.completion_tokens = Counter(
            f"{PREFIX}_completion_tokens", "Completion tokens of finished requests.", registry=r
        )
        self.requests_running = Gauge(f"{PREFIX}_requests_running", "Requests in the running batch.", registry=r)
        self.requests_waiting = Gauge(f"{PREFIX}_requests_waiting", "Requests waiting to join the batch.", registry=r)
        self.lane_occupancy = Gauge(f"{PREFIX}_lane_occupancy", "Running requests / max_batch.", registry=r)
        self.slot_occupancy = Gauge(
            f"{PREFIX}_slot_occupancy", "Device adapter slots holding an adapter / slots.", registry=r
        )
        self.cache_evictions = Counter(
            f"{PREFIX}_cache_evictions", "Adapters evicted from a tier to make room.", ["tier"], registry=r
        )

    def observe_result(self, result: GenerationResult) -> None:
        """Latencies and token counts of one finished request."""
        self.prompt_tokens.inc(result.prompt_tokens)
        self.completion_tokens.inc(result.completion_tokens)
        t = result.timings
        if t is None or not t.first_token:
            return
        if t.admitted:
            self.queue_seconds.observe(t.admitted - t.submitted)
        self.time_to_first_token.observe(t.first_token - t.submitted)
        self.e2e_latency.observe(t.finished - t.submitted)
        for gap in t.token_gaps:
            self.inter_token_latency.observe(gap)

    def observe_call(self, rpc: str, code: str, seconds: float) -> None:
        """Count one finished call of method `rpc` (e.g. `Generate`) with status `code` (e.g. `OK`)."""
        children = self._call_children.get((rpc, code))
        if children is None:  # labels() takes a lock and builds a key each call: look each pair up once
            children = (self.requests.labels(rpc=rpc, code=code), self.request_seconds.labels(rpc=rpc))
            self._call_children[(rpc, code)] = children
        children[0].inc()
        children[1].observe(seconds)


@dataclass
class TrainerMetrics:
    """The trainer's metric objects, registered in `registry` (served on trainer.metrics_port)."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r, p = self.registry, f"{PREFIX}_trainer"
        self.rounds = Counter(f"{p}_rounds", "Trainer rounds that took events.", registry=r)
        self.round_seconds = Histogram(
            f"{p}_round_seconds", "Seconds per trainer round.", buckets=_ROUND_BUCKETS, registry=r
        )
        self.round_users = Histogram(f"{p}_round_users", "Users trained per round.", buckets=_COUNT_BUCKETS, registry=r)
        self.round_events = Histogram(
            f"{p}_round_events", "Events taken per round.", buckets=_COUNT_BUCKETS, registry=r
        )
        self.events = Counter(f"{p}_events", "Feedback events taken into rounds.", registry=r)
        self.published = Counter(f"{p}_published", "Adapter versions published.", registry=r)
        self.stream_lag = Gauge(
            f"{p}_stream_lag", "Events appended but not yet acknowledged.", ["partition"], registry=r
        )
        self.dead_letters = Counter(f"{p}_dead_letters", "Events moved to the dead-letter stream.", registry=r)
        self.publish_failures = Counter(f"{p}_publish_failures", "Adapter publishes that failed.", registry=r)

    def observe_round(self, report: RoundReport) -> None:
        self.rounds.inc()
        self.round_seconds.observe(report.seconds)
        self.round_users.observe(report.users)
        self.round_events.observe(report.events)
        self.events.inc(report.events)
        self.published.inc(len(report.published))
        self.dead_letters.inc(report.dead_lettered)
        self.publish_failures.inc(report.publish_failures)

    def set_lag(self, lag: dict[int, int]) -> None:
        for partition, events in lag.items():
            self.stream_lag.labels(partition=str(partition)).set(events)


@dataclass
class MetricsServer:
    """A running /metrics HTTP endpoint; `stop()` shuts it down."""

    port: int
    _httpd: WSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve `registry` at http://host:port/metrics in a daemon thread; port 0 picks a free port.

    Raises OSError if the port is taken.
    """
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(port=httpd.server_address[1], _httpd=httpd, _thread=thread)
