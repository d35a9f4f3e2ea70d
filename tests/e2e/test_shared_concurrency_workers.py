"""A tenant limited to 2 concurrent generations behind three real `personalize serve --role worker` processes
sharing one Valkey (--shared-limits, --max-concurrent 2) runs at most 2 at once across all three, while
another tenant is served; the places come back when the generations end. Workers are where the limit is
held: a generation's place must last as long as the generation, which only the process running it knows
(a router forwards a stream and could not tell a slow one from a dead worker). Counts calls; none is timed:
each admitted stream is shown to be still running after every other call was answered."""

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
from tests.e2e.upserver import TEST_FLAGS, UpServer, start_server

LIMIT, CALLS_PER_WORKER, LONG_TOKENS = 2, 4, 1900
KEYS = {"tenantA": "keyA", "tenantB": "keyB"}


@pytest.fixture(scope="module")
def workers(valkey_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[UpServer]]:
    namespace = f"cc{uuid.uuid4().hex[:8]}"  # fresh lease sets and registry, whatever other tests left
    store = tmp_path_factory.mktemp("store")
    started: list[UpServer] = []
    errors: list[BaseException] = []

    def start(i: int) -> None:
        data_dir = tmp_path_factory.mktemp(f"worker-{i}")
        command = [
            *(sys.executable, "-m", "personalize_service.cli", "serve", "--role", "worker", "--node-id", f"w{i}"),
            *("--registry-url", valkey_url, "--namespace", namespace, "--store-url", store.as_uri()),
            *("--port", "0", "--data-dir", str(data_dir), "--grace-s", "1", *TEST_FLAGS),
            *("--api-keys", ",".join(f"{t}:{k}" for t, k in KEYS.items())),
            *("--max-concurrent", str(LIMIT), "--shared-limits", "true"),
            *("--max-new-tokens-limit", str(LONG_TOKENS), "--max-len", "2048", "--torch-threads", "1"),
        ]
        try:
            started.append(start_server(command, data_dir, data_dir / "worker.log"))
        except BaseException as exc:  # reported below, after the others are stopped
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(3)]  # their model loads overlap
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield started
    finally:
        stopping = [threading.Thread(target=w.stop) for w in started]  # their drains overlap too
        for t in stopping:
            t.start()
        for t in stopping:
            t.join()


def _meta(tenant: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def _long(stub: pb_grpc.PersonalizeStub, user: str) -> tuple[object, str]:
    """Start a long GenerateStream of tenantA; (the call, 'OK' once its first chunk came, else the code and
    the refusal's message)."""
    request = pb.GenerateRequest(user_id=user, prompt="Hello", max_new_tokens=LONG_TOKENS)
    call = stub.GenerateStream(request, timeout=120, metadata=_meta("tenantA"))
    try:
        next(call)
        return call, "OK"
    except grpc.RpcError as exc:
        return call, f"{exc.code().name}: {exc.details()}"


REFUSED = "RESOURCE_EXHAUSTED: tenant 'tenantA' has 2 generations running; the limit is 2 "
"""The start of a refusal (it goes on to name the limit and that every process shares it)."""
SHARED = "(max_concurrent_generations; shared by every process); retry later"


def test_a_tenant_runs_at_most_its_limit_across_three_workers(workers: list[UpServer]) -> None:
    channels = [w.channel() for w in workers]
    stubs = [pb_grpc.PersonalizeStub(c) for c in channels]
    results: list[tuple[object, str]] = []
    lock = threading.Lock()

    def call(stub: pb_grpc.PersonalizeStub, user: str) -> None:
        result = _long(stub, user)
        with lock:
            results.append(result)

    try:
        callers = [
            threading.Thread(target=call, args=(stub, f"u{i}-{j}"))
            for i, stub in enumerate(stubs)
            for j in range(CALLS_PER_WORKER)
        ]
        for c in callers:
            c.start()
        for c in callers:
            c.join()
        codes = sorted(code for _, code in results)
        running = [c for c, code in results if code == "OK"]
        assert len(running) == LIMIT, codes
        assert all(code.startswith(REFUSED) for code in codes if code != "OK"), codes
        assert all(code.endswith(SHARED) for code in codes if code != "OK"), codes
        # Another tenant is served on every worker while tenantA holds its places.
        for stub in stubs:
            reply = stub.Generate(
                pb.GenerateRequest(user_id="b", prompt="Hi", max_new_tokens=4), timeout=60, metadata=_meta("tenantB")
            )
            assert reply.completion_tokens == 4
        # The admitted ones were running the whole time (so at most LIMIT ran at once): none had ended.
        assert all(c.is_active() for c in running), "a long generation ended early; the overlap is not shown"  # type: ignore[attr-defined]
        for c in running:
            c.cancel()  # type: ignore[attr-defined]
        # Once they end their places come back: tenantA is admitted again, on any worker.
        deadline = time.monotonic() + 30
        while True:
            again, code = _long(stubs[2], "again")
            results.append((again, code))
            if code == "OK":
                break
            assert code.startswith("RESOURCE_EXHAUSTED"), code
            assert time.monotonic() < deadline, "tenantA was never admitted again after its generations ended"
            time.sleep(0.05)
    finally:
        for c, _ in results:
            c.cancel()  # type: ignore[attr-defined]
        for channel in channels:
            channel.close()
