"""Object stores against real backends: a temp directory and a SeaweedFS S3 server."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
import uuid
from pathlib import Path

import pytest
from s3server import S3Server

from personalize.adapters.store import (
    FileStore,
    ObjectStore,
    S3Config,
    S3Store,
    adapter_key,
    open_store,
    user_prefix,
)
from personalize.adapters.store.s3 import CHECKSUM_HEADER
from personalize.errors import CorruptObject, InvalidArgument, NotFound, Unavailable

HOSTILE_USERS = [
    ("acme", "../../etc"),
    ("acme", "a\x00b"),
    ("acme", "x" * 10_000),
    ("acme", "🦙👩‍👩‍👧"),
    ("", "alice"),
    ("../..", "/etc/passwd"),
    ("acme", ""),
]


def _corrupt_behind_the_back(store: ObjectStore, key: str, data: bytes, request: pytest.FixtureRequest) -> None:
    """Replace the stored bytes of `key` with `data` without going through the store."""
    if isinstance(store, FileStore):
        (store.root / key).write_bytes(data)
    else:
        assert isinstance(store, S3Store)
        raw = request.getfixturevalue("s3_server").client()
        stale = raw.stat_object(store.config.bucket, store.config.prefix + key).metadata[CHECKSUM_HEADER]
        raw.put_object(
            store.config.bucket,
            store.config.prefix + key,
            io.BytesIO(data),
            len(data),
            metadata={CHECKSUM_HEADER: stale},
        )  # keeps the old checksum: a silent bit flip


def test_put_get_round_trip(store: ObjectStore) -> None:
    key = adapter_key("acme", "alice", 1)
    data = os.urandom(100_000)
    checksum = store.put(key, data)
    assert checksum == "sha256:" + hashlib.sha256(data).hexdigest()
    assert store.get(key) == data
    assert store.get(key, checksum) == data
    assert store.exists(key)


def test_empty_object_round_trip(store: ObjectStore) -> None:
    key = adapter_key("acme", "alice", 2)
    assert store.get(key, store.put(key, b"")) == b""


def test_put_replaces_whole_object(store: ObjectStore) -> None:
    key = adapter_key("acme", "bob", 1)
    store.put(key, b"first version, long" * 100)
    checksum = store.put(key, b"second")
    assert store.get(key, checksum) == b"second"
    assert store.list(user_prefix("acme", "bob")) == [key]  # no temp files left behind


def test_missing_object_is_not_found_naming_the_key(store: ObjectStore) -> None:
    key = adapter_key("acme", "nobody", 3)
    with pytest.raises(NotFound, match=key):
        store.get(key)
    assert not store.exists(key)
    assert not store.delete(key)


def test_checksum_mismatch_is_corrupt_never_the_bytes(store: ObjectStore) -> None:
    key = adapter_key("acme", "carol", 1)
    store.put(key, b"good bytes")
    with pytest.raises(CorruptObject, match=key):
        store.get(key, "sha256:" + "0" * 64)


def test_bytes_changed_behind_the_store_are_corrupt(store: ObjectStore, request: pytest.FixtureRequest) -> None:
    key = adapter_key("acme", "dave", 1)
    checksum = store.put(key, b"the adapter as trained")
    _corrupt_behind_the_back(store, key, b"the adapter as tampered", request)
    with pytest.raises(CorruptObject, match=key):
        store.get(key, checksum)


def test_s3_verifies_its_stored_checksum_without_being_asked(
    s3_server: S3Server, request: pytest.FixtureRequest
) -> None:
    s3 = open_store(s3_server.s3_url("pz-tests", f"verify-{uuid.uuid4().hex[:12]}"))
    key = adapter_key("acme", "erin", 1)
    s3.put(key, b"original")
    _corrupt_behind_the_back(s3, key, b"flipped!", request)
    with pytest.raises(CorruptObject, match=key):
        s3.get(key)


def test_malformed_checksum_is_invalid(store: ObjectStore) -> None:
    key = adapter_key("acme", "frank", 1)
    store.put(key, b"x")
    with pytest.raises(InvalidArgument, match="checksum"):
        store.get(key, "md5:abc")


@pytest.mark.parametrize(("tenant", "user_id"), HOSTILE_USERS, ids=lambda v: repr(v)[:16])
def test_hostile_user_ids_stay_inside_the_prefix(store: ObjectStore, tenant: str, user_id: str) -> None:
    key = adapter_key(tenant, user_id, 1)
    assert key.startswith(user_prefix(tenant, user_id))
    store.put(key, b"payload")
    assert store.get(key) == b"payload"
    assert store.list(user_prefix(tenant, user_id)) == [key]
    if isinstance(store, FileStore):
        files = [Path(d) / f for d, _, fs in os.walk(store.root) for f in fs]
        assert files == [store.root / key]
        assert all(os.path.realpath(f).startswith(str(store.root) + os.sep) for f in files)


def test_delete_prefix_removes_one_user_only(store: ObjectStore) -> None:
    for version in (1, 2, 3):
        store.put(adapter_key("acme", "gina", version), b"g%d" % version)
    store.put(adapter_key("acme", "hank", 1), b"h")
    assert store.delete_prefix(user_prefix("acme", "gina")) == 3
    assert store.list(user_prefix("acme", "gina")) == []
    assert store.list("adapters/") == [adapter_key("acme", "hank", 1)]
    assert store.delete_prefix(user_prefix("acme", "gina")) == 0
    with pytest.raises(InvalidArgument, match="every object"):
        store.delete_prefix("")


def test_list_is_a_string_prefix_and_sorted(store: ObjectStore) -> None:
    keys = [adapter_key("acme", "ivy", v) for v in (3, 1, 2)]
    for key in keys:
        store.put(key, b"x")
    prefix = user_prefix("acme", "ivy")
    assert store.list(prefix) == sorted(keys)
    assert store.list(prefix + "v0000000000") == sorted(keys)
    assert store.list(prefix + "v000000000002") == [keys[2]]
    assert store.list(prefix[:12]) == sorted(keys)
    assert store.list("nothing/") == []


def test_delete_removes_the_object(store: ObjectStore) -> None:
    key = adapter_key("acme", "jack", 1)
    store.put(key, b"x")
    assert store.delete(key)
    assert not store.exists(key)
    assert not store.delete(key)
    with pytest.raises(NotFound):
        store.get(key)


@pytest.mark.parametrize(
    "key", ["../x", "/abs/path", "a//b", "a/./b", "a/../b", "", ".hidden", "a/", "a\x00b", "a\\b", "é", "x" * 2000]
)
def test_malformed_keys_are_refused(store: ObjectStore, key: str) -> None:
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
    ):
        with pytest.raises(InvalidArgument):
            call()


def test_file_store_refuses_keys_escaping_through_a_symlink(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = FileStore(tmp_path / "root")
    (store.root / "adapters").symlink_to(outside)
    with pytest.raises(InvalidArgument, match="outside"):
        store.put("adapters/x/v1.safetensors", b"escape")
    assert list(outside.iterdir()) == []


def test_file_store_delete_leaves_no_empty_user_folder(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put(adapter_key("acme", "kim", 1), b"x")
    store.delete_prefix(user_prefix("acme", "kim"))
    assert list(tmp_path.iterdir()) == []


def test_file_store_survives_a_leftover_temp_file(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    key = adapter_key("acme", "lou", 1)
    store.put(key, b"x")
    (store.root / key).parent.joinpath(".tmp-crashed").write_bytes(b"half")
    assert store.list("") == [key]


def test_s3_unreachable_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once closed
    store = open_store(f"s3://bucket/p?endpoint=127.0.0.1:{port}&secure=false&access_key=a&secret_key=b")
    with pytest.raises(Unavailable, match="unreachable"):
        store.get(adapter_key("t", "u", 1))
    with pytest.raises(Unavailable):
        store.put(adapter_key("t", "u", 1), b"x")


def test_s3_wrong_credentials_are_unavailable_with_a_reason(s3_server: S3Server) -> None:
    store = open_store(
        f"s3://pz-creds/?endpoint={s3_server.endpoint}&secure=false&access_key=nobody&secret_key=wrong-secret"
    )
    with pytest.raises(Unavailable, match=r"InvalidAccessKeyId|AccessDenied|Signature"):
        store.put(adapter_key("t", "u", 1), b"x")


def test_s3_credentials_from_the_environment(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONALIZE_S3_ACCESS_KEY", s3_server.access_key)
    monkeypatch.setenv("PERSONALIZE_S3_SECRET_KEY", s3_server.secret_key)
    store = open_store(f"s3://pz-env/pre?endpoint={s3_server.endpoint}&secure=false")
    key = adapter_key("t", "u", 1)
    assert store.get(key, store.put(key, b"env")) == b"env"
    assert s3_server.secret_key not in store.url and s3_server.secret_key not in repr(store)


def test_s3_url_parsing() -> None:
    config = S3Config.from_url(
        "s3://bkt/a/b/?endpoint=h:9000&secure=false&access_key=k&secret_key=topsecret&region=eu-1", env={}
    )
    assert (config.bucket, config.prefix, config.endpoint, config.secure) == ("bkt", "a/b/", "h:9000", False)
    assert (config.access_key, config.secret_key, config.region) == ("k", "topsecret", "eu-1")
    assert "topsecret" not in repr(config) and "topsecret" not in config.url()
    assert S3Config.from_url("s3://bkt", env={}).prefix == ""
    with pytest.raises(InvalidArgument, match="unknown s3 URL parameter"):
        S3Config.from_url("s3://bkt/?endpont=h:1", env={})
    with pytest.raises(InvalidArgument, match="both"):
        S3Config.from_url("s3://bkt/?access_key=k", env={})
    with pytest.raises(InvalidArgument, match="bucket"):
        S3Config.from_url("s3:///prefix", env={})


@pytest.mark.parametrize("url", ["gs://bucket/x", "ftp://h/x", "/abs/path", "", "file://relative/x", "file:///abs?x=1"])
def test_open_store_refuses_unknown_or_malformed_urls(url: str) -> None:
    with pytest.raises(InvalidArgument):
        open_store(url)


def test_open_store_file_url(tmp_path: Path) -> None:
    store = open_store((tmp_path / "with space").as_uri())
    assert isinstance(store, FileStore)
    assert store.root == tmp_path / "with space"
    assert open_store(store.url).root == store.root  # type: ignore[attr-defined]


def test_file_store_key_colliding_with_a_folder_is_invalid(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.put("adapters/x/v1", b"x")
    with pytest.raises(InvalidArgument, match="collides"):
        store.put("adapters/x", b"y")


def test_file_store_readers_never_see_a_partial_write(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    key = adapter_key("acme", "mia", 1)
    versions = [bytes([i]) * 300_000 for i in range(4)]
    store.put(key, versions[0])
    seen: set[bytes] = set()

    def read() -> None:
        for _ in range(100):
            seen.add(store.get(key))

    reader = threading.Thread(target=read)
    reader.start()
    for i in range(40):
        store.put(key, versions[i % 4])
    reader.join()
    assert seen <= set(versions)
