"""Spans leave the process over OTLP/HTTP: a real HTTP receiver on loopback takes the exporter's protobuf
POSTs and decodes them with the OTLP protobuf definitions (opentelemetry-proto), as a collector would."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from personalize.errors import InvalidArgument
from personalize_service.server.base import ServiceConfig
from personalize_service.server.observe import otlp_traces_url

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Received:
    path: str
    content_type: str
    service: str
    spans: list[str] = field(default_factory=list)


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP traces endpoint: every POST body decoded into a Received."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.received: list[Received] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            names = [s.name for scope in resource_spans.scope_spans for s in scope.spans]
            self.server.received.append(
                Received(self.path, self.headers["Content-Type"], attrs.get("service.name", ""), names)
            )
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# A process that turns tracing on the way a server does at start, records one span and exits: the provider
# flushes at exit, so once the process is gone its spans have been delivered (or lost for good).
_PROGRAM = """
import sys
from personalize_service.server.observe import setup_tracing, tracer
setup_tracing(sys.argv[1], "personalize-test")
with tracer().start_as_current_span("worker Generate"):
    with tracer().start_as_current_span("engine.decode"):
        pass
"""


def _run(endpoint: str, **env: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    subprocess.run([sys.executable, "-c", _PROGRAM, endpoint], env={**clean, **env}, cwd=REPO, check=True, timeout=120)


@pytest.mark.parametrize("form", ["base", "host:port", "traces-url"])
def test_spans_reach_the_collector_named_by_the_otlp_endpoint_setting(receiver: Receiver, form: str) -> None:
    endpoint = {
        "base": receiver.url,
        "host:port": receiver.url.removeprefix("http://"),
        "traces-url": receiver.url + "/v1/traces",
    }[form]
    _run(endpoint)
    assert [r.path for r in receiver.received] == ["/v1/traces"]
    (got,) = receiver.received
    assert got.content_type == "application/x-protobuf" and got.service == "personalize-test"
    assert sorted(got.spans) == ["engine.decode", "worker Generate"]


def test_the_standard_otel_endpoint_variable_turns_export_on(receiver: Receiver) -> None:
    _run("", OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url)
    assert [(r.path, sorted(r.spans)) for r in receiver.received] == [
        ("/v1/traces", ["engine.decode", "worker Generate"])
    ]


def test_without_an_endpoint_nothing_is_exported(receiver: Receiver) -> None:
    _run("")
    assert receiver.received == []


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("collector:4318", "http://collector:4318/v1/traces"),
        ("https://otel.example/", "https://otel.example/v1/traces"),
        ("https://otel.example/otlp", "https://otel.example/otlp/v1/traces"),
        ("http://c:4318/v1/traces", "http://c:4318/v1/traces"),
    ],
)
def test_otlp_traces_url(endpoint: str, url: str) -> None:
    assert otlp_traces_url(endpoint) == url


def test_a_non_http_endpoint_is_refused_at_configuration() -> None:
    with pytest.raises(InvalidArgument, match=r"grpc://c:4317.*http"):
        ServiceConfig(otlp_endpoint="grpc://c:4317")
