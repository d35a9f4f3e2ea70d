"""The router's own cost per call, against a stand-in worker that answers at once (no model, no engine).

Three processes: a stand-in worker (a generic handler that answers every Personalize call with one
fixed GenerateResponse), the router (`create_router`, all its interceptors, or fewer with --variant) in
front of it, and this client, which times Generate straight to the worker and through the router,
interleaved call by call. `router_hop_ms_p50` = p50 via the router minus p50 direct: the router's
per-call work plus one loopback hop, what `bench_routing.py --cluster`'s `router_overhead_ms_p50`
measures without a model's noise around it.

    python loadtest/bench_router_hop.py [--calls 2000] [--variant full|bare|aio-bare] [--json out.json]

`--variant bare`: a server with the router's handler and no interceptors (the floor of a Python hop);
`--variant aio-bare`: a grpc.aio server forwarding bytes on an aio channel, no interceptors (the floor
of an asyncio hop).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from concurrent import futures
from typing import Any, cast

import grpc

from personalize.routing.membership import NodeInfo
from personalize_service.client.cluster import Cluster
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.server.base import NodeState, ServiceConfig
from personalize_service.server.metrics import ServiceMetrics
from personalize_service.server.router import RouterConfig, RouterHandler, create_router, worker_channel_opener

ANSWER = pb.GenerateResponse(text="ok", node_id="stand-in", adapter_version=1).SerializeToString()


class _Instant(grpc.GenericRpcHandler):
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if not handler_call_details.method.startswith("/personalize.v1.Personalize/"):
            return None
        if handler_call_details.method.endswith("Stream"):
            return grpc.unary_stream_rpc_method_handler(lambda body, context: iter((ANSWER,)))
        return grpc.unary_unary_rpc_method_handler(lambda body, context: ANSWER)


def _worker(ready: Any) -> None:
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((_Instant(),))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ready.send(port)
    server.wait_for_termination()


def _router(worker_port: int, variant: str, ready: Any) -> None:
    cluster = Cluster(None, worker_channel_opener(RouterConfig()))
    cluster.apply({"w": NodeInfo("w", f"127.0.0.1:{worker_port}", 64.0)})
    if variant == "bare":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        server.add_generic_rpc_handlers((RouterHandler(cluster),))
        port = server.add_insecure_port("127.0.0.1:0")
        _bare_tenant()
    else:
        state = NodeState()
        server, port = create_router(ServiceConfig(port=0), cluster, ServiceMetrics(), state)
        state.serving()
    server.start()
    ready.send(port)
    server.wait_for_termination()


def _aio_router(worker_port: int, ready: Any) -> None:
    """A bare grpc.aio forwarder: bytes in, the same bytes to the worker on an aio channel, its answer
    back; no interceptors, no routing (the floor of an asyncio hop)."""
    import asyncio

    async def run() -> None:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{worker_port}")
        handlers: dict[str, grpc.RpcMethodHandler] = {}

        def forwarding(name: str) -> grpc.RpcMethodHandler:
            method = channel.unary_unary(name)

            async def forward(body: bytes, context: Any) -> bytes:
                return cast(bytes, await method(body, timeout=context.time_remaining()))

            return grpc.unary_unary_rpc_method_handler(forward)

        class Forward(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
                handler = handlers.get(details.method)
                if handler is None:  # built once per method, as the router's handlers are
                    handler = handlers[details.method] = forwarding(details.method)
                return handler

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((Forward(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.send(port)
        await server.wait_for_termination()

    asyncio.run(run())


def _bare_tenant() -> None:
    """Without the auth interceptor nobody sets the tenant: set it for every handler thread's context."""
    from personalize_service.server import auth

    auth._tenant.set(auth.DEFAULT_TENANT)  # the threads copy no context, so patch the lookup instead
    auth.current_tenant = lambda: auth.DEFAULT_TENANT  # type: ignore[assignment]
    import personalize_service.server.router as router

    router.current_tenant = lambda: auth.DEFAULT_TENANT  # type: ignore[assignment]


def _start(target: Any, *args: Any) -> tuple[mp.Process, int]:
    parent, child = mp.Pipe()
    process = mp.Process(target=target, args=(*args, child), daemon=True)
    process.start()
    return process, int(parent.recv())


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, every thread) that process `pid` has used so far (Linux)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(calls: int, variant: str) -> dict[str, Any]:
    worker, worker_port = _start(_worker)
    if variant == "aio-bare":
        router, router_port = _start(_aio_router, worker_port)
    else:
        router, router_port = _start(_router, worker_port, variant)
    times: dict[str, list[float]] = {"router": [], "direct": []}
    request = pb.GenerateRequest(user_id="u1", prompt="Hello", max_new_tokens=1)
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{worker_port}") as direct_channel,
            grpc.insecure_channel(f"127.0.0.1:{router_port}") as router_channel,
        ):
            direct, via = pb_grpc.PersonalizeStub(direct_channel), pb_grpc.PersonalizeStub(router_channel)
            for _ in range(200):  # warm-up: channels, threads
                via.Generate(request, timeout=10)
                direct.Generate(request, timeout=10)
            cpu_before = _cpu_s(router.pid)
            for _ in range(calls):
                start = time.perf_counter()
                via.Generate(request, timeout=10)
                times["router"].append(time.perf_counter() - start)
                start = time.perf_counter()
                direct.Generate(request, timeout=10)
                times["direct"].append(time.perf_counter() - start)
            cpu = _cpu_s(router.pid) - cpu_before
    finally:
        router.terminate()
        worker.terminate()
    p50 = {name: statistics.median(samples) * 1000 for name, samples in times.items()}
    return {
        "variant": variant,
        "calls": calls,
        "router_ms_p50": round(p50["router"], 4),
        "direct_ms_p50": round(p50["direct"], 4),
        "router_hop_ms_p50": round(p50["router"] - p50["direct"], 4),
        "router_cpu_ms_per_call": round(cpu * 1000 / calls, 4),
        "loadavg": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--variant", choices=("full", "bare", "aio-bare"), default="full")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    result = measure(args.calls, args.variant)
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
