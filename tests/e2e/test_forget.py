"""What a user's feedback leaves behind, against `personalize up`: an export of a trained adapter holds none of
the user's text and round trips byte-identical through another user; after DeleteUser no byte of the text is
left in any Valkey key (streams, dead letters, hashes, ...) or any file under the data directory (store, disk
cache, the server's AOF)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest
import redis

from personalize_service.cli.embedded import running_url
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from tests.e2e.upserver import Stubs, UpServer


def _valkey(up_server: UpServer) -> redis.Redis:
    return redis.Redis.from_url(running_url(up_server.data_dir / "valkey"))


def _dump(client: redis.Redis, key: bytes) -> bytes:
    """Every byte a key holds, whatever its type (a stream's entries and its groups' names included)."""
    kind = client.type(key).decode()
    if kind == "string":
        return client.get(key) or b""
    if kind == "hash":
        return b"".join(k + v for k, v in client.hgetall(key).items())
    if kind == "list":
        return b"".join(client.lrange(key, 0, -1))
    if kind in ("set",):
        return b"".join(client.smembers(key))
    if kind == "zset":
        return b"".join(m for m, _ in client.zrange(key, 0, -1, withscores=True))
    if kind == "stream":
        entries = client.xrange(key, "-", "+")
        return b"".join(i + b"".join(k + v for k, v in f.items()) for i, f in entries)
    return client.dump(key) or b""


def _in_valkey(client: redis.Redis, marker: bytes) -> list[str]:
    return [k.decode(errors="replace") for k in client.scan_iter(count=1000) if marker in k + _dump(client, k)]


def _in_files(root: Path, marker: bytes) -> list[str]:
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file() and marker in p.read_bytes()]


def _wait_applied(stubs: Stubs, user: str, count: int, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        info = stubs.api.GetAdapter(pb.GetAdapterRequest(user_id=user), timeout=30) if _has(stubs, user) else None
        if info is not None and info.examples_seen == count and info.pending_events == 0:
            return
        assert time.monotonic() < deadline, f"{user}: not trained in {timeout_s}s ({info})"
        time.sleep(0.3)


def _has(stubs: Stubs, user: str) -> bool:
    try:
        stubs.api.GetAdapter(pb.GetAdapterRequest(user_id=user), timeout=30)
    except Exception:
        return False
    return True


def test_export_is_plain_peft_and_delete_user_leaves_no_byte_of_the_users_text(
    up_server: UpServer, stubs: Stubs
) -> None:
    marker = f"zqx{secrets.token_hex(6)}"
    user = f"forget-{marker}"  # the user id too must go from every key and file
    for i in range(2):
        stubs.api.SubmitFeedback(
            pb.FeedbackRequest(
                user_id=user,
                prompt=f"Q: what is {marker} {i}?\nA: ",
                completion="no idea",
                kind=pb.FeedbackRequest.CORRECT,
                correction=f"It is {marker} number {i}.",
                event_key=f"{marker}-{i}",
            ),
            timeout=30,
        )
    _wait_applied(stubs, user, 2)
    served = stubs.api.Generate(pb.GenerateRequest(user_id=user, prompt="Hi", max_new_tokens=2), timeout=120)
    assert served.adapter_version >= 1  # the adapter is in the caches (device, host, disk)

    first = stubs.api.ExportAdapter(pb.ExportAdapterRequest(user_id=user), timeout=60)
    assert set(first.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert not [n for n, data in first.files.items() if marker.encode() in data or b"Q: what is" in data]
    copy = f"copy-{secrets.token_hex(4)}"
    stubs.api.ImportAdapter(pb.ImportAdapterRequest(user_id=copy, files=dict(first.files)), timeout=60)
    again = stubs.api.ExportAdapter(pb.ExportAdapterRequest(user_id=copy), timeout=60)
    assert dict(again.files) == dict(first.files)  # a trained user's export round trips byte-identical
    third = f"copy-{secrets.token_hex(4)}"
    stubs.api.ImportAdapter(pb.ImportAdapterRequest(user_id=third, files=dict(again.files)), timeout=60)
    assert dict(stubs.api.ExportAdapter(pb.ExportAdapterRequest(user_id=third), timeout=60).files) == dict(first.files)

    client = _valkey(up_server)
    needle = marker.encode()
    # Precondition: the scans can see the text while the user exists (the version's examples object keeps it).
    assert _in_files(up_server.data_dir / "store", needle), "the store should hold the user's examples"
    stubs.api.DeleteUser(pb.DeleteUserRequest(user_id=user), timeout=60)
    assert _in_valkey(client, needle) == []
    # DeleteUser asked the server to rewrite its AOF, whose older commands held the text.
    deadline = time.monotonic() + 60
    while client.info("persistence").get("aof_rewrite_in_progress") or client.info("persistence").get(
        "aof_rewrite_scheduled"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while (left := _in_files(up_server.data_dir, needle)) and time.monotonic() < deadline:
        time.sleep(0.5)  # the old AOF files are removed just after the rewrite completes
    assert left == []


def test_the_registry_password_is_required_and_shown_nowhere(up_server: UpServer) -> None:
    password = (up_server.data_dir / "valkey" / "password").read_text().strip()
    port = running_url(up_server.data_dir / "valkey").rsplit(":", 1)[1].split("/")[0]
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=int(port)).ping()  # `up`'s Valkey refuses a client without it
    assert redis.Redis.from_url(running_url(up_server.data_dir / "valkey")).ping()
    assert ":***@" in up_server.log() and password not in up_server.log()
    logs = list(up_server.data_dir.rglob("*.log"))
    assert logs and not [p for p in logs if password in p.read_text(errors="replace")]
    trainer = int((up_server.data_dir / "trainer.pid").read_text())
    assert password.encode() not in Path(f"/proc/{trainer}/cmdline").read_bytes()  # by environment, not argv
