"""Prometheus metrics of one server instance.

Each `ServiceMetrics` owns its own CollectorRegistry, so several servers (and tests) can live in one
process. Names (all prefixed `personalize_`):

    requests_total{rpc,code}            calls finished, by method and gRPC status code
                                        (rpc="personalize.v1.Personalize/Generate", code="NOT_FOUND")
    request_seconds{rpc}                call latency (streams: until the last chunk)
    cache_hits_total{tier}              adapter found in tier (device, host, disk, store)
    cache_misses_total{tier}            adapter not in tier (looked further down)
    adapter_load_seconds{tier}          time to bring an adapter into a device slot from tier
    batch_occupancy                     running requests per decode step (histogram; mean = sum/count)
    tokens_generated_total              completion tokens produced (tokens/s = rate())
    queue_depth                         requests waiting to join the running batch
    feedback_stream_lag                 feedback events not yet applied to an adapter
    train_round_seconds                 duration of one trainer round
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "personalize"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_OCCUPANCY_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
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

    def observe_call(self, rpc: str, code: str, seconds: float) -> None:
        """Count one finished call of method `rpc` (e.g. `Generate`) with status `code` (e.g. `OK`)."""
        self.requests.labels(rpc=rpc, code=code).inc()
        self.request_seconds.labels(rpc=rpc).observe(seconds)


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
