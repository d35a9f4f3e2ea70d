"""Without an SDK tracer provider no span is recorded (ObserveInterceptor builds none), yet the caller's
trace context is current in the handler, so what the handler stores or sends on names the caller's trace.
Run in a fresh interpreter: the test session installs an SDK provider (tests/conftest.py) for good."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r"""
from concurrent import futures
import grpc
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from personalize_service.server.auth import ApiKeys
from personalize_service.server.observe import ObserveInterceptor, current_traceparent, tracing_on

class Servicer(pb_grpc.PersonalizeServicer):
    def Generate(self, request, context):
        return pb.GenerateResponse(text=current_traceparent())

observe = ObserveInterceptor("worker", "n", ApiKeys())
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[observe])
pb_grpc.add_PersonalizeServicer_to_server(Servicer(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    stub = pb_grpc.PersonalizeStub(channel)
    request = pb.GenerateRequest(user_id="u", prompt="p")
    traced = stub.Generate(request, metadata=[("traceparent", TRACE)], timeout=10).text
    untraced = stub.Generate(request, timeout=10).text
server.stop(None)
print(tracing_on(), repr(traced), repr(untraced))
"""
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_without_an_sdk_the_callers_trace_is_current_in_the_handler() -> None:
    out = subprocess.run(
        [sys.executable, "-c", f"TRACE = {TRACE!r}\n{SCRIPT}"], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["False", repr(TRACE), "''"]
