"""A tenant's concurrency limit held cluster-wide: three workers' limiters sharing lease sets in Valkey (one
Valkey, then the Valkey Cluster) never hold more than the limit at once, admit again after a release, keep
a long hold alive by renewing it, and let a silent holder's places lapse after the lease. Counts places;
no call is timed."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from personalize import valkey
from personalize.errors import ResourceExhausted
from personalize_service.server.leases import DEFAULT_LEASE_S, SharedConcurrencyLimiter
from personalize_service.server.limits import ConcurrencyLimiter, Limits

LIMIT = 3
LIMITS = Limits(max_concurrent_generations=LIMIT)


@pytest.fixture
def three(state_url: str) -> Iterator[list[SharedConcurrencyLimiter]]:
    """Three limiters on one fresh namespace, each with its own client (as three worker processes). Their
    4 s lease is renewed every 1.3 s: a renewal late by over 2.6 s on a busy machine would lapse a live place
    (2 s left 1.3 s of slack)."""
    ns = f"cc{uuid.uuid4().hex[:8]}"
    clients = [valkey.connect(state_url, socket_timeout=5.0) for _ in range(3)]
    limiters = [SharedConcurrencyLimiter(LIMITS, client=c, namespace=ns, lease_s=4.0) for c in clients]
    yield limiters
    for limiter, client in zip(limiters, clients, strict=True):
        limiter.close()
        client.close()


def _fill(limiters: list[SharedConcurrencyLimiter] | list[ConcurrencyLimiter], stack: ExitStack) -> int:
    """Ask every limiter in turn for `tenant` places, 2 * LIMIT rounds; the places admitted (held in `stack`)."""
    admitted = 0
    for _ in range(2 * LIMIT):
        for limiter in limiters:
            try:
                stack.enter_context(limiter.hold("acme"))
                admitted += 1
            except ResourceExhausted:
                pass
    return admitted


def test_three_workers_hold_at_most_the_limit_and_admit_after_release(
    three: list[SharedConcurrencyLimiter],
) -> None:
    with ExitStack() as stack:
        assert _fill(three, stack) == LIMIT
        assert three[0].running("acme") == LIMIT
        with pytest.raises(ResourceExhausted, match=r"the limit is 3 \(max_concurrent_generations; shared by every"):
            stack.enter_context(three[2].hold("acme"))
        with three[1].hold("other"):  # another tenant is unaffected
            assert three[1].running("other") == 1
    assert three[0].running("acme") == 0
    with ExitStack() as stack:  # every place came back
        assert _fill(three, stack) == LIMIT
    with ExitStack() as stack:  # today's per-process limiters: three times the limit
        assert _fill([ConcurrencyLimiter(LIMITS) for _ in range(3)], stack) == 3 * LIMIT


def test_racing_threads_on_three_workers_never_run_more_than_the_limit(
    three: list[SharedConcurrencyLimiter],
) -> None:
    inside, most, admitted = 0, 0, 0
    lock = threading.Lock()

    def run(limiter: SharedConcurrencyLimiter) -> None:
        nonlocal inside, most, admitted
        for _ in range(40):
            try:
                with limiter.hold("acme"):
                    with lock:
                        inside += 1
                        most, admitted = max(most, inside), admitted + 1
                    time.sleep(0.002)
                    with lock:
                        inside -= 1
            except ResourceExhausted:
                pass

    threads = [threading.Thread(target=run, args=(lim,)) for lim in three for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 1 <= most <= LIMIT, most
    assert admitted >= LIMIT, admitted
    assert three[0].running("acme") == 0


def test_a_holder_that_stopped_renewing_loses_its_places_after_the_lease(
    three: list[SharedConcurrencyLimiter],
) -> None:
    dead = SharedConcurrencyLimiter(LIMITS, client=three[0].client, namespace=three[0].namespace, lease_s=1.0)
    dead.close()  # its renewer never runs: a process that died holding its places
    with ExitStack() as stack:
        stack.enter_context(three[0].hold("acme"))  # a live holder keeps renewing (and the set alive)
        assert _fill([dead], stack) == LIMIT - 1
        deadline = time.monotonic() + 30
        while True:  # the places come free although `dead` never gave them back
            try:
                with three[1].hold("acme"):
                    assert three[2].running("acme") == 2  # the live holder's and this one
                    break
            except ResourceExhausted:
                assert time.monotonic() < deadline, "a silent holder's leases never lapsed"
                time.sleep(0.1)
        assert three[2].running("acme") == 1  # the live holder kept its place
        assert _fill(three, stack) == LIMIT - 1


def test_renewal_keeps_a_long_hold_past_the_lease(three: list[SharedConcurrencyLimiter]) -> None:
    with ExitStack() as stack:
        assert _fill([three[0]], stack) == LIMIT
        until = time.monotonic() + 2.5 * three[0].lease_s
        while time.monotonic() < until:  # well past the lease: still held, every refusal
            with pytest.raises(ResourceExhausted):
                stack.enter_context(three[1].hold("acme"))
            time.sleep(0.2)
        assert three[2].running("acme") == LIMIT


def test_an_unreachable_valkey_falls_back_to_the_per_process_limit() -> None:
    client = valkey.connect("redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2)
    limiter = SharedConcurrencyLimiter(Limits(max_concurrent_generations=2), client=client)
    with ExitStack() as stack:
        stack.enter_context(limiter.hold("acme"))
        stack.enter_context(limiter.hold("acme"))
        with pytest.raises(ResourceExhausted, match=r"\(max_concurrent_generations\); retry later"):
            stack.enter_context(limiter.hold("acme"))


def test_limits_shared_selects_the_shared_concurrency_limiter(valkey_url: str) -> None:
    from personalize_service.cli import settings
    from personalize_service.server.base import ServiceConfig, concurrency_limiter

    assert type(concurrency_limiter(ServiceConfig())) is ConcurrencyLimiter
    environ = {"PERSONALIZE_REGISTRY_URL": valkey_url, "PERSONALIZE_SHARED_LIMITS": "true"}
    shared = concurrency_limiter(settings.build(settings.resolve(settings.SERVE, {}, environ)).service)
    assert isinstance(shared, SharedConcurrencyLimiter)
    assert shared.lease_s == DEFAULT_LEASE_S == 30.0  # what deploy.md and reliability.md promise
