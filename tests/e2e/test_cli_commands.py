"""The `personalize` client commands against a running `personalize up`, run as a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from personalize.model import BaseModel
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.net import find_free_port
from tests.e2e.upserver import Stubs, UpServer, make_peft_adapter


def personalize(server: UpServer | str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `personalize ARGS` against `server` (an UpServer or a HOST:PORT), found via PERSONALIZE_TARGET."""
    target = server if isinstance(server, str) else server.target
    environ = {**os.environ, "PERSONALIZE_TARGET": target}
    return subprocess.run(
        [sys.executable, "-m", "personalize_service.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=environ,
    )


@pytest.fixture(scope="module")
def adapter_dirs(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    dirs = [tmp_path_factory.mktemp(f"cli-adapter-{n}") for n in range(2)]
    for n, directory in enumerate(dirs):
        make_peft_adapter(base.model, seed=40 + n, directory=directory)
    return dirs


def test_generate_prints_the_text(up_server: UpServer, stubs: Stubs) -> None:
    expected = stubs.api.Generate(
        pb.GenerateRequest(user_id="cli-user", prompt="Hello, world", max_new_tokens=12), timeout=60
    )
    plain = personalize(up_server, "generate", "cli-user", "Hello, world", "--max-new-tokens", "12")
    streamed = personalize(up_server, "generate", "cli-user", "Hello, world", "--max-new-tokens", "12", "--stream")
    as_json = personalize(up_server, "generate", "cli-user", "Hello, world", "--max-new-tokens", "12", "--json")
    assert plain.returncode == streamed.returncode == as_json.returncode == 0, plain.stderr + streamed.stderr
    assert plain.stdout == streamed.stdout == expected.text + "\n"
    assert "adapter v0, cache none, node worker-0" in plain.stderr
    assert json.loads(as_json.stdout)["text"] == expected.text


def test_adapter_commands(up_server: UpServer, adapter_dirs: list[Path], tmp_path: Path) -> None:
    imported = personalize(up_server, "adapter", "import", "cli-alice", str(adapter_dirs[0]))
    assert imported.returncode == 0 and "as 'cli-alice' version 1 (rank 4)" in imported.stdout, imported.stderr

    shown = personalize(up_server, "adapter", "show", "cli-alice", "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["version"] == "1"  # uint64 is a JSON string

    exported = personalize(up_server, "adapter", "export", "cli-alice", str(tmp_path / "out"))
    assert exported.returncode == 0, exported.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    reimported = personalize(
        up_server, "adapter", "import", f"cli-bob={tmp_path / 'out'}", f"cli-carol={adapter_dirs[1]}"
    )
    assert reimported.returncode == 0 and "imported 2 of 2 adapters" in reimported.stdout, reimported.stderr

    deleted = personalize(up_server, "adapter", "delete", "cli-alice")
    assert deleted.returncode == 0 and "1 adapter versions" in deleted.stdout
    missing = personalize(up_server, "adapter", "show", "cli-alice")
    assert missing.returncode == 1 and "NOT_FOUND: user 'cli-alice' has no adapter" in missing.stderr


def test_import_reports_each_failure(up_server: UpServer, adapter_dirs: list[Path], tmp_path: Path) -> None:
    done = personalize(up_server, "adapter", "import", f"cli-dan={adapter_dirs[0]}", f"cli-eve={tmp_path}")
    assert done.returncode == 1
    assert "cli-eve:" in done.stderr and "lacks" in done.stderr and "imported 1 of 2" in done.stdout


def test_stats_and_nodes(up_server: UpServer) -> None:
    stats = personalize(up_server, "stats")
    nodes = personalize(up_server, "nodes")
    assert stats.returncode == nodes.returncode == 0
    assert "node worker-0" in stats.stdout and "batch" in stats.stdout
    assert f"worker-0  {up_server.target}  up" in nodes.stdout


def test_feedback_is_acknowledged_with_an_event_id(up_server: UpServer) -> None:
    done = personalize(up_server, "feedback", "cli-user", "--prompt", "p", "--completion", "c", "--kind", "accept")
    assert done.returncode == 0, done.stderr
    assert re.search(r"\d+-\d+", done.stdout), done.stdout
    bad = personalize(up_server, "feedback", "cli-user", "--prompt", "p", "--completion", "c", "--kind", "correct")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "correction" in bad.stderr


def test_errors_print_the_status_and_exit_nonzero(up_server: UpServer) -> None:
    bad = personalize(up_server, "generate", "cli-user", "hi", "--max-new-tokens", "100000")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT: max_new_tokens is 100000; the limit is 512" in bad.stderr
    down = personalize(f"127.0.0.1:{find_free_port()}", "stats", "--timeout", "3")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr and "personalize up" in down.stderr
