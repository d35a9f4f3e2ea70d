"""Object stores for adapter versions: `open_store(url)` picks the backend by URL scheme.

file:///abs/path                         FileStore (local disk, NFS)
s3://bucket/prefix?endpoint=host:port    S3Store (MinIO, SeaweedFS, AWS S3)
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from personalize.adapters.store.base import ObjectStore, checksum_of
from personalize.adapters.store.file import FileStore
from personalize.adapters.store.keys import adapter_key, adapter_version, user_digest, user_prefix
from personalize.adapters.store.s3 import S3Config, S3Store
from personalize.errors import InvalidArgument

__all__ = [
    "FileStore",
    "ObjectStore",
    "S3Config",
    "S3Store",
    "adapter_key",
    "adapter_version",
    "checksum_of",
    "open_store",
    "user_digest",
    "user_prefix",
]


def open_store(url: str) -> ObjectStore:
    """The store a URL names; InvalidArgument for an unknown scheme or a malformed URL.

    Opening connects to nothing: the first operation does (an S3 bucket is created then if missing).
    """
    scheme = urlsplit(url).scheme if isinstance(url, str) else ""
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or not parts.path.startswith("/"):
            raise InvalidArgument(f"file store URL must be file:///absolute/path, got {url!r}")
        return FileStore(unquote(parts.path))
    if scheme == "s3":
        return S3Store(S3Config.from_url(url))
    raise InvalidArgument(
        f"unknown object store URL {url!r:.100}: use file:///abs/path or s3://bucket/prefix?endpoint=host:port"
    )
