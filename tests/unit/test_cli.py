"""The `personalize` command's parsing, help and messages (running servers is tests/e2e)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from personalize_service.cli import commands as cli
from personalize_service.cli import launcher, settings


def test_help_explains_the_commands_with_examples() -> None:
    text = cli.build_parser().format_help()
    for word in ("up", "serve", "generate", "feedback", "adapter", "stats", "nodes", "examples:"):
        assert word in text


@pytest.mark.parametrize("command", [settings.UP, settings.SERVE])
def test_server_commands_take_every_setting_of_the_table(command: str) -> None:
    parser = cli.build_parser()
    flags = [s.flag for s in settings.settings_for(command)]
    args = parser.parse_args([command, *[part for flag in flags for part in (flag, "1")]])
    for setting in settings.settings_for(command):
        assert getattr(args, settings.dest(setting)) == "1"
    assert args.server == command


def test_flags_left_out_are_none_so_env_and_file_can_apply() -> None:
    args = cli.build_parser().parse_args(["up"])
    assert all(getattr(args, settings.dest(s)) is None for s in settings.settings_for(settings.UP))


def test_client_connection_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONALIZE_TARGET", "10.0.0.1:6000")
    monkeypatch.setenv("PERSONALIZE_API_KEY", "k")
    args = cli.build_parser().parse_args(["stats"])
    assert (args.target, args.api_key) == ("10.0.0.1:6000", "k")


@pytest.mark.parametrize(
    ("items", "pairs"),
    [
        (["alice", "./dir"], [("alice", Path("./dir"))]),
        (["alice=./a"], [("alice", Path("./a"))]),
        (["alice=./a", "bob=/b=c"], [("alice", Path("./a")), ("bob", Path("/b=c"))]),
    ],
)
def test_import_items(items: list[str], pairs: list[tuple[str, Path]]) -> None:
    assert cli.parse_import_items(items) == pairs


@pytest.mark.parametrize("items", [["alice"], ["alice", "./a", "./b"], ["alice=./a", "bob"], ["=./a"], ["a="]])
def test_bad_import_items(items: list[str]) -> None:
    with pytest.raises(ValueError, match="USER=DIR"):
        cli.parse_import_items(items)


def test_banner_without_keys_says_so_and_shows_copy_paste_commands(tmp_path: Path) -> None:
    text = launcher.up_banner(
        50051, 0, "worker-0", "tiny on cpu", "sha256:" + "ab" * 32, "redis://127.0.0.1:1/0", tmp_path, "file:///x", ()
    )
    assert text.splitlines()[0] == "personalize up: serving on 127.0.0.1:50051"
    assert "no API keys configured: accepting tenant 'default' without a key" in text
    assert 'personalize generate alice "Tell me about LoRA"' in text and "--target" not in text
    assert "PersonalizeClient" in text and "grpcurl -plaintext 127.0.0.1:50051 list" in text


def test_banner_with_keys_and_another_port(tmp_path: Path) -> None:
    text = launcher.up_banner(
        6000,
        9100,
        "worker-0",
        "tiny on cpu",
        "sha256:" + "ab" * 32,
        "redis://h:1/0",
        tmp_path,
        "file:///x",
        ("acme", "globex"),
    )
    assert "no API keys" not in text and "acme, globex" in text
    assert "--target 127.0.0.1:6000 --api-key $KEY" in text and "http://127.0.0.1:9100/metrics" in text


def test_serve_without_registry_or_store_says_what_is_missing() -> None:
    values = settings.resolve(settings.SERVE, {}, {})
    with pytest.raises(launcher.LaunchError, match="--registry-url / PERSONALIZE_REGISTRY_URL and --store-url"):
        launcher.run_serve("worker", values)


def test_client_command_without_a_server_fails_with_the_status() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "personalize_service.cli", "stats", "--target", "127.0.0.1:9", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and done.stderr.startswith("personalize: error: UNAVAILABLE")


def test_usage_errors_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "personalize_service.cli", "generate"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "the following arguments are required: user, prompt" in done.stderr
