"""The chaos run's exactly-once check (loadtest/chaos.py: trained_record, exactly_once) on a real store: the
event ids each stored version lists in its examples object, against the acked events, never the trainer's
examples_seen counter."""

from __future__ import annotations

from loadtest.chaos import exactly_once, trained_record
from loadtest.chaos_load import Event
from personalize.adapters.store import ObjectStore
from personalize.adapters.store.base import checksum_of
from personalize.adapters.store.keys import adapter_key, examples_key
from personalize.feedback.examples import VersionExamples, encode

TENANT = "default"


def _version(store: ObjectStore, user: str, version: int, ids: list[str], weights: bytes = b"w") -> str:
    """Store one version the way AdapterRepository.publish names it: examples object, then adapter object."""
    examples = encode(VersionExamples(event_ids=ids))
    store.put(examples_key(TENANT, user, version, checksum_of(examples)), examples)
    data = weights + bytes([version]) + ",".join(ids).encode()
    key = adapter_key(TENANT, user, version, checksum_of(data))
    store.put(key, data)
    return key


def _acked(user: str, *ids: str) -> list[Event]:
    return [Event(f"key-{i}", user, attempts=1, acked=True, event_id=i) for i in ids]


def test_every_acked_id_in_exactly_one_version_is_applied_once(store: ObjectStore) -> None:
    _version(store, "u", 1, ["1-0", "2-0"])
    _version(store, "u", 2, ["3-0"])
    _version(store, "v", 1, ["4-0"])
    records = {user: trained_record(store, TENANT, user, current_version=2 if user == "u" else 1) for user in "uv"}
    result = exactly_once(_acked("u", "1-0", "2-0", "3-0") + _acked("v", "4-0"), [], records, set())
    assert (result["applied"], result["lost"], result["applied_twice"], result["unknown_ids"]) == (4, 0, 0, 0)


def test_an_acked_id_no_version_lists_is_lost(store: ObjectStore) -> None:
    _version(store, "u", 1, ["1-0"])  # "2-0" was acked but trained into no version
    result = exactly_once(_acked("u", "1-0", "2-0"), [], {"u": trained_record(store, TENANT, "u", 1)}, set())
    assert (result["applied"], result["lost"], result["lost_by_user"]) == (1, 1, {"u": 1})


def test_an_id_two_versions_list_is_applied_twice(store: ObjectStore) -> None:
    _version(store, "u", 1, ["1-0"])
    _version(store, "u", 2, ["1-0", "2-0"])
    result = exactly_once(_acked("u", "1-0", "2-0"), [], {"u": trained_record(store, TENANT, "u", 2)}, set())
    assert (result["applied"], result["applied_twice"], result["twice_by_user"]) == (1, 1, {"u": 1})


def test_orphans_count_once_per_version_and_not_at_all_above_the_current_version(store: ObjectStore) -> None:
    # A trainer killed between its writes and its CAS left v2 with "2-0"; its successor wrote v2 again.
    _version(store, "u", 1, ["1-0"])
    _version(store, "u", 2, ["2-0"], weights=b"orphan")
    _version(store, "u", 2, ["2-0", "3-0"])
    _version(store, "u", 3, ["4-0"], weights=b"orphan")  # never CAS'd in: the registry is at v2
    record = trained_record(store, TENANT, "u", current_version=2)
    assert dict(record.versions) == {"1-0": 1, "2-0": 1, "3-0": 1}
    result = exactly_once(_acked("u", "1-0", "2-0", "3-0", "4-0"), [], {"u": record}, set())
    assert (result["applied"], result["applied_twice"], result["lost"]) == (3, 0, 1)  # "4-0" only in the orphan


def test_ids_of_a_corrupted_version_are_destroyed_only_where_the_run_corrupted_it(store: ObjectStore) -> None:
    for user in ("u", "v"):
        _version(store, user, 1, [f"1-{user}"])
        key = _version(store, user, 2, [f"2-{user}"])
        data = bytearray(store.get(key))
        data[0] ^= 0xFF  # bit rot behind the store's back: the name no longer matches the bytes
        store.put(key, bytes(data))
    records = {user: trained_record(store, TENANT, user, 2) for user in "uv"}
    assert records["u"].corrupt == {"2-u"}
    result = exactly_once(_acked("u", "1-u", "2-u") + _acked("v", "1-v", "2-v"), [], records, destroyed={"u"})
    assert (result["applied"], result["destroyed_by_fault"], result["lost"], result["lost_by_user"]) == (
        2,
        1,
        1,
        {"v": 1},
    )


def test_ids_no_acked_event_got_are_bounded_by_the_unacked_events(store: ObjectStore) -> None:
    _version(store, "u", 1, ["1-0", "9-0", "9-1"])  # two ids the client never saw acked
    unacked = [Event("key-x", "u", attempts=3)]  # one send that may have been stored
    result = exactly_once(_acked("u", "1-0"), unacked, {"u": trained_record(store, TENANT, "u", 1)}, set())
    assert (result["applied"], result["unknown_ids"], result["unknown_by_user"]) == (1, 1, {"u": 1})
    record = trained_record(store, TENANT, "u", 1)
    assert exactly_once(_acked("u", "1-0"), unacked * 2, {"u": record}, set())["unknown_ids"] == 0
