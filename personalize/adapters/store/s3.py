"""`s3://bucket/optional/prefix?endpoint=host:port&secure=false`: objects in any S3 API (MinIO,
SeaweedFS, AWS S3) through the `minio` client.

Credentials come from the URL query (`access_key`, `secret_key`) or the environment
(`PERSONALIZE_S3_ACCESS_KEY`, `PERSONALIZE_S3_SECRET_KEY`); none means anonymous requests.
"""

from __future__ import annotations

import functools
import io
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

import certifi
import urllib3
from minio import Minio
from minio.deleteobjects import DeleteObject
from minio.error import MinioException, S3Error

from personalize.adapters.store.base import (
    ObjectStore,
    check_checksum,
    check_key,
    check_prefix,
    checksum_of,
    verify,
)
from personalize.errors import CorruptObject, InvalidArgument, NotFound, Unavailable

T = TypeVar("T")

CHECKSUM_HEADER = "x-amz-meta-checksum"
_QUERY_KEYS = {"endpoint", "secure", "access_key", "secret_key", "region"}
_MISSING = {"NoSuchKey", "NoSuchBucket", "NoSuchObject"}
_DELETE_BATCH = 1000  # the most keys one S3 DeleteObjects request may name


@dataclass(frozen=True)
class S3Config:
    """Where an S3 store lives and how to sign requests to it."""

    bucket: str
    """Bucket name; created on first use when missing."""
    prefix: str = ""
    """Prepended to every key inside the bucket: "" or ending in '/'."""
    endpoint: str = "s3.amazonaws.com"
    """host:port of the S3 API."""
    secure: bool = True
    """HTTPS (true) or plain HTTP (false, loopback and tests only)."""
    access_key: str | None = None
    """Access key id; None = anonymous."""
    secret_key: str | None = field(default=None, repr=False)
    """Secret key; never logged."""
    region: str | None = None
    """Bucket region; None lets the client ask the server."""
    timeout_s: float = 30.0
    """Read timeout of one request, seconds (connecting gets min(5, this))."""

    def __post_init__(self) -> None:
        if not self.bucket:
            raise InvalidArgument("s3 store needs a bucket: s3://BUCKET/optional/prefix")
        if self.prefix and (not self.prefix.endswith("/") or check_prefix(self.prefix) != self.prefix):
            raise InvalidArgument(f"s3 key prefix must be '/'-joined segments ending in '/', got {self.prefix!r}")
        if (self.access_key is None) != (self.secret_key is None):
            raise InvalidArgument("s3 store needs both access_key and secret_key, or neither")
        if self.timeout_s <= 0:
            raise InvalidArgument(f"timeout_s must be > 0, got {self.timeout_s}")

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str] | None = None) -> S3Config:
        """Parse `s3://bucket/prefix?endpoint=...&secure=...&access_key=...&secret_key=...&region=...`."""
        env = os.environ if env is None else env
        parts = urlsplit(url)
        if parts.scheme != "s3":
            raise InvalidArgument(f"not an s3:// URL: {redact_url(url)!r}")
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        unknown = set(query) - _QUERY_KEYS
        if unknown:
            raise InvalidArgument(f"unknown s3 URL parameter(s) {sorted(unknown)}; known: {sorted(_QUERY_KEYS)}")
        secure = query.get("secure", "true").lower()
        if secure not in ("true", "false", "1", "0", "yes", "no"):
            raise InvalidArgument(f"s3 URL parameter secure must be true or false, got {secure!r}")
        prefix = parts.path.strip("/")
        return cls(
            bucket=parts.netloc,
            prefix=prefix + "/" if prefix else "",
            endpoint=query.get("endpoint", "s3.amazonaws.com"),
            secure=secure in ("true", "1", "yes"),
            access_key=query.get("access_key") or env.get("PERSONALIZE_S3_ACCESS_KEY") or None,
            secret_key=query.get("secret_key") or env.get("PERSONALIZE_S3_SECRET_KEY") or None,
            region=query.get("region") or None,
        )

    def url(self) -> str:
        """The URL of this store without credentials (safe to log)."""
        query = {"endpoint": self.endpoint, "secure": str(self.secure).lower()}
        if self.region:
            query["region"] = self.region
        return f"s3://{self.bucket}/{self.prefix}?{urlencode(query, safe=':')}"


