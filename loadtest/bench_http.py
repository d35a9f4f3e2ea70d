"""HTTP edge benchmark: what the OpenAI-compatible API adds over calling the worker over gRPC.

added_ms_p50    p50 of a one-token /v1/completions through the edge minus p50 of the same Generate sent
                straight to the worker with the SDK (interleaved, same user, same prompt); target <= 1 ms.
app_ms_p50      the FastAPI app alone, called as ASGI in this process with a stub SDK answering at once: what
                the edge's own code costs per request (validation, JSON, the thread-pool hop, middleware),
                without HTTP parsing, sockets or gRPC.
ttft            streaming time to first token: the first SSE text chunk of a streamed /v1/completions against
                the first piece of GenerateStream (p50 each, interleaved); ratio = http / grpc, target <= 1.10.

edge_cpu_ms     CPU the gateway process spent per request while serving the timed HTTP requests (one_token:
                the one-token completions; stream_16: the 16-token streams), from /proc; load-robust where the
                latencies are not (the machine's other work moves them, not this). Absent with --in-up.
client_cpu_ms   CPU of this process's calling thread per request, p50: what the client itself costs (http, grpc),
                so a heavy client is not read as edge latency.

Both against one `personalize up` (the built-in tiny model, one worker). The edge measured is `personalize
serve --role gateway` in its own process routing on up's registry, as deployed (--in-up: up's own edge, which
shares the worker's process and GIL). Clients in this process: a light HTTP/1.1 client (http.client on one
keep-alive connection, the body encoded once; --client httpx: httpx as before), the SDK on one channel.

    python loadtest/bench_http.py [--quick] [--in-up] [--client raw|httpx] [--requests 300] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.loadtest_run import Server, launch_up, server_env, wait_serving
from personalize_service.cli.embedded import running_url
from personalize_service.client import PersonalizeClient
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.http.app import Caller, create_app
from personalize_service.net import find_free_port

TARGETS: dict[str, tuple[str, float]] = {"added_ms_p50": ("<=", 1.0), "ttft.ratio": ("<=", 1.10)}
PROMPT = "The quick brown fox"
USER = "bench-http"


def _timed(fn: Callable[[], Any], cpu: list[float]) -> float:
    """Wall ms of fn(); its CPU ms on this thread is appended to `cpu`."""
    started, cpu_started = time.perf_counter(), time.thread_time()
    fn()
    cpu.append((time.thread_time() - cpu_started) * 1000.0)
    return (time.perf_counter() - started) * 1000.0


class HttpClient(Protocol):
    def complete(self, body: bytes) -> None: ...
    def first_token(self, body: bytes) -> float: ...
    def close(self) -> None: ...


JSON = {"content-type": "application/json"}


def _is_text_chunk(line: bytes) -> bool:
    return line.startswith(b"data: {") and bool(json.loads(line[6:])["choices"][0]["text"])


class RawClient:
    """POSTs /v1/completions on one keep-alive http.client connection: no client-side model or header work."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=120)

    def complete(self, body: bytes) -> None:
        self._conn.request("POST", "/v1/completions", body, JSON)
        reply = self._conn.getresponse()
        reply.read()
        if reply.status != 200:
            raise AssertionError(f"/v1/completions answered {reply.status}")

    def first_token(self, body: bytes) -> float:
        started = time.perf_counter()
        first = 0.0
        self._conn.request("POST", "/v1/completions", body, JSON)
        reply = self._conn.getresponse()
        while line := reply.readline():
            if not first and _is_text_chunk(line):
                first = (time.perf_counter() - started) * 1000.0
        return first

    def close(self) -> None:
        self._conn.close()


class HttpxClient:
    """The same over httpx (the client this benchmark used first; heavier per request)."""

    def __init__(self, url: str) -> None:
        self._http = httpx.Client(base_url=url, timeout=120)

    def complete(self, body: bytes) -> None:
        self._http.post("/v1/completions", content=body, headers=JSON).raise_for_status()

    def first_token(self, body: bytes) -> float:
        started = time.perf_counter()
        first = 0.0
        with self._http.stream("POST", "/v1/completions", content=body, headers=JSON) as reply:
            for line in reply.iter_lines():
                if not first and _is_text_chunk(line.encode()):
                    first = (time.perf_counter() - started) * 1000.0
        return first

    def close(self) -> None:
        self._http.close()


