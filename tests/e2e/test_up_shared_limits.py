"""`personalize up --shared-limits true` shares its limits through the embedded Valkey: the settings cannot
name that server (up starts it), so up hands its URL to the servers it runs in process. Without that the flag
was silently per process."""

from __future__ import annotations

from pathlib import Path

import redis

from personalize_service.cli.embedded import running_url
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from tests.e2e.upserver import Stubs, start_up


def test_up_keeps_the_tenant_rate_bucket_in_its_embedded_valkey(tmp_path: Path) -> None:
    server = start_up(tmp_path / "data", tmp_path / "up.log", "--shared-limits", "true")
    try:
        with server.channel() as channel:
            reply = Stubs.on(channel).api.Generate(
                pb.GenerateRequest(user_id="shared-user", prompt="Hi", max_new_tokens=2), timeout=60
            )
        assert reply.completion_tokens > 0
        client = redis.Redis.from_url(running_url(server.data_dir / "valkey"))
        try:
            assert client.exists("{pz:rl:default}"), sorted(client.scan_iter(match="{pz:*", count=1000))
        finally:
            client.close()
    finally:
        assert server.stop() == 0, server.log()[-3000:]
