"""API keys -> tenants: parsing, hashing at rest, Bearer metadata."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from personalize.errors import InvalidArgument, Unauthenticated
from personalize_service.server.auth import ApiKeys, bearer_key, current_tenant, load_api_keys, tenant_context


def test_parse_maps_keys_to_tenants() -> None:
    keys = ApiKeys.parse(" tenantA:keyA , tenantB:key:with:colons\n# comment\n\ntenant_c:kc ")
    assert keys.enabled and keys.tenants == ("tenantA", "tenantB", "tenant_c")
    assert keys.authenticate("keyA") == "tenantA"
    assert keys.authenticate("key:with:colons") == "tenantB"
    assert keys.authenticate("kc") == "tenant_c"


def test_keys_are_kept_only_as_sha256() -> None:
    keys = ApiKeys.from_mapping({"acme": "sk-secret-1"})
    assert keys.entries == ((hashlib.sha256(b"sk-secret-1").digest(), "acme"),)
    assert "sk-secret-1" not in repr(keys)


@pytest.mark.parametrize(
    ("key", "message"),
    [(None, "missing API key"), ("", "missing API key"), ("keyB", "unknown API key"), ("keya", "unknown API key")],
)
def test_missing_or_unknown_key_is_unauthenticated(key: str | None, message: str) -> None:
    with pytest.raises(Unauthenticated, match=message):
        ApiKeys.parse("tenantA:keyA").authenticate(key)


def test_no_keys_means_one_default_tenant() -> None:
    for keys in (ApiKeys(), ApiKeys.parse(""), ApiKeys.parse("  \n# nothing\n")):
        assert not keys.enabled and keys.tenants == ("default",)
        assert keys.authenticate(None) == "default" and keys.authenticate("whatever") == "default"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tenantA", "not of the form tenant:key"),
        ("tenantA:", "empty"),
        ("bad tenant:k", "tenant name"),
        (":k", "tenant name"),
        ("a:k1,a:k2", "configured twice"),
        ("a:same,b:same", "share one API key"),
    ],
)
def test_bad_key_config_is_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        ApiKeys.parse(text)


def test_malformed_entry_does_not_echo_the_key() -> None:
    with pytest.raises(InvalidArgument) as raised:
        ApiKeys.parse("sk-0123456789-secret")
    assert "secret" not in str(raised.value)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (None, None),
        ((), None),
        ((("x-user-id", "u"),), None),
        ((("authorization", "Bearer k1"),), "k1"),
        ((("authorization", "bearer   k1 "),), "k1"),
        ((("authorization", b"Bearer k2"),), "k2"),
    ],
)
def test_bearer_key(metadata: tuple[tuple[str, str | bytes], ...] | None, expected: str | None) -> None:
    assert bearer_key(metadata) == expected


@pytest.mark.parametrize("value", ["k1", "Basic k1", "Bearer", "Bearer  "])
def test_malformed_authorization_is_unauthenticated(value: str) -> None:
    with pytest.raises(Unauthenticated, match="Bearer <key>"):
        bearer_key((("authorization", value),))


def test_load_from_env_or_file(tmp_path: Path) -> None:
    assert load_api_keys(environ={"PERSONALIZE_API_KEYS": "a:ka,b:kb"}).tenants == ("a", "b")
    assert not load_api_keys(environ={}).enabled
    path = tmp_path / "keys"
    path.write_text("# tenant:key per line\nfile-tenant:kf\n")
    assert load_api_keys(path, environ={"PERSONALIZE_API_KEYS": "a:ka"}).tenants == ("file-tenant",)


def test_current_tenant_only_inside_a_tenant_context() -> None:
    with pytest.raises(RuntimeError, match="not behind AuthInterceptor"):
        current_tenant()
    assert tenant_context("acme").run(current_tenant) == "acme"
    with pytest.raises(RuntimeError):
        current_tenant()  # the tenant never leaks out of its call
