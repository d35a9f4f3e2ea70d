"""Request limits: validators name the limit and the value; token bucket and concurrency limiter."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalize.errors import InvalidArgument, ResourceExhausted
from personalize_service.server.limits import (
    DEFAULT_LIMITS,
    ConcurrencyLimiter,
    FeedbackQuota,
    Limits,
    RateLimiter,
    check_event_key,
    check_feedback_text,
    check_import_files,
    check_max_new_tokens,
    check_prompt,
    check_stop,
    check_user_id,
    grpc_message_options,
    user_id_of,
)

LIMITS = Limits()
GOOD_FILES = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x"}


@pytest.mark.parametrize("user_id", ["a", "alice", "user-42@example.com", "é" * 128, "x" * 256, "日本語", "a b"])
def test_good_user_ids_pass_unchanged(user_id: str) -> None:
    assert check_user_id(user_id, LIMITS) == user_id


@pytest.mark.parametrize(
    ("user_id", "message"),
    [
        ("", "user_id is empty"),
        ("x" * 257, "user_id is 257 bytes; the limit is 256"),
        ("é" * 129, "user_id is 258 bytes; the limit is 256"),
        ("a\nb", "control character U+000A at index 1"),
        ("\x00", "control character U+0000 at index 0"),
        ("tab\there", "control character U+0009"),
        ("del\x7f", "control character U+007F"),
        ("c1\x85", "control character U+0085"),
        ("\ud800", "not valid UTF-8"),
    ],
)
def test_bad_user_ids_name_the_problem(user_id: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        check_user_id(user_id, LIMITS)


def _valid(user_id: str) -> bool:
    try:
        size = len(user_id.encode("utf-8"))
    except UnicodeEncodeError:
        return False
    return 1 <= size <= 256 and not any(unicodedata.category(c) == "Cc" for c in user_id)


@given(st.text(max_size=300))
def test_user_id_accepted_iff_1_to_256_bytes_without_control_characters(user_id: str) -> None:
    if _valid(user_id):
        assert check_user_id(user_id, LIMITS) == user_id
    else:
        with pytest.raises(InvalidArgument, match="user_id"):
            check_user_id(user_id, LIMITS)


@given(
    st.text(alphabet=st.characters(categories=["Cc"]), min_size=1, max_size=3),
    st.text(alphabet=st.characters(exclude_categories=["Cc", "Cs"]), max_size=50),
)
def test_any_control_character_is_refused(control: str, text: str) -> None:
    with pytest.raises(InvalidArgument, match="control character"):
        check_user_id(text + control, LIMITS)


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (check_prompt, "x" * (16 * 1024 + 1), "prompt is 16385 bytes; the limit is 16384 (max_prompt_bytes)"),
        (
            lambda v, lim: check_feedback_text("completion", v, lim),
            "é" * 8193,
            "completion is 16386 bytes; the limit is 16384 (max_feedback_text_bytes)",
        ),
        (check_event_key, "k" * 257, "event_key is 257 bytes; the limit is 256 (max_event_key_bytes)"),
        (check_max_new_tokens, 513, "max_new_tokens is 513; the limit is 512"),
        (check_max_new_tokens, -1, "max_new_tokens is -1; it must be >= 0"),
        (check_stop, ["s"] * 17, "stop has 17 strings; the limit is 16"),
        (check_stop, ["ok", "s" * 257], "stop[1] is 257 bytes; the limit is 256 (max_stop_bytes)"),
    ],
)
def test_size_limits_name_limit_and_value(check: Callable[[Any, Limits], Any], value: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        check(value, LIMITS)


@pytest.mark.parametrize(
    ("check", "value", "expected"),
    [
        (check_prompt, "x" * 16 * 1024, "x" * 16 * 1024),
        (check_prompt, "", ""),
        (check_max_new_tokens, 0, 64),
        (check_max_new_tokens, 1, 1),
        (check_max_new_tokens, 512, 512),
        (check_stop, ["a", "b"], ("a", "b")),
        (check_event_key, "", ""),
    ],
)
def test_values_within_limits_pass(check: Callable[[Any, Limits], Any], value: Any, expected: Any) -> None:
    assert check(value, LIMITS) == expected


def test_limits_are_configurable() -> None:
    small = Limits(max_user_id_bytes=4, max_new_tokens=8, default_new_tokens=8)
    assert check_max_new_tokens(0, small) == 8
    with pytest.raises(InvalidArgument, match="user_id is 5 bytes; the limit is 4"):
        check_user_id("abcde", small)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_prompt_bytes": 0}, "max_prompt_bytes must be >= 1"),
        ({"requests_per_second": 0.0}, "requests_per_second must be > 0"),
        ({"default_new_tokens": 600}, "default_new_tokens .600. exceeds max_new_tokens .512."),
        ({"burst": 0}, "burst must be >= 1"),
    ],
)
def test_bad_limits_are_refused(fields: dict[str, float], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Limits(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"adapter_config.json": b"{}"}, "missing .'adapter_model.safetensors'."),
        ({**GOOD_FILES, "adapter_model.bin": b"pickle"}, "'adapter_model.bin'.* not accepted"),
        ({**GOOD_FILES, "../etc/passwd": b""}, "not accepted"),
        (
            {"adapter_config.json": b"{}", "adapter_model.safetensors": b"x" * 11},
            "adapter_model.safetensors is 11 bytes; the limit is 10",
        ),
    ],
)
def test_import_files_are_checked(files: dict[str, bytes], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_import_files(files, Limits(max_import_file_bytes=10))


def test_good_import_files_pass() -> None:
    assert check_import_files(GOOD_FILES, LIMITS) == GOOD_FILES


def test_message_options_fit_two_maximal_files() -> None:
    options = dict(grpc_message_options(Limits(max_import_file_bytes=1000)))
    assert options["grpc.max_receive_message_length"] >= 2000
    assert options["grpc.max_send_message_length"] >= 2000


Metadata = tuple[tuple[str, str], ...]


class _Context:
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


class _Request:
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id


@pytest.mark.parametrize(
    ("metadata", "request_user", "expected"),
    [
        ((), "alice", "alice"),
        ((("x-user-id", "bob"),), "", "bob"),
        ((("x-user-id", "bob"),), "bob", "bob"),
        ((("other", "v"), ("x-user-id", "carol")), None, "carol"),
    ],
)
def test_user_id_of_prefers_metadata(metadata: Metadata, request_user: str | None, expected: str) -> None:
    request = None if request_user is None else _Request(request_user)
    assert user_id_of(request, _Context(metadata)) == expected


@pytest.mark.parametrize(
    ("metadata", "request_user", "message"),
    [
        ((("x-user-id", "bob"),), "alice", "differs from the request's user_id"),
        ((), "", "user_id is empty"),
        ((("x-user-id", "x" * 300),), "", "user_id is 300 bytes; the limit is 256"),
    ],
)
def test_user_id_of_refuses(metadata: Metadata, request_user: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        user_id_of(_Request(request_user), _Context(metadata))


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_burst_then_refills_at_rate() -> None:
    clock = _Clock()
    limiter = RateLimiter(Limits(requests_per_second=10, burst=3), clock=clock)
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(ResourceExhausted, match="10 requests/s with a burst of 3"):
        limiter.check("a")
    limiter.check("b")  # buckets are per tenant
    clock.now += 0.15  # one token back (1.5 at 10/s; one stays fractional)
    limiter.check("a")
    with pytest.raises(ResourceExhausted):
        limiter.check("a")
    clock.now += 100.0  # refill caps at the burst
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(ResourceExhausted):
        limiter.check("a")


def test_feedback_quota_is_per_tenant_and_names_its_limit() -> None:
    clock = _Clock()
    quota = FeedbackQuota(Limits(feedback_per_second=1, feedback_burst=2), clock=clock)
    quota.check("a")
    quota.check("a")
    with pytest.raises(
        ResourceExhausted, match=r"feedback quota: the limit is 1 events/s with a burst of 2 \(feedback_"
    ):
        quota.check("a")
    quota.check("b")  # another tenant's quota is its own
    clock.now += 1.0
    quota.check("a")


def test_max_request_bytes_covers_the_largest_valid_request() -> None:
    limits = Limits(max_feedback_text_bytes=100 * 1024)
    assert limits.max_request_bytes > 4 * 100 * 1024 > DEFAULT_LIMITS.max_request_bytes


def test_concurrency_limiter_counts_per_tenant_and_releases() -> None:
    limiter = ConcurrencyLimiter(Limits(max_concurrent_generations=2))
    with limiter.hold("a"), limiter.hold("a"):
        assert limiter.running("a") == 2
        with pytest.raises(ResourceExhausted, match="has 2 generations running; the limit is 2"), limiter.hold("a"):
            pass
        with limiter.hold("b"):
            assert limiter.running("b") == 1
    assert limiter.running("a") == 0
    with pytest.raises(RuntimeError), limiter.hold("a"):
        raise RuntimeError("handler failed")
    assert limiter.running("a") == 0


def test_one_tenant_cannot_hold_every_handler_thread_by_default() -> None:
    from personalize_service.server.base import ServiceConfig

    assert DEFAULT_LIMITS.max_concurrent_generations * 4 <= ServiceConfig().threads
