"""A tenant limited to R requests/s behind three real `personalize serve --role router` processes sharing
one Valkey (--shared-limits) gets at most 1.1 R (+ its burst) through all three together, and not trivially
nothing. No worker is needed: the rate is checked before a call is forwarded, so an admitted call answers
UNAVAILABLE (no worker) and a refused one RESOURCE_EXHAUSTED naming the limit. Counts calls; none is timed."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.gen.personalize.v1 import personalize_pb2_grpc as pb_grpc
from tests.e2e.upserver import UpServer, start_server

RATE, BURST, WINDOW_S, CALLERS_PER_ROUTER = 20.0, 5, 4.0, 4
KEY = "keyA"


@pytest.fixture(scope="module")
def routers(valkey_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[UpServer]]:
    namespace = f"rt{uuid.uuid4().hex[:8]}"  # a fresh bucket, whatever other tests left in this Valkey
    started: list[UpServer] = []
    try:
        for i in range(3):
            data_dir = tmp_path_factory.mktemp(f"router-{i}")
            command = [
                *(sys.executable, "-m", "personalize_service.cli", "serve", "--role", "router"),
                *("--registry-url", valkey_url, "--namespace", namespace, "--port", "0", "--data-dir", str(data_dir)),
                *("--api-keys", f"tenantA:{KEY}", "--rate", str(RATE), "--burst", str(BURST)),
                *("--shared-limits", "true", "--grace-s", "1"),
            ]
            started.append(start_server(command, data_dir, data_dir / "router.log"))
        yield started
    finally:
        for router in started:
            router.stop()


def _flood(router: UpServer, stop_at: float, counts: dict[str, int], lock: threading.Lock) -> None:
    """Call GetAdapter through `router` as fast as one caller can until `stop_at`; count status codes."""
    with grpc.insecure_channel(router.target) as channel:
        stub = pb_grpc.PersonalizeStub(channel)
        while time.monotonic() < stop_at:
            try:
                stub.GetAdapter(
                    pb.GetAdapterRequest(user_id="u1"), timeout=5, metadata=(("authorization", f"Bearer {KEY}"),)
                )
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
                if code == "RESOURCE_EXHAUSTED":
                    assert "requests_per_second" in (exc.details() or ""), exc.details()
            with lock:
                counts[code] = counts.get(code, 0) + 1


def test_a_tenant_behind_three_routers_gets_at_most_its_rate(routers: list[UpServer]) -> None:
    counts: dict[str, int] = {}
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + WINDOW_S
    callers = [
        threading.Thread(target=_flood, args=(router, stop_at, counts, lock))
        for router in routers
        for _ in range(CALLERS_PER_ROUTER)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    elapsed = time.monotonic() - start
    refused = counts.get("RESOURCE_EXHAUSTED", 0)
    admitted = sum(counts.values()) - refused
    allowed = 1.1 * RATE * elapsed + BURST
    assert refused > 0 and admitted + refused > allowed, f"the flood was not over the rate: {counts}"
    assert admitted <= allowed, f"{admitted} admitted in {elapsed:.1f}s, allowed {allowed:.0f}"
    assert admitted >= 0.5 * RATE * WINDOW_S, f"only {admitted} admitted in {elapsed:.1f}s: {counts}"
