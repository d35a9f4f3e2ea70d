"""The interceptors' wrapper cache (service/server/interceptors.py): grpc asks every interceptor for a
handler on every call, and each wraps the handler below it once, not per call."""

from __future__ import annotations

from typing import Any

import grpc

from personalize_service.server.interceptors import _WRAPS_MAX, cached_wrapper, wrapper_cache


def _handler() -> Any:
    return grpc.unary_unary_rpc_method_handler(lambda request, context: request)


def test_one_wrapper_per_handler_and_key() -> None:
    owner = type("Owner", (), {})()
    made: list[str] = []

    def wrap(name: str) -> Any:
        made.append(name)
        return object()

    first, second = _handler(), _handler()
    a = cached_wrapper(wrapper_cache(owner), first, "m", lambda: wrap("a"))
    assert cached_wrapper(wrapper_cache(owner), first, "m", lambda: wrap("again")) is a
    assert cached_wrapper(wrapper_cache(owner), first, "other", lambda: wrap("b")) is not a  # e.g. another tenant
    assert cached_wrapper(wrapper_cache(owner), second, "m", lambda: wrap("c")) is not a
    assert made == ["a", "b", "c"]


def test_handlers_made_per_call_do_not_grow_the_cache_without_bound() -> None:
    owner = type("Owner", (), {})()
    kept = [_handler() for _ in range(3 * _WRAPS_MAX)]  # alive together: no id is reused
    for handler in kept:
        cached_wrapper(wrapper_cache(owner), handler, "m", object)
    assert len(wrapper_cache(owner)) <= _WRAPS_MAX


def test_a_refusal_is_never_kept() -> None:
    """A refused call's handler (made per call, holding its error) is wrapped anew each time, not cached."""
    from personalize.errors import Unauthenticated
    from personalize_service.server.interceptors import _refusal

    owner = type("Owner", (), {})()
    refusal = _refusal(_handler(), Unauthenticated("no key"))
    assert cached_wrapper(wrapper_cache(owner), refusal, "m", object) is not None
    assert wrapper_cache(owner) == {}