def _grpc_first_token(sdk: PersonalizeClient, max_tokens: int) -> float:
    started = time.perf_counter()
    first = 0.0
    with sdk.generate_stream(USER, PROMPT, max_new_tokens=max_tokens) as stream:
        for _ in stream:
            if not first:
                first = (time.perf_counter() - started) * 1000.0
    return first


def start_gateway(data_dir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`serve --role gateway` on a free port over the ring of up's embedded Valkey (the URL with its password
    read from up's data dir: the banner masks it; passed by environment, never argv); (process, its URL)."""
    registry = running_url(data_dir / "valkey")
    port = find_free_port()
    command = [sys.executable, "-m", "personalize_service.cli", "serve", "--role", "gateway", "--http-port", str(port)]
    command += ["--data-dir", str(log_path.parent)]
    with open(log_path, "wb") as log:
        env = {**server_env(), "PERSONALIZE_REGISTRY_URL": registry}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 60
    while b"gateway serving on" not in log_path.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the gateway did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    return process, f"http://127.0.0.1:{port}"


CLIENTS: dict[str, Callable[[str], HttpClient]] = {"raw": RawClient, "httpx": HttpxClient}


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: Server, requests: int, client: str = "raw", edge_pid: int | None = None) -> dict[str, Any]:
    one_body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0, "user": USER}
    one = json.dumps(one_body).encode()
    many = json.dumps({**one_body, "max_tokens": 16, "stream": True}).encode()
    http = CLIENTS[client](server.http_url)
    with PersonalizeClient(server.target) as sdk:
        for _ in range(20):  # warm up both paths (connections, the user's adapter lookup)
            http.complete(one)
            sdk.generate(USER, PROMPT, max_new_tokens=1)
        edge, direct, http_ttft, grpc_ttft = [], [], [], []
        http_cpu: list[float] = []
        grpc_cpu: list[float] = []
        edge_cpu = 0.0  # the edge's process CPU while it served the timed HTTP requests (not the gRPC ones)
        for _ in range(requests):
            cpu_before = process_cpu_s(edge_pid) if edge_pid else 0.0
            edge.append(_timed(lambda: http.complete(one), http_cpu))
            edge_cpu += process_cpu_s(edge_pid) - cpu_before if edge_pid else 0.0
            direct.append(_timed(lambda: sdk.generate(USER, PROMPT, max_new_tokens=1), grpc_cpu))
        streams = max(requests // 3, 10)
        stream_cpu = 0.0
        for _ in range(streams):
            cpu_before = process_cpu_s(edge_pid) if edge_pid else 0.0
            http_ttft.append(http.first_token(many))
            stream_cpu += process_cpu_s(edge_pid) - cpu_before if edge_pid else 0.0
            grpc_ttft.append(_grpc_first_token(sdk, 16))
    http.close()
    p50 = statistics.median
    edge_cpu_ms = (
        {"one_token": edge_cpu * 1000.0 / requests, "stream_16": stream_cpu * 1000.0 / streams} if edge_pid else None
    )
    return {
        "edge_cpu_ms": edge_cpu_ms,
        "requests": requests,
        "client": client,
        "edge_ms_p50": p50(edge),
        "direct_ms_p50": p50(direct),
        "added_ms_p50": p50(edge) - p50(direct),
        "client_cpu_ms": {"http_p50": p50(http_cpu), "grpc_p50": p50(grpc_cpu)},
        "ttft": {
            "http_ms_p50": p50(http_ttft),
            "grpc_ms_p50": p50(grpc_ttft),
            "ratio": p50(http_ttft) / p50(grpc_ttft),
        },
    }


class _StubSdk:
    def generate(self, user_id: str, prompt: str, **_options: Any) -> Any:
        return pb.GenerateResponse(text="x", node_id="stub", completion_tokens=1)

    async def agenerate(self, user_id: str, prompt: str, **options: Any) -> Any:
        return self.generate(user_id, prompt, **options)


async def _app_once(app: Any, scope: dict[str, Any], body: bytes) -> None:
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(60)
        return {"type": "http.disconnect"}

    async def send(_message: dict[str, Any]) -> None:
        return None

    await app(dict(scope), receive, send)


def app_overhead(requests: int) -> float:
    """p50 ms of one /v1/completions through the app alone (ASGI, stub SDK)."""
    app = create_app(lambda _key: Caller(_StubSdk()), "tiny")  # type: ignore[arg-type]
    body = json.dumps({"prompt": PROMPT, "max_tokens": 1, "user": USER}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions"}
    scope |= {"query_string": b"", "headers": headers, "http_version": "1.1", "scheme": "http", "root_path": ""}
    scope |= {"server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1)}

    async def run() -> list[float]:
        times = []
        for i in range(requests + 50):
            started = time.perf_counter()
            await _app_once(app, scope, body)
            if i >= 50:  # after a warm-up
                times.append((time.perf_counter() - started) * 1000.0)
        return times

    return statistics.median(asyncio.run(run()))


def _lookup(result: dict[str, Any], dotted: str) -> float:
    value: Any = result
    for part in dotted.split("."):
        value = value[part]
    return float(value)


def verdicts(result: dict[str, Any]) -> dict[str, bool]:
    ops = {"<=": float.__le__, ">=": float.__ge__}
    return {name: ops[op](_lookup(result, name), bound) for name, (op, bound) in TARGETS.items()}


def print_table(result: dict[str, Any], met: dict[str, bool]) -> None:
    rows = [
        ("one-token completion, edge p50 (ms)", f"{result['edge_ms_p50']:.2f}", ""),
        ("one-token Generate, direct p50 (ms)", f"{result['direct_ms_p50']:.2f}", ""),
        ("added by the HTTP edge, p50 (ms)", f"{result['added_ms_p50']:.2f}", _verdict("added_ms_p50", met)),
        ("  of which the app alone (ASGI, stub SDK), p50 (ms)", f"{result['app_ms_p50']:.2f}", ""),
        (
            f"client CPU per HTTP request ({result['client']}), p50 (ms)",
            f"{result['client_cpu_ms']['http_p50']:.2f}",
            "",
        ),
        ("client CPU per gRPC Generate (SDK), p50 (ms)", f"{result['client_cpu_ms']['grpc_p50']:.2f}", ""),
        *(
            [("edge process CPU per one-token completion (ms)", f"{result['edge_cpu_ms']['one_token']:.2f}", "")]
            if result["edge_cpu_ms"]
            else []
        ),
        ("streaming TTFT, HTTP p50 (ms)", f"{result['ttft']['http_ms_p50']:.2f}", ""),
        ("streaming TTFT, gRPC p50 (ms)", f"{result['ttft']['grpc_ms_p50']:.2f}", ""),
        ("TTFT ratio HTTP / gRPC", f"{result['ttft']['ratio']:.3f}", _verdict("ttft.ratio", met)),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, verdict in rows:
        print(f"{name:<{width}}  {value:>9}  {verdict}")


def _verdict(name: str, met: dict[str, bool]) -> str:
    op, bound = TARGETS[name]
    return f"target {op} {bound}: {'met' if met[name] else 'MISSED'}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 requests per path")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--in-up", action="store_true", help="measure up's own edge (in the worker's process)")
    ap.add_argument("--client", choices=sorted(CLIENTS), default="raw", help="the HTTP client (default raw)")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    args = ap.parse_args(argv)
    requests = 100 if args.quick else args.requests
    with tempfile.TemporaryDirectory(prefix="personalize-bench-http-") as tmp:
        server = launch_up(Path(tmp) / "data", Path(tmp) / "up.log", 1, [])
        assert server is not None, "personalize up refused to start"
        gateway = None
        try:
            wait_serving(server.target, time.monotonic() + 300)
            if not args.in_up:
                gateway, url = start_gateway(Path(tmp) / "data", Path(tmp) / "gateway.log")
                server = dataclasses.replace(server, http_url=url)
            result = measure(server, requests, args.client, gateway.pid if gateway is not None else None)
            result["edge"] = "up's own" if args.in_up else "serve --role gateway"
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(30)
            server.stop()
    result["app_ms_p50"] = app_overhead(requests * 3)
    met = verdicts(result)
    result["targets_met"] = met
    print_table(result, met)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
