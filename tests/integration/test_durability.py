"""The startup check that the registry's Valkey fsyncs every write before acknowledging it, against real
servers configured each way (a kill of the server cannot tell `everysec` from `always`: the page cache
survives it, so the setting itself is what is checked)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from personalize import bootstrap
from personalize.adapters.registry import RegistryConfig
from personalize.config import Config
from personalize.durability import check_durability, check_server_version, server_of, unsynced_reason, version_problem
from personalize.errors import InvalidArgument
from personalize_service.cli.embedded import EmbeddedValkey, EmbeddedValkeyConfig


@pytest.fixture(scope="module")
def everysec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey]:
    """A server that acknowledges writes up to a second before they are on disk."""
    config = EmbeddedValkeyConfig(data_dir=tmp_path_factory.mktemp("everysec"), settings={"appendfsync": "everysec"})
    with EmbeddedValkey(config) as server:
        yield server


def client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5.0)


def test_a_server_that_fsyncs_every_write_is_accepted(redis_client: redis.Redis) -> None:
    assert unsynced_reason(redis_client) == ""
    check_durability(redis_client)


def test_appendfsync_everysec_is_refused(everysec: EmbeddedValkey) -> None:
    with client(everysec.url) as c:
        assert c.config_get("appendfsync") == {"appendfsync": "everysec"}  # the server really runs so
        with pytest.raises(InvalidArgument, match=r"appendfsync is 'everysec'.*allow-unsynced-registry"):
            check_durability(c)


def test_an_operator_may_accept_everysec_and_is_told_loudly(
    everysec: EmbeddedValkey, caplog: pytest.LogCaptureFixture
) -> None:
    with client(everysec.url) as c, caplog.at_level(logging.ERROR, logger="personalize.durability"):
        check_durability(c, allow_unsynced=True)
    assert any(r.levelno == logging.ERROR and "everysec" in r.getMessage() for r in caplog.records)


def test_no_aof_is_refused(tmp_path: Path) -> None:
    with (
        EmbeddedValkey(EmbeddedValkeyConfig(data_dir=tmp_path, settings={"appendonly": "no"})) as server,
        client(server.url) as c,
        pytest.raises(InvalidArgument, match="appendonly is 'no'"),
    ):
        check_durability(c)


def test_a_server_without_config_is_accepted_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = {"appendfsync": "everysec", "rename-command": 'CONFIG ""'}  # as managed services do
    with (
        EmbeddedValkey(EmbeddedValkeyConfig(data_dir=tmp_path, settings=settings)) as server,
        client(server.url) as c,
        caplog.at_level(logging.WARNING, logger="personalize.durability"),
    ):
        with pytest.raises(redis.exceptions.ResponseError):
            c.config_get("appendfsync")
        assert unsynced_reason(c) is None
        check_durability(c)
    assert any("cannot check" in r.getMessage() for r in caplog.records)


def test_the_worker_refuses_to_start_on_everysec(everysec: EmbeddedValkey, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="registry server is not durable"):
        bootstrap.worker(
            Config(
                data_dir=str(tmp_path),
                registry=RegistryConfig(url=everysec.url),
                store_url=(tmp_path / "store").as_uri(),
            )
        )


def test_the_trainer_refuses_to_start_on_everysec(everysec: EmbeddedValkey, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PERSONALIZE_REGISTRY_URL": everysec.url,
        "PERSONALIZE_DATA_DIR": str(tmp_path),
        "PERSONALIZE_STORE_URL": (tmp_path / "store").as_uri(),
    }
    done = subprocess.run(
        [sys.executable, "-m", "personalize_service.cli", "serve", "--role", "trainer"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "appendfsync is 'everysec'" in done.stdout + done.stderr, done.stderr[-2000:]


def test_the_real_server_is_recent_enough_for_the_feedback_scripts(redis_client: redis.Redis) -> None:
    info = redis_client.info("server")
    kind, version = server_of(info)
    assert kind == "valkey" and version_problem(kind, version) == ""
    check_server_version(redis_client)  # the startup check passes against it


def test_a_too_old_server_stops_startup_naming_versions(redis_client: redis.Redis) -> None:
    class Old:  # the real server's INFO, with the version an old Valkey would report
        def info(self, section: str) -> dict[str, object]:
            return {**redis_client.info(section), "valkey_version": "8.1.1"}

    with pytest.raises(InvalidArgument, match=r"valkey 8\.1\.1 is too old.*HEXPIRE.*>= 9\.0"):
        check_server_version(Old())
