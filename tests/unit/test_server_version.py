"""The registry server's version check: which servers can run the feedback scripts (HEXPIRE), and the refusal
naming the version found and the one needed (only one server binary is at hand, so the refusal is tested here)."""

from __future__ import annotations

import pytest

from personalize.durability import parse_version, server_of, version_problem


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("9.0.1", (9, 0, 1)), ("7.4.0-rc1", (7, 4, 0)), ("7.4", (7, 4)), ("255.255.255", (255, 255, 255)), ("", ())],
)
def test_versions_parse(text: str, parsed: tuple[int, ...]) -> None:
    assert parse_version(text) == parsed


@pytest.mark.parametrize(
    ("server", "version", "ok"),
    [
        ("valkey", "9.0.0", True),
        ("valkey", "9.1.2", True),
        ("valkey", "10.0.0", True),
        ("valkey", "8.1.3", False),
        ("valkey", "7.2.4", False),
        ("redis", "7.4.0", True),
        ("redis", "8.0.2", True),
        ("redis", "7.2.5", False),
        ("redis", "6.2.14", False),
        ("redis", "", False),
        ("keydb", "6.3.4", False),
    ],
)
def test_old_servers_are_refused_naming_found_and_needed(server: str, version: str, ok: bool) -> None:
    problem = version_problem(server, version)
    assert (problem == "") is ok, problem
    if not ok and server != "keydb":
        assert version in problem and ("9.0" if server == "valkey" else "7.4") in problem and "HEXPIRE" in problem


def test_valkey_is_told_apart_by_its_own_version_field() -> None:
    # Valkey reports redis_version 7.2.4 for compatibility: judged by that, every Valkey 9 would be refused.
    assert server_of({"redis_version": "7.2.4", "valkey_version": "9.0.0"}) == ("valkey", "9.0.0")
    assert server_of({"redis_version": "7.2.4"}) == ("redis", "7.2.4")
