"""The settings table: defaults equal the config dataclasses, precedence flag > env > file > default, and
the README documents exactly this table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from personalize.adapters.registry import RegistryConfig
from personalize.config import Config
from personalize.errors import InvalidArgument
from personalize_service.cli import settings
from personalize_service.cli.settings import SETTINGS, SettingsError, build, parse_size, resolve
from personalize_service.server.auth import ApiKeys
from personalize_service.server.base import ServiceConfig
from personalize_service.server.limits import Limits
from personalize_service.server.router import RouterConfig

README = Path(__file__).resolve().parents[2] / "README.md"
NOT_FIELDS = {
    "limits.shared": False,  # becomes service.shared_limits = the registry's RegistryConfig
    "service.api_keys": "",
    "service.api_keys_file": "",
    "service.operator_keys": "",
    "workers": 1,
    "worker_restarts": 10,
    "worker_advertise": "",
    "http_port": 8000,
    "gateway_target": "127.0.0.1:50051",
    "completion_ttl_s": 86400,
}
"""Settings that are not one dataclass field (API keys become ServiceConfig.api_keys; the worker_* are up's)."""
UNEXPOSED = {
    "service.shared_limits",  # set from limits.shared
    "model.seed",
    "engine.max_prefill_tokens",
    "limits.max_stop_strings",
    "limits.max_stop_bytes",
    "limits.max_feedback_text_bytes",
    "limits.max_event_key_bytes",
    "limits.max_user_id_bytes",
    "service.limits",
    "feedback.namespace",
    "feedback.group",
    "feedback.idempotency_ttl_s",
    "feedback.max_len",
    "feedback.max_dead_letters",
    "trainer.alpha",
    "trainer.lr_ratio_b",
    "trainer.max_tokens",
    "trainer.beta",
    "trainer.grad_clip",
    "trainer.max_attempts",
    "trainer.block_ms",
    "trainer.replay",
    "trainer.lora_dropout",
    "trainer.dropout_min_examples",
    "trainer.weight_decay",
    "trainer.replay_per_event",
    "trainer.linger_ms",
    "trainer.reject_distinctive",
    "trainer.learned_loss",
    "trainer.prefer_fit_loss",
}
"""Dataclass fields deliberately left at their defaults (no flag): changing them needs code review."""
ROOTS: dict[str, Any] = {"": Config(), "service.": ServiceConfig(), "router.": RouterConfig(), "limits.": Limits()}


def _default_of(key: str) -> Any:
    prefix = next((p for p in ROOTS if p and key.startswith(p)), "")
    value: Any = ROOTS[prefix]
    for part in key.removeprefix(prefix).split("."):
        value = getattr(value, part)
    return value


def _field_keys() -> set[str]:
    """Dotted keys of every leaf field of the config roots (nested config dataclasses expanded)."""

    def leaves(obj: Any, prefix: str) -> set[str]:
        keys = set()
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            nested = dataclasses.is_dataclass(value) and not isinstance(value, Limits | ApiKeys)
            keys |= leaves(value, f"{prefix}{field.name}.") if nested else {prefix + field.name}
        return keys

    return set().union(*(leaves(root, prefix) for prefix, root in ROOTS.items()))


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.key for s in SETTINGS])
def test_table_default_equals_the_dataclass_default(setting: settings.Setting) -> None:
    expected = NOT_FIELDS[setting.key] if setting.key in NOT_FIELDS else _default_of(setting.key)
    assert setting.default == expected
    assert setting.parse(setting.show(setting.default)) == setting.default


def test_every_config_field_is_a_setting_or_deliberately_unexposed() -> None:
    table = {s.key for s in SETTINGS}
    assert _field_keys() - table - UNEXPOSED == set()
    assert UNEXPOSED & table == set()


def test_flags_and_variables_are_unique_and_named_consistently() -> None:
    flags = [s.flag for s in SETTINGS]
    envs = [s.env for s in SETTINGS]
    assert len(set(flags)) == len(flags) and len(set(envs)) == len(envs)
    assert all(f.startswith("--") for f in flags) and all(e.startswith("PERSONALIZE_") for e in envs)


