"""API keys -> tenants.

Keys are configured as `tenant:key` entries (env `PERSONALIZE_API_KEYS="tenantA:keyA,tenantB:keyB"` or a
file with one entry per line). Only the SHA-256 of each key is kept in memory, and a presented key is
compared against every stored digest with `hmac.compare_digest`, so neither the keys nor their order
leak through timing. With no keys configured the server has one tenant, `default`, and needs no key.

Operator keys (env `PERSONALIZE_OPERATOR_KEYS="key1,key2"`) are separate: only they may call the Admin API
(`Stats`, `ListNodes`); a tenant's key there is PERMISSION_DENIED. With neither kind configured nobody needs
a key, for the Admin API too.

Handlers read the caller's tenant with `current_tenant()`; `AuthInterceptor` (service/server/interceptors.py)
sets it for the duration of each call.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from personalize.errors import InvalidArgument, PermissionDenied, Unauthenticated

DEFAULT_TENANT = "default"
OPERATOR = "(operator)"
"""The `current_tenant()` of a call made with an operator key (not a valid tenant name, so never a tenant's)."""
ENV_VAR = "PERSONALIZE_API_KEYS"
OPERATOR_ENV_VAR = "PERSONALIZE_OPERATOR_KEYS"
METADATA_KEY = "authorization"
_TENANT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("personalize_tenant")


def current_tenant() -> str:
    """The tenant of the call being handled.

    Raises RuntimeError outside a call that went through AuthInterceptor: a wiring bug, never a
    reason to fall back to some tenant.
    """
    try:
        return _tenant.get()
    except LookupError:
        raise RuntimeError("no tenant: this handler is not behind AuthInterceptor") from None


def tenant_context(tenant: str) -> contextvars.Context:
    """A copy of the current context in which `current_tenant()` is `tenant` (run the call in it)."""
    context = contextvars.copy_context()
    context.run(_tenant.set, tenant)
    return context


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys, hashed. Empty = no authentication, every caller is tenant `default`."""

    entries: tuple[tuple[bytes, str], ...] = field(default=(), repr=False)
    """(sha256 of key, tenant) pairs."""
    operators: tuple[bytes, ...] = field(default=(), repr=False)
    """sha256 of each operator key (the Admin API's)."""

    @classmethod
    def from_mapping(cls, keys: Mapping[str, str]) -> ApiKeys:
        """From tenant -> key. Raises InvalidArgument on a bad tenant name, an empty or shared key."""
        entries: list[tuple[bytes, str]] = []
        for tenant, key in keys.items():
            if not _TENANT_RE.fullmatch(tenant):
                raise InvalidArgument(f"tenant name {tenant!r} must be 1-64 characters of [A-Za-z0-9._-]")
            if not key or key != key.strip():
                raise InvalidArgument(f"API key of tenant {tenant!r} is empty or has surrounding spaces")
            entries.append((_digest(key), tenant))
        digests = [d for d, _ in entries]
        if len(set(digests)) != len(digests):
            raise InvalidArgument("two tenants share one API key; each tenant needs its own")
        return cls(tuple(entries))

    @classmethod
    def parse(cls, text: str) -> ApiKeys:
        """From `tenant:key` entries separated by commas or newlines; `#` starts a comment line.

        A key may contain `:` (the first one separates the tenant); it may not contain `,`.
        """
        keys: dict[str, str] = {}
        for raw in re.split(r"[,\n]", text):
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            tenant, sep, key = entry.partition(":")
            if not sep:
                raise InvalidArgument(f"API key entry {_redact(entry)!r} is not of the form tenant:key")
            tenant, key = tenant.strip(), key.strip()
            if tenant in keys:
                raise InvalidArgument(f"tenant {tenant!r} is configured twice")
            keys[tenant] = key
        return cls.from_mapping(keys)

    def with_operator_keys(self, text: str) -> ApiKeys:
        """These keys plus operator keys from `text` (comma- or newline-separated; `#` starts a comment line).

        Raises InvalidArgument if an operator key is also a tenant's key.
        """
        keys = [k.strip() for k in re.split(r"[,\n]", text) if k.strip() and not k.strip().startswith("#")]
        digests = tuple(dict.fromkeys(_digest(k) for k in keys))
        if set(digests) & {d for d, _ in self.entries}:
            raise InvalidArgument("an operator key is also a tenant's API key; give operators keys of their own")
        return dataclasses.replace(self, operators=digests)

    @property
    def enabled(self) -> bool:
        """True if keys are required (at least one configured)."""
        return bool(self.entries)

    @property
    def tenants(self) -> tuple[str, ...]:
        return tuple(t for _, t in self.entries) if self.entries else (DEFAULT_TENANT,)

    def authenticate(self, key: str | None) -> str:
        """The tenant of `key`. Raises Unauthenticated on a missing or unknown key (keys enabled)."""
        if not self.entries:
            return DEFAULT_TENANT
        if not key:
            raise Unauthenticated(f"missing API key: send metadata '{METADATA_KEY}: Bearer <key>'")
        presented = _digest(key)
        found: str | None = None
        for digest, tenant in self.entries:  # no early exit: time does not depend on which key matched
            if hmac.compare_digest(presented, digest):
                found = tenant
        if found is None:
            raise Unauthenticated("unknown API key")
        return found

    def authorize_operator(self, key: str | None) -> str:
        """OPERATOR for an operator key; DEFAULT_TENANT when no key of either kind is configured.

        Raises PermissionDenied for a tenant's key, Unauthenticated for a missing or unknown one.
        """
        if not self.entries and not self.operators:
            return DEFAULT_TENANT
        if not key:
            raise Unauthenticated(
                f"the Admin API needs an operator key: send metadata '{METADATA_KEY}: Bearer <operator key>'"
            )
        presented = _digest(key)
        if _matches(presented, self.operators):
            return OPERATOR
        if _matches(presented, [d for d, _ in self.entries]):
            raise PermissionDenied(
                "the Admin API needs an operator key (service.operator_keys); a tenant's API key may not call it"
            )
        raise Unauthenticated("unknown operator key")

    def tenant_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The tenant selected by a call's `authorization: Bearer <key>` metadata (see authenticate)."""
        return self.authenticate(bearer_key(metadata))


def _matches(presented: bytes, digests: Iterable[bytes]) -> bool:
    """Whether `presented` is one of `digests`, compared with all of them (time independent of which)."""
    found = False
    for digest in digests:
        found |= hmac.compare_digest(presented, digest)
    return found


def bearer_key(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The key of the first `authorization` entry, None if absent.

    Raises Unauthenticated if the entry is present but not `Bearer <key>` (scheme case-insensitive).
    """
    for name, value in metadata or ():
        if name.lower() != METADATA_KEY:
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, key = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated(f"'{METADATA_KEY}' metadata must be 'Bearer <key>'")
        return key.strip()
    return None


def load_api_keys(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> ApiKeys:
    """Keys from the file at `path` if given, else from env PERSONALIZE_API_KEYS, else none (no auth)."""
    if path is not None:
        return ApiKeys.parse(Path(path).read_text(encoding="utf-8"))
    env = os.environ if environ is None else environ
    return ApiKeys.parse(env.get(ENV_VAR, ""))


def _redact(entry: str) -> str:
    """An entry with its tail masked so a malformed key never lands in a log whole."""
    return entry[:4] + "…" if len(entry) > 4 else "…"
