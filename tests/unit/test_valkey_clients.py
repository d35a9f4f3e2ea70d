"""Every Valkey/Redis client the library opens can serve as many concurrent calls as a server has handler
threads: redis-py's default pool (100) raises MaxConnectionsError, i.e. UNAVAILABLE, past that."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from personalize.adapters.registry import RegistryConfig, open_registry
from personalize.feedback.notify import redis_client
from personalize.routing.membership import membership_client
from personalize_service.server.base import ServiceConfig

URL = "redis://127.0.0.1:1/0"  # clients connect lazily: nothing is dialled here


def _registry_client(url: str) -> Any:
    return open_registry(RegistryConfig(url))._client


@pytest.mark.parametrize(
    "make", [redis_client, membership_client, _registry_client], ids=["stream", "membership", "registry"]
)
def test_a_client_pool_holds_every_handler_thread(make: Callable[[str], Any]) -> None:
    client = make(URL)
    try:
        assert client.connection_pool.max_connections >= ServiceConfig().threads
    finally:
        client.close()


@pytest.mark.parametrize(
    "make", [redis_client, membership_client, _registry_client], ids=["stream", "membership", "registry"]
)
def test_every_client_takes_the_password_and_acl_user_from_its_url(make: Callable[[str], Any]) -> None:
    for url, user in (("redis://:s3cret@127.0.0.1:1/0", None), ("redis://app:s3cret@127.0.0.1:1/0", "app")):
        client = make(url)
        try:
            kwargs = client.connection_pool.connection_kwargs
            assert (kwargs.get("password"), kwargs.get("username")) == ("s3cret", user)
        finally:
            client.close()
