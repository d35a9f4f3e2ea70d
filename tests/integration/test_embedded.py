"""The embedded Valkey server: loopback, persistence across restarts, clear failures."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import redis

from personalize_service.cli.embedded import PASSWORD_FILE, EmbeddedValkey, EmbeddedValkeyConfig, EmbeddedValkeyError
from personalize_service.net import find_free_port


def _server(data_dir: Path, **kwargs: object) -> EmbeddedValkey:
    return EmbeddedValkey(EmbeddedValkeyConfig(data_dir=data_dir, **kwargs))  # type: ignore[arg-type]


def test_runs_loopback_only_with_aof_and_protected_mode(tmp_path: Path) -> None:
    with _server(tmp_path) as server:
        password = (tmp_path / PASSWORD_FILE).read_text()
        assert server.url == f"redis://:{password}@127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.ping()
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("protected-mode")["protected-mode"] == "yes"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "always"
        assert client.config_get("save")["save"] == ""
        assert client.config_get("hash-max-listpack-entries")["hash-max-listpack-entries"] == "512"
    assert not server.running


def test_restart_on_the_same_data_dir_keeps_the_data(tmp_path: Path) -> None:
    server = _server(tmp_path).start()
    redis.Redis.from_url(server.url).hset("h", mapping={"a": "1", "b": "2"})
    server.stop()
    with _server(tmp_path) as again:
        assert redis.Redis.from_url(again.url).hgetall("h") == {b"a": b"1", b"b": b"2"}


def test_a_crash_loses_no_acknowledged_write(tmp_path: Path) -> None:
    server = _server(tmp_path).start()
    client = redis.Redis.from_url(server.url)
    for i in range(200):  # each reply comes after its fsync: the last one too
        client.xadd("s", {"i": str(i)})
    os.kill(server.pid, signal.SIGKILL)
    server.stop()  # reaps the dead process, releases the data dir
    with _server(tmp_path) as again:
        entries = redis.Redis.from_url(again.url).xrange("s")
        assert [int(fields[b"i"]) for _, fields in entries] == list(range(200))


def test_revive_restarts_a_killed_server_on_its_port_and_aof(tmp_path: Path) -> None:
    with _server(tmp_path) as server:
        url, first = server.url, server.pid
        assert not server.revive()  # alive: nothing to do
        redis.Redis.from_url(url).set("k", "v")
        os.kill(first, signal.SIGKILL)
        while server.running:
            time.sleep(0.01)
        assert server.revive()
        assert server.url == url and server.pid != first
        assert redis.Redis.from_url(url).get("k") == b"v"
    assert not server.running


def test_restart_keeps_its_port_when_it_can(tmp_path: Path) -> None:
    server = _server(tmp_path).start()
    port = server.port
    server.stop()
    server.stop()  # idempotent
    server.start()
    assert server.port == port
    server.stop()


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(EmbeddedValkeyError, match=f"port {port} .*already in use"):
            _server(tmp_path, port=port).start()


def test_one_server_per_data_dir(tmp_path: Path) -> None:
    with _server(tmp_path), pytest.raises(EmbeddedValkeyError, match="in use by another valkey server"):
        _server(tmp_path).start()
    with _server(tmp_path) as server:  # released on stop
        assert server.running


def test_a_startup_failure_shows_the_server_log(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedValkeyError, match=r"(?s)exited with code.*no-such-directive"):
        _server(tmp_path, settings={"no-such-directive": "1"}).start()
    with _server(tmp_path) as server:  # the failed start released the data dir
        assert server.running


def test_managed_settings_cannot_be_overridden(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bind"):
        EmbeddedValkeyConfig(data_dir=tmp_path, settings={"bind": "0.0.0.0"})


def test_fixed_port(tmp_path: Path) -> None:
    port = find_free_port()
    with _server(tmp_path, port=port) as server:
        assert server.port == port
        assert redis.Redis.from_url(server.url).ping()


def test_a_client_without_the_password_is_refused_and_the_password_survives_restarts(tmp_path: Path) -> None:
    with _server(tmp_path) as server:
        path = tmp_path / PASSWORD_FILE
        password = path.read_text()
        assert len(password) >= 32 and path.stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "valkey.conf").stat().st_mode & 0o777 == 0o600
        for url in (f"redis://127.0.0.1:{server.port}/0", f"redis://:wrong@127.0.0.1:{server.port}/0"):
            with pytest.raises(redis.exceptions.AuthenticationError):
                redis.Redis.from_url(url).ping()
        redis.Redis.from_url(server.url).set("k", "v")
        assert password not in server.safe_url
    with _server(tmp_path) as again:
        assert path.read_text() == password and redis.Redis.from_url(again.url).get("k") == b"v"
    with _server(tmp_path.parent / f"{tmp_path.name}-other") as other:
        assert (tmp_path.parent / f"{tmp_path.name}-other" / PASSWORD_FILE).read_text() != password
        assert other.running