class S3Store(ObjectStore):
    """Objects in one bucket under an optional prefix. Every object carries its sha256 checksum as
    metadata, verified on every get, so bytes changed behind the store's back are never returned."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(5.0, config.timeout_s), read=config.timeout_s),
            maxsize=16,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            # A couple of quick retries only: a dead endpoint must surface as Unavailable fast.
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        try:
            self._client = Minio(
                config.endpoint,
                access_key=config.access_key,
                secret_key=config.secret_key,
                secure=config.secure,
                region=config.region,
                http_client=http,
            )
        except ValueError as exc:
            raise InvalidArgument(f"bad s3 store settings for {config.url()}: {exc}") from exc
        self._bucket_ready = False
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.config.url()

    def put(self, key: str, data: bytes) -> str:
        name = self._name(key)
        checksum = checksum_of(data)
        self._ensure_bucket()
        self._call(
            key,
            lambda: self._client.put_object(
                self.config.bucket,
                name,
                io.BytesIO(data),
                len(data),
                content_type="application/octet-stream",
                metadata={CHECKSUM_HEADER: checksum},
            ),
        )
        return checksum

    def get(self, key: str, checksum: str | None = None) -> bytes:
        name = self._name(key)
        if checksum is not None:
            check_checksum(checksum)

        def fetch() -> tuple[bytes, str | None]:
            response = self._client.get_object(self.config.bucket, name)
            try:
                return response.read(), response.headers.get(CHECKSUM_HEADER)
            finally:
                response.close()
                response.release_conn()

        data, stored = self._call(key, fetch)
        if stored is not None:
            if stored != checksum_of(data):
                raise CorruptObject(f"object {key!r} is corrupt: its bytes do not match its stored checksum")
            if checksum is not None and stored != checksum:
                raise CorruptObject(f"object {key!r} is corrupt: expected {checksum}, it holds {stored}")
        return verify(key, data, checksum)

    def exists(self, key: str) -> bool:
        name = self._name(key)
        try:
            self._call(key, lambda: self._client.stat_object(self.config.bucket, name))
        except NotFound:
            return False
        return True

    def delete(self, key: str) -> bool:
        if not self.exists(key):  # S3 deletes are silent about absence; ask first
            return False
        name = self._name(key)
        self._call(key, lambda: self._client.remove_object(self.config.bucket, name))
        return True

    def delete_prefix(self, prefix: str) -> int:
        if check_prefix(prefix) == "":
            raise InvalidArgument("refusing delete_prefix(''): it would remove every object in the store")
        keys = self.list(prefix)

        def remove(batch: list[DeleteObject]) -> list:
            # remove_objects is lazy: the requests run while its error iterator is consumed.
            return list(self._client.remove_objects(self.config.bucket, batch))

        for start in range(0, len(keys), _DELETE_BATCH):
            batch = [DeleteObject(self.config.prefix + k) for k in keys[start : start + _DELETE_BATCH]]
            errors = self._call(prefix, functools.partial(remove, batch))
            if errors:
                raise Unavailable(f"s3 could not delete {len(errors)} object(s) under {prefix!r}: {errors[0]}")
        return len(keys)

    def list(self, prefix: str) -> list[str]:
        full = self.config.prefix + check_prefix(prefix)
        skip = len(self.config.prefix)

        def names() -> list[str]:
            found: Iterator = self._client.list_objects(self.config.bucket, prefix=full, recursive=True)
            return [o.object_name for o in found if o.object_name and not o.is_dir]

        try:
            listed = self._call(prefix, names)
        except NotFound:  # no bucket yet: nothing stored
            return []
        return sorted(n[skip:] for n in listed if _is_key(n[skip:]))

    def close(self) -> None:
        self._client._http.clear()

    def _name(self, key: str) -> str:
        return self.config.prefix + check_key(key)

    def _ensure_bucket(self) -> None:
        """Create the bucket once per store if it is missing (another writer may race us to it)."""
        if self._bucket_ready:
            return
        with self._lock:
            if self._bucket_ready:
                return
            bucket = self.config.bucket
            if not self._call(bucket, lambda: self._client.bucket_exists(bucket)):
                try:
                    self._call(bucket, lambda: self._client.make_bucket(bucket, location=self.config.region))
                except Unavailable as exc:
                    if not isinstance(exc.__cause__, S3Error) or exc.__cause__.code not in (
                        "BucketAlreadyOwnedByYou",
                        "BucketAlreadyExists",
                    ):
                        raise
            self._bucket_ready = True

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one client call, mapping its failures to domain errors about `what`."""
        try:
            return fn()
        except S3Error as exc:
            if exc.code in _MISSING:
                raise NotFound(f"object {what!r} not found in {self.url}") from exc
            raise Unavailable(f"s3 {self.url} refused a request for {what!r}: {exc.code}: {exc.message}") from exc
        except ValueError as exc:  # the client validates names and arguments before sending
            raise InvalidArgument(f"s3 {self.url} rejected {what!r}: {exc}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise Unavailable(f"s3 {self.url} is unreachable ({type(exc).__name__}: {exc})") from exc


def _is_key(name: str) -> bool:
    try:
        check_key(name)
    except InvalidArgument:
        return False
    return True


def redact_url(url: str) -> str:
    """`url` with its secret_key query value masked (for logs and banners)."""
    parts = urlsplit(url)
    query = {k: ("***" if k == "secret_key" else v[-1]) for k, v in parse_qs(parts.query).items()}
    return parts._replace(query=urlencode(query)).geturl()
