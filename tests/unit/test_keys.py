"""Object keys: fixed shape for any (tenant, user_id), distinct users never share a folder."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from personalize.adapters.store.base import check_key
from personalize.adapters.store.keys import (
    MAX_VERSION,
    adapter_key,
    adapter_version,
    user_digest,
    user_prefix,
)
from personalize.errors import InvalidArgument

KEY_RE = re.compile(r"^adapters/[0-9a-f]{32}/v\d{12}\.safetensors$")
PREFIX_RE = re.compile(r"^adapters/[0-9a-f]{32}/$")
# Any Python str, lone surrogates included (they reach us through os.fsdecode and friends).
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=200)

HOSTILE = [
    "../../etc",
    "..",
    ".",
    "/",
    "/etc/passwd",
    "a\x00b",
    "x" * 10_000,
    "🦙👩‍👩‍👧",
    "",
    "a/b\\c",
    "\ud800",
    "%2e%2e%2f",
    "C:\\Windows",
    "\n",
    "adapters/",
]


@given(tenant=ANY_TEXT, user_id=ANY_TEXT, version=st.integers(1, MAX_VERSION))
def test_any_string_pair_gives_a_fixed_shape_key(tenant: str, user_id: str, version: int) -> None:
    key = adapter_key(tenant, user_id, version)
    assert KEY_RE.match(key)
    assert key.startswith(user_prefix(tenant, user_id))
    assert adapter_version(key) == version
    check_key(key)  # every store accepts it


@given(a=st.tuples(ANY_TEXT, ANY_TEXT), b=st.tuples(ANY_TEXT, ANY_TEXT))
def test_distinct_pairs_give_distinct_prefixes(a: tuple[str, str], b: tuple[str, str]) -> None:
    if a != b:
        assert user_prefix(*a) != user_prefix(*b)
    else:
        assert user_prefix(*a) == user_prefix(*b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("ab", "c"), ("a", "bc")),  # the length prefix keeps the boundary
        (("", "abc"), ("abc", "")),
        (("t", "\ud83e\udd99"), ("t", "🦙")),  # a surrogate pair is not the character it would spell
        (("t", "u"), ("T", "u")),
    ],
)
def test_boundary_cases_do_not_collide(a: tuple[str, str], b: tuple[str, str]) -> None:
    assert user_prefix(*a) != user_prefix(*b)


@pytest.mark.parametrize("user_id", HOSTILE, ids=lambda s: repr(s)[:20])
@pytest.mark.parametrize("tenant", ["acme", "", "../.."])
def test_hostile_ids_give_safe_keys(tenant: str, user_id: str) -> None:
    key = adapter_key(tenant, user_id, 7)
    assert KEY_RE.match(key)
    assert PREFIX_RE.match(user_prefix(tenant, user_id))


def test_digest_is_stable() -> None:
    # Changing the derivation would orphan every stored adapter: pin it.
    assert user_digest("acme", "alice").hex()[:32] == user_prefix("acme", "alice")[9:41]
    expected = hashlib.sha256((4).to_bytes(8, "big") + b"acme" + b"alice").hexdigest()[:32]
    assert user_prefix("acme", "alice") == f"adapters/{expected}/"


@pytest.mark.parametrize("version", [0, -1, MAX_VERSION + 1, True, 1.0, "1"])
def test_bad_versions_are_refused(version: object) -> None:
    with pytest.raises(InvalidArgument, match="version"):
        adapter_key("t", "u", version)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, b"bytes", 5])
def test_non_str_ids_are_refused(value: object) -> None:
    with pytest.raises(InvalidArgument, match="must be a str"):
        user_prefix("t", value)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="must be a str"):
        user_prefix(value, "u")  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["adapters/abc/v1.safetensors", "adapters/" + "0" * 32 + "/v1.bin", "x"])
def test_adapter_version_of_other_keys_is_none(key: str) -> None:
    assert adapter_version(key) is None