def test_readme_documents_the_table() -> None:
    assert settings.markdown_table() in README.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("1234", 1234),
        ("64KiB", 65536),
        ("512MiB", 512 * 2**20),
        ("8GiB", 8 * 2**30),
        (" 2 TiB ", 2 * 2**40),
        ("7B", 7),
    ],
)
def test_sizes_parse(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1.5GiB", "-1", "12 kb", "GiB", "1e9"])
def test_bad_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_precedence_is_flag_then_env_then_file_then_default(tmp_path: Path) -> None:
    file = _write(
        tmp_path, "c.toml", 'node_id = "from-file"\ndata_dir = "/file"\n[service]\nport = 1\nmetrics_port = 9\n'
    )
    env = {"PERSONALIZE_PORT": "2", "PERSONALIZE_METRICS_PORT": "8", "PERSONALIZE_NODE_ID": "from-env"}
    values = resolve(settings.SERVE, {"port": "3"}, env, file)
    assert values["service.port"] == 3  # flag
    assert values["service.metrics_port"] == 8 and values["node_id"] == "from-env"  # env
    assert values["data_dir"] == "/file"  # file
    assert values["engine.max_batch"] == 32  # default


def test_config_file_may_come_from_the_environment_and_use_json_with_dotted_keys(tmp_path: Path) -> None:
    file = _write(tmp_path, "c.json", json.dumps({"model.device": "cuda", "lora": {"device_bytes": "1GiB"}}))
    values = resolve(settings.SERVE, {}, {settings.CONFIG_ENV: file})
    assert values["model.device"] == "cuda" and values["lora.device_bytes"] == 2**30


def test_empty_env_var_counts_as_unset() -> None:
    assert resolve(settings.UP, {}, {"PERSONALIZE_PORT": ""})["service.port"] == 50051


@pytest.mark.parametrize(
    ("flags", "env", "file_text", "message"),
    [
        ({"port": "http"}, {}, None, "--port: 'http' is not an integer"),
        ({}, {"PERSONALIZE_MAX_BATCH": "lots"}, None, "PERSONALIZE_MAX_BATCH (environment): 'lots' is not an integer"),
        ({}, {"PERSONALIZE_DEVICE_CACHE": "1.5G"}, None, "'1.5G' is not a size"),
        ({}, {}, '{"modle": {"path": "x"}}', "unknown settings ['modle.path']"),
        ({}, {}, '{"service": {"port": true}}', "service.port in"),
        ({}, {}, "[1, 2]", "top level must be an object"),
        ({}, {}, "{not json", "not valid JSON"),
    ],
)
def test_malformed_values_name_their_source(
    tmp_path: Path, flags: dict[str, str], env: dict[str, str], file_text: str | None, message: str
) -> None:
    file = _write(tmp_path, "c.json", file_text) if file_text is not None else None
    with pytest.raises(SettingsError) as raised:
        resolve(settings.SERVE, flags, env, file)
    assert message in str(raised.value)


def test_serve_only_settings_are_unknown_to_up(tmp_path: Path) -> None:
    file = _write(tmp_path, "c.toml", '[registry]\nurl = "redis://x:6379/0"\n')
    with pytest.raises(SettingsError, match="unknown settings"):
        resolve(settings.UP, {}, {}, file)
    assert "registry.url" not in resolve(settings.UP, {}, {})


def test_build_makes_the_config_objects(tmp_path: Path) -> None:
    env = {"PERSONALIZE_API_KEYS": "acme:k1,globex:k2", "PERSONALIZE_MAX_RANK": "8", "PERSONALIZE_RATE": "5"}
    values = resolve(
        settings.SERVE,
        {
            "registry_url": "redis://r:6379/0",
            "max_batch": "4",
            "namespace": "acme-prod",
            "bucket_bits": "12",
            "registry_cluster": "true",
        },
        env,
    )
    resolved = build(values)
    assert resolved.config.registry == RegistryConfig("redis://r:6379/0", "acme-prod", 12, cluster=True)
    assert resolved.config.feedback.namespace == "acme-prod"  # one namespace for registry and stream
    assert resolved.config.lora.r_max == 8
    assert resolved.config.engine.max_batch == 4 and resolved.service.limits.requests_per_second == 5.0
    assert resolved.service.api_keys.tenants == ("acme", "globex")


def test_api_keys_from_a_file_or_inline_but_not_both(tmp_path: Path) -> None:
    keys = _write(tmp_path, "keys", "# tenants\nacme:k1\n")
    assert build(resolve(settings.UP, {"api_keys_file": keys}, {})).service.api_keys.tenants == ("acme",)
    with pytest.raises(SettingsError, match="use one"):
        build(resolve(settings.UP, {"api_keys_file": keys}, {"PERSONALIZE_API_KEYS": "b:k2"}))


def test_operator_keys_come_from_their_own_setting() -> None:
    env = {"PERSONALIZE_API_KEYS": "acme:k1", "PERSONALIZE_OPERATOR_KEYS": "op1,op2"}
    keys = build(resolve(settings.UP, {}, env)).service.api_keys
    assert keys.authorize_operator("op2") == "(operator)" and keys.tenants == ("acme",)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"dtype": "int8"}, "dtype"),
        ({"max_rank": "0"}, "r_max"),
        ({"port": "70000"}, "ports"),
        ({"grace_s": "-1"}, "grace_s"),
    ],
)
def test_the_library_checks_the_built_values(flags: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        build(resolve(settings.UP, flags, {}))


@pytest.mark.parametrize(
    ("flags", "env", "file_text", "expected"),
    [
        ({}, {}, None, False),
        ({"degrade_to_base": "true"}, {}, None, True),
        ({}, {"PERSONALIZE_DEGRADE_TO_BASE": "yes"}, None, True),
        ({"degrade_to_base": "off"}, {"PERSONALIZE_DEGRADE_TO_BASE": "1"}, None, False),
        ({}, {}, '{"degrade_to_base": true}', True),
    ],
)
def test_degrade_to_base_is_a_boolean_setting(
    tmp_path: Path, flags: dict[str, str], env: dict[str, str], file_text: str | None, expected: bool
) -> None:
    file = _write(tmp_path, "c.json", file_text) if file_text is not None else None
    assert build(resolve(settings.UP, flags, env, file)).config.degrade_to_base is expected


def test_a_malformed_boolean_names_its_source() -> None:
    with pytest.raises(SettingsError, match="--degrade-to-base: 'maybe' is not a boolean"):
        resolve(settings.UP, {"degrade_to_base": "maybe"}, {})
