"""The object store interface every backend implements, plus checks shared by backends.

Objects are immutable, whole-object puts under keys made by `keys.py`. A key is one or more
segments joined by `/`; a segment is `[A-Za-z0-9_-][A-Za-z0-9._-]*`, so `.`/`..` and hidden
names can never be keys (backends keep their temporary files under hidden names).
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import re

from personalize.errors import CorruptObject, InvalidArgument

MAX_KEY_LENGTH = 1024

_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}"
_KEY_RE = re.compile(rf"^{_SEGMENT}(?:/{_SEGMENT})*$")
_PREFIX_RE = re.compile(rf"^(?:{_SEGMENT}/)*(?:{_SEGMENT})?$")
_CHECKSUM_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def checksum_of(data: bytes) -> str:
    """`sha256:<64 lowercase hex>` of `data`."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_checksum(checksum: str) -> str:
    """Return `checksum` if it is `sha256:<64 lowercase hex>`, else raise InvalidArgument."""
    if not isinstance(checksum, str) or not _CHECKSUM_RE.match(checksum):
        raise InvalidArgument(f"checksum must look like 'sha256:<64 hex>', got {checksum!r:.80}")
    return checksum


def verify(key: str, data: bytes, checksum: str | None) -> bytes:
    """Return `data` if it matches `checksum` (None = nothing to check), else raise CorruptObject."""
    if checksum is None:
        return data
    actual = checksum_of(data)
    if not hmac.compare_digest(actual, check_checksum(checksum)):
        raise CorruptObject(f"object {key!r} is corrupt: expected {checksum}, stored bytes hash to {actual}")
    return data


def check_key(key: str) -> str:
    """Return `key` if it is a valid object key, else raise InvalidArgument."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY_RE.match(key):
        raise InvalidArgument(
            f"invalid object key {key!r:.120}: use '/'-joined segments of [A-Za-z0-9._-] not starting with '.'"
        )
    return key


def check_prefix(prefix: str) -> str:
    """Return `prefix` if some valid key could start with it ("" = every key), else raise InvalidArgument."""
    if not isinstance(prefix, str) or len(prefix) > MAX_KEY_LENGTH or not _PREFIX_RE.match(prefix):
        raise InvalidArgument(f"invalid key prefix {prefix!r:.120}")
    return prefix


class ObjectStore(abc.ABC):
    """Immutable blobs by key. Every method raises `Unavailable` when the storage cannot be reached
    and `InvalidArgument` for a malformed key; implementations are safe to share between threads."""

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The store's URL, with any secret removed (safe to log)."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> str:
        """Write `data` under `key` as one whole object (readers see all of it or the old one).

        Returns its checksum `sha256:<hex>`."""

    @abc.abstractmethod
    def get(self, key: str, checksum: str | None = None) -> bytes:
        """The bytes under `key`. Raises NotFound naming the key when absent, and CorruptObject
        naming the key when `checksum` is given and does not match (the bytes are never returned)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under `key`."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the object under `key`; True if there was one."""

    @abc.abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Every key starting with `prefix` (a plain string prefix), sorted."""

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object whose key starts with `prefix` (never "": that would be everything);
        returns how many were removed."""
        if check_prefix(prefix) == "":
            raise InvalidArgument("refusing delete_prefix(''): it would remove every object in the store")
        return sum(1 for key in self.list(prefix) if self.delete(key))

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections; the store is unusable afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
