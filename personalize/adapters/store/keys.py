"""Pure object-key helpers: where a user's adapter versions live in any store.

A user id never becomes part of a path. Keys derive from a hash of the length-prefixed
(tenant, user_id) pair, so hostile ids (`../../etc`, NUL, 10 KB strings, emoji) all give a
fixed-shape key, and no two (tenant, user_id) pairs share a prefix (up to a 128-bit collision).
"""

from __future__ import annotations

import hashlib
import re

from personalize.errors import InvalidArgument

ADAPTERS_ROOT = "adapters/"
MAX_VERSION = 10**12 - 1
"""Largest version a key can name (the key holds 12 decimal digits)."""

_KEY_RE = re.compile(r"^adapters/([0-9a-f]{32})/v(\d{12})(?:-[0-9a-f]{16})?\.safetensors$")
_EXAMPLES_RE = re.compile(r"^adapters/([0-9a-f]{32})/v(\d{12})-[0-9a-f]{16}\.examples\.json$")
_CHECKSUM_RE = re.compile(r"^sha256:([0-9a-f]{64})$")


def _encode(name: str, value: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a str, got {type(value).__name__}")
    # surrogatepass keeps the encoding injective over every Python str, lone surrogates included.
    return value.encode("utf-8", "surrogatepass")


def user_digest(tenant: str, user_id: str) -> bytes:
    """sha256 over len(tenant) (8 bytes, big-endian) + tenant + user_id, all UTF-8; 32 raw bytes.

    The length prefix makes the pair unambiguous: ("ab", "c") and ("a", "bc") hash differently.
    The registry and the store both derive a user's identity from this digest.
    """
    t = _encode("tenant", tenant)
    u = _encode("user_id", user_id)
    return hashlib.sha256(len(t).to_bytes(8, "big") + t + u).digest()


def user_prefix(tenant: str, user_id: str) -> str:
    """`adapters/<32 hex>/`: the folder holding every adapter version of one user."""
    return ADAPTERS_ROOT + user_digest(tenant, user_id)[:16].hex() + "/"


def adapter_key(tenant: str, user_id: str, version: int, checksum: str = "") -> str:
    """`adapters/<32 hex>/v<12 digits>[-<16 hex>].safetensors`: the immutable object of one version.

    With the object's checksum in the name, two writers racing for the same version (two trainers) write
    different objects, so the loser of the registry CAS can never overwrite the winner's bytes.
    """
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise InvalidArgument(f"adapter version must be an int in [1, {MAX_VERSION}], got {version!r}")
    tag = f"-{_tag(checksum)}" if checksum else ""
    return f"{user_prefix(tenant, user_id)}v{version:012d}{tag}.safetensors"


def examples_key(tenant: str, user_id: str, version: int, checksum: str) -> str:
    """`adapters/<32 hex>/v<12 digits>-<16 hex>.examples.json`: the version's training record (the event ids it
    was trained on and the user's examples kept for rehearsal), a separate object so that exports carry none of
    the user's text; named by its own checksum like the adapter object."""
    adapter_key(tenant, user_id, version)  # the same checks of the version
    return f"{user_prefix(tenant, user_id)}v{version:012d}-{_tag(checksum)}.examples.json"


def _tag(checksum: str) -> str:
    match = _CHECKSUM_RE.match(checksum)
    if match is None:
        raise InvalidArgument(f"checksum must be 'sha256:<64 hex>', got {checksum!r:.80}")
    return match.group(1)[:16]


def adapter_version(key: str) -> int | None:
    """The version an adapter key names, or None when `key` is not an adapter key."""
    match = _KEY_RE.match(key)
    return int(match.group(2)) if match else None


def examples_version(key: str) -> int | None:
    """The version an examples key names, or None when `key` is not an examples key."""
    match = _EXAMPLES_RE.match(key)
    return int(match.group(2)) if match else None
