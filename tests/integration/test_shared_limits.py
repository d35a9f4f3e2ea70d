"""A tenant's rate limit held cluster-wide: three routers' limiters sharing buckets in Valkey (one Valkey,
then the Valkey Cluster) let a tenant through at most its configured rate, where per-process buckets let
it through three times over. Counts accepted calls over a window; no call is timed."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import pytest

from personalize import valkey
from personalize.errors import ResourceExhausted
from personalize_service.server.limits import FeedbackQuota, Limits, RateLimiter, SharedRateLimiter

RATE, BURST, WINDOW_S = 20.0, 5, 3.0


def _hammer(limiters: list[RateLimiter], tenant: str) -> tuple[int, float]:
    """Every limiter (a router) checks `tenant` as fast as it can for WINDOW_S; (accepted, seconds)."""
    accepted = [0] * len(limiters)
    start = time.monotonic()

    def run(i: int, check: Callable[[str], None]) -> None:
        while time.monotonic() - start < WINDOW_S:
            try:
                check(tenant)
                accepted[i] += 1
            except ResourceExhausted:
                pass

    threads = [threading.Thread(target=run, args=(i, lim.check)) for i, lim in enumerate(limiters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(accepted), time.monotonic() - start


def test_a_tenant_behind_three_routers_gets_its_rate_once(state_url: str) -> None:
    limits = Limits(requests_per_second=RATE, burst=BURST)
    clients = [valkey.connect(state_url, socket_timeout=5.0) for _ in range(3)]  # one per router process
    ns = f"rl{uuid.uuid4().hex[:8]}"
    shared: list[RateLimiter] = [SharedRateLimiter(limits, client=c, namespace=ns) for c in clients]
    accepted, elapsed = _hammer(shared, "acme")
    allowed = RATE * elapsed + BURST
    assert accepted <= 1.1 * allowed, f"{accepted} accepted, the limit allows {allowed:.0f}"
    assert accepted >= 1  # it did let the tenant through
    local = [RateLimiter(limits) for _ in range(3)]  # today's per-process limiters: 3x the rate
    accepted_local, elapsed_local = _hammer(local, "acme")
    assert accepted_local > 1.1 * (RATE * elapsed_local + BURST)
    for c in clients:
        c.close()


def test_an_unreachable_valkey_falls_back_to_the_per_process_limit() -> None:
    client = valkey.connect("redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2)
    limiter = SharedRateLimiter(Limits(requests_per_second=1.0, burst=2), client=client)
    limiter.check("acme")
    limiter.check("acme")
    try:
        limiter.check("acme")
        raise AssertionError("the third call within a second passed a burst of 2")
    except ResourceExhausted as exc:
        assert "burst of 2" in str(exc)


def test_limits_shared_selects_the_shared_limiter(valkey_url: str) -> None:
    from personalize_service.cli import settings
    from personalize_service.server.base import ServiceConfig, rate_limiter

    assert type(rate_limiter(ServiceConfig())) is RateLimiter
    environ = {"PERSONALIZE_REGISTRY_URL": valkey_url, "PERSONALIZE_SHARED_LIMITS": "true"}
    resolved = settings.build(settings.resolve(settings.SERVE, {}, environ))
    assert isinstance(rate_limiter(resolved.service), SharedRateLimiter)


def test_a_tenants_feedback_quota_behind_three_workers_holds_once(valkey_url: str) -> None:
    limits = Limits(feedback_per_second=RATE, feedback_burst=BURST)
    clients = [valkey.connect(valkey_url, socket_timeout=5.0) for _ in range(3)]  # one per worker process
    ns = f"fq{uuid.uuid4().hex[:8]}"
    shared = [FeedbackQuota(limits, client=c, namespace=ns) for c in clients]
    accepted, elapsed = _hammer(shared, "acme")  # type: ignore[arg-type]
    allowed = RATE * elapsed + BURST
    assert accepted <= 1.1 * allowed, f"{accepted} events accepted, the quota allows {allowed:.0f}"
    assert accepted >= 0.5 * RATE * WINDOW_S
    with pytest.raises(ResourceExhausted, match=r"feedback_per_second, feedback_burst; shared by every process"):
        for _ in range(10 * BURST):
            shared[0].check("acme")
    for c in clients:
        c.close()


def test_limits_shared_selects_the_shared_feedback_quota(valkey_url: str) -> None:
    from personalize_service.cli import settings
    from personalize_service.server.base import ServiceConfig, feedback_quota

    assert not feedback_quota(ServiceConfig()).shared
    environ = {"PERSONALIZE_REGISTRY_URL": valkey_url, "PERSONALIZE_SHARED_LIMITS": "true"}
    assert feedback_quota(settings.build(settings.resolve(settings.SERVE, {}, environ)).service).shared


_STALL_LUA = """
local t = redis.call('TIME')
local start = tonumber(t[1]) + tonumber(t[2]) / 1e6
while true do
  t = redis.call('TIME')
  if tonumber(t[1]) + tonumber(t[2]) / 1e6 - start > tonumber(ARGV[1]) then return 1 end
end
"""


def _wait_until_stalled(url: str) -> None:
    """Return once the server no longer answers a PING within 0.1 s (the stalling script is running)."""
    probe = valkey.connect(url, socket_timeout=0.1, socket_connect_timeout=1.0)
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            try:
                probe.ping()
            except Exception:  # the PING timed out: stalled
                return
            time.sleep(0.01)
        raise AssertionError("the server never stalled")
    finally:
        probe.close()


@pytest.mark.parametrize("timeout_s, shared_decides", [(0.2, False), (8.0, True)])
def test_the_shared_limits_timeout_says_how_long_a_stalled_valkey_is_waited_for(
    valkey_url: str, timeout_s: float, shared_decides: bool
) -> None:
    """Valkey stalls 3 s (a busy script blocks every client). A check waits up to `--shared-limits-timeout`:
    a short one decides alone (this process's own bucket is full: admitted), a long one waits and gets the
    shared bucket's answer (emptied by another router: refused)."""
    from personalize.adapters.registry import RegistryConfig
    from personalize_service.cli import settings
    from personalize_service.server.base import rate_limiter

    environ = {
        "PERSONALIZE_REGISTRY_URL": valkey_url,
        "PERSONALIZE_SHARED_LIMITS": "true",
        "PERSONALIZE_SHARED_LIMITS_TIMEOUT": str(timeout_s),
        "PERSONALIZE_RATE": "0.001",
        "PERSONALIZE_BURST": "1",
    }
    service = settings.build(settings.resolve(settings.SERVE, {}, environ)).service
    assert service.limits.shared_timeout_s == timeout_s
    assert isinstance(service.shared_limits, RegistryConfig)
    limiter, other_router = rate_limiter(service), rate_limiter(service)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    other_router.check(tenant)  # the tenant's one shared token is spent elsewhere
    stall_client = valkey.connect(valkey_url, socket_timeout=30.0)
    stall = threading.Thread(target=lambda: stall_client.eval(_STALL_LUA, 0, 3.0))
    stall.start()
    _wait_until_stalled(valkey_url)
    try:
        if shared_decides:
            with pytest.raises(ResourceExhausted, match="shared by every process"):
                limiter.check(tenant)
        else:
            limiter.check(tenant)
    finally:
        stall.join()
        stall_client.close()
