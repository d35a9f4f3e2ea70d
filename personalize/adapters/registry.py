"""The registry: per user, which adapter version is current, and its metadata. Redis protocol
(Valkey, Redis, Redis Cluster); every update is a compare-and-set on the version.

Layout (compact: a few dozen bytes per user where one hash per user with named fields costs several
hundred; loadtest/bench_registry.py measures it, docs/benchmarks.md has the figures):

    {ns}:a:{bucket}   hash  field = 16-byte user hash -> 63-byte packed AdapterRecord
    {ns}:meta         hash  bucket_bits, fingerprint <-> 2-byte id table

A user's 128-bit hash (the same one that names their folder in the object store) picks a bucket
from its top `bucket_bits` bits; buckets stay small so the server keeps them as listpacks. That
needs `hash-max-listpack-value >= 64` (the default) and `hash-max-listpack-entries` well above
users / 2**bucket_bits (embedded default 512; stock servers have 128, enough for ~5M users at 16
bits). Every command touches one key, so the layout works unchanged on Redis Cluster.
"""

from __future__ import annotations

import functools
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import redis
import redis.cluster

from personalize import valkey
from personalize.adapters.store.base import check_checksum
from personalize.adapters.store.keys import user_digest
from personalize.errors import Conflict, CorruptObject, InvalidArgument

T = TypeVar("T")

DEFAULT_BUCKET_BITS = 16
_U32 = 2**32
_U48 = 2**48
_MAX_FINGERPRINTS = 2**16 - 1
_FORMAT = 1
# tag, version, rank, fingerprint id, examples_seen, updated_at_ms, event ms, event seq, sha256
_RECORD = struct.Struct("<BIHH6s6s6sI32s")
_EVENT_ID_RE = re.compile(r"^(\d{1,15})-(\d{1,10})$")
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_BATCH = 1000  # commands per pipeline round trip in bulk writes

# KEYS[1] bucket; ARGV: field, expected version, new version, packed record. Returns {ok, stored}.
_CAS_LUA = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local v = 0
if cur then
  if string.byte(cur, 1) ~= 1 then return redis.error_reply('ERR unknown adapter record format') end
  local b1, b2, b3, b4 = string.byte(cur, 2, 5)
  v = b1 + b2 * 256 + b3 * 65536 + b4 * 16777216
end
if v ~= tonumber(ARGV[2]) or tonumber(ARGV[3]) <= v then return {0, v} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
return {1, v}
"""

# KEYS[1] bucket; ARGV[1] field. Returns the removed packed record or nil.
_DELETE_LUA = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then redis.call('HDEL', KEYS[1], ARGV[1]) end
return cur
"""

# KEYS[1] meta; ARGV[1] fingerprint, ARGV[2] most ids. Returns its id, assigning the next on first sight.
_INTERN_LUA = """
local id = redis.call('HGET', KEYS[1], 'fp:' .. ARGV[1])
if id then return tonumber(id) end
id = redis.call('HINCRBY', KEYS[1], 'fp_next', 1)
if id > tonumber(ARGV[2]) then return redis.error_reply('ERR fingerprint table full') end
redis.call('HSET', KEYS[1], 'fp:' .. ARGV[1], id, 'id:' .. id, ARGV[1])
return id
"""


@dataclass(frozen=True)
class AdapterRecord:
    """One user's current adapter. Its object key is `adapter_key(tenant, user_id, version, checksum)`."""

    version: int
    """1..2**32-1, increasing per user; 0 means "no adapter" and is never stored."""
    rank: int
    """LoRA rank, 1..65535."""
    fingerprint: str
    """Base-model fingerprint the adapter was trained on."""
    examples_seen: int
    """Training examples applied so far, 0..2**48-1."""
    last_event_id: str
    """Redis stream id of the last applied feedback event ("1700000000000-0"), or "" for none."""
    updated_at_ms: int
    """Unix time of the update, milliseconds, 0..2**48-1."""
    checksum: str
    """`sha256:<64 hex>` of the adapter object."""

    def __post_init__(self) -> None:
        _check_int("version", self.version, 1, _U32)
        _check_int("rank", self.rank, 1, 2**16)
        _check_int("examples_seen", self.examples_seen, 0, _U48)
        _check_int("updated_at_ms", self.updated_at_ms, 0, _U48)
        if not isinstance(self.fingerprint, str) or not 0 < len(self.fingerprint) <= 256:
            raise InvalidArgument(f"fingerprint must be a non-empty str of <= 256 chars, got {self.fingerprint!r:.80}")
        _parse_event_id(self.last_event_id)
        check_checksum(self.checksum)


class CasUpdate(NamedTuple):
    """One compare-and-set of a bulk write."""

    tenant: str
    user_id: str
    expected_version: int
    record: AdapterRecord


@dataclass(frozen=True)
class RegistryConfig:
    """Where the registry lives."""

    url: str = ""
    """redis:// or rediss:// URL of a Valkey/Redis server, or redis+cluster:// / rediss+cluster:// naming a
    seed node of a Redis Cluster; empty = not set yet (`personalize up` sets it to its embedded Valkey)."""
    namespace: str = "pz"
    """Prefix of every key, so several deployments can share one server."""
    bucket_bits: int = DEFAULT_BUCKET_BITS
    """Users are spread over 2**bucket_bits hashes; fixed for the life of a namespace."""
    cluster: bool = False
    """Talk Redis Cluster protocol (set by a redis+cluster:// URL)."""

    def __post_init__(self) -> None:
        if valkey.is_cluster_url(self.url):
            object.__setattr__(self, "cluster", True)
        _check_namespace(self.namespace)
        _check_bucket_bits(self.bucket_bits)


def pack_record(record: AdapterRecord, fingerprint_id: int) -> bytes:
    """The 63-byte stored form of `record`, its fingerprint replaced by `fingerprint_id`."""
    ms, seq = _parse_event_id(record.last_event_id)
    return _RECORD.pack(
        _FORMAT,
        record.version,
        record.rank,
        fingerprint_id,
        record.examples_seen.to_bytes(6, "little"),
        record.updated_at_ms.to_bytes(6, "little"),
        ms.to_bytes(6, "little"),
        seq,
        bytes.fromhex(record.checksum[7:]),
    )


def unpack_record(raw: bytes, fingerprint_of: Callable[[int], str]) -> AdapterRecord:
    """Inverse of pack_record; `fingerprint_of` maps the stored id back to the fingerprint."""
    if len(raw) != _RECORD.size or raw[0] != _FORMAT:
        raise CorruptObject(f"registry record of {len(raw)} bytes has an unknown format")
    _, version, rank, fp_id, examples, updated, ms, seq, digest = _RECORD.unpack(raw)
    ms_int = int.from_bytes(ms, "little")
    return AdapterRecord(
        version=version,
        rank=rank,
        fingerprint=fingerprint_of(fp_id),
        examples_seen=int.from_bytes(examples, "little"),
        last_event_id=f"{ms_int}-{seq}" if ms_int or seq else "",
        updated_at_ms=int.from_bytes(updated, "little"),
        checksum="sha256:" + digest.hex(),
    )


class Registry:
    """User -> current AdapterRecord, over a `redis.Redis` or `redis.cluster.RedisCluster` client
    (with decode_responses off). Thread-safe; a `get` is one round trip once the fingerprint is known.
    Every method raises Unavailable when the server cannot be reached."""

    def __init__(self, client: Any, namespace: str = "pz", bucket_bits: int = DEFAULT_BUCKET_BITS) -> None:
        self._client = client
        self.namespace = _check_namespace(namespace)
        self.bucket_bits = _check_bucket_bits(bucket_bits)
        _check_binary_client(client)
        self._meta_key = f"{namespace}:meta"
        self._hex_width = (bucket_bits + 3) // 4
        self._cas = client.register_script(_CAS_LUA)
        self._delete = client.register_script(_DELETE_LUA)
        self._intern = client.register_script(_INTERN_LUA)
        self._fingerprint_ids: dict[str, int] = {}  # ids never change once assigned: cache forever
        self._fingerprints: dict[int, str] = {}
        self._layout_checked = False

    @property
    def client(self) -> Any:
        """The Valkey client (other per-user keys of this namespace live on the same server)."""
        return self._client

    def get(self, tenant: str, user_id: str) -> AdapterRecord | None:
        """The user's current record, or None when they have no adapter."""
        bucket, field = self._locate(tenant, user_id)
        raw = self._call(lambda: self._client.hget(bucket, field))
        return None if raw is None else unpack_record(raw, self._fingerprint_of)

    def exists_many(self, users: Sequence[tuple[str, str]]) -> list[bool]:
        """Per (tenant, user id), whether the user has a record now: one pipelined round trip (per server)."""
        located = [self._locate(tenant, user_id) for tenant, user_id in users]

        def run() -> list[bool]:
            found: list[bool] = []
            for start in range(0, len(located), _BATCH):
                pipe = self._client.pipeline(transaction=False)
                for bucket, field in located[start : start + _BATCH]:
                    pipe.hexists(bucket, field)
                found.extend(bool(reply) for reply in pipe.execute())
            return found

        return self._call(run)

    def compare_and_set(self, tenant: str, user_id: str, expected_version: int, record: AdapterRecord) -> None:
        """Store `record` only if the stored version is `expected_version` (0 = no record) and
        `record.version` is greater; otherwise raise Conflict naming the user and both versions."""
        _check_int("expected_version", expected_version, 0, _U32)
        packed = pack_record(record, self._fingerprint_id(record.fingerprint))
        bucket, field = self._locate(tenant, user_id)
        ok, stored = self._call(
            lambda: self._cas(keys=[bucket], args=[field, expected_version, record.version, packed])
        )
        if not ok:
            raise _conflict(CasUpdate(tenant, user_id, expected_version, record), int(stored))

    def compare_and_set_many(self, updates: Sequence[CasUpdate]) -> list[Conflict | None]:
        """Each update as in compare_and_set, pipelined; per update, None if it was written or the
        Conflict it lost with. Updates are independent: no atomicity across them."""
        for update in updates:
            _check_int("expected_version", update.expected_version, 0, _U32)
        ids = {fp: self._fingerprint_id(fp) for fp in {u.record.fingerprint for u in updates}}
        results: list[Conflict | None] = []
        for start in range(0, len(updates), _BATCH):
            batch = updates[start : start + _BATCH]
            replies = self._call(functools.partial(self._run_cas_batch, batch, ids))
            results.extend(
                None if ok else _conflict(update, stored) for update, (ok, stored) in zip(batch, replies, strict=True)
            )
        return results

    def delete(self, tenant: str, user_id: str) -> AdapterRecord | None:
        """Remove the user's record; returns what it was (None if there was none)."""
        bucket, field = self._locate(tenant, user_id)
        raw = self._call(lambda: self._delete(keys=[bucket], args=[field]))
        return None if raw is None else unpack_record(raw, self._fingerprint_of)

    def count(self) -> int:
        """Users with a record. Scans every bucket: O(2**bucket_bits), for tools and tests only."""

        def scan() -> int:
            total = 0
            keys = list(self._client.scan_iter(match=f"{self.namespace}:a:*", count=1000))
            for start in range(0, len(keys), _BATCH):
                pipe = self._client.pipeline(transaction=False)
                for key in keys[start : start + _BATCH]:
                    pipe.hlen(key)
                total += sum(pipe.execute())
            return total

        return self._call(scan)

    def _locate(self, tenant: str, user_id: str) -> tuple[str, bytes]:
        """(bucket key, field) of a user: both from the user's 128-bit hash."""
        digest = user_digest(tenant, user_id)[:16]
        if not self._layout_checked:
            self._check_layout()
        bucket = int.from_bytes(digest[:4], "big") >> (32 - self.bucket_bits)
        return f"{self.namespace}:a:{bucket:0{self._hex_width}x}", digest

    def _run_cas_batch(self, batch: Sequence[CasUpdate], ids: dict[str, int]) -> list[tuple[int, int]]:
        """One pipelined round trip per server; each reply is (written?, stored version)."""
        calls: list[tuple[str, list[Any]]] = []
        for update in batch:
            bucket, field = self._locate(update.tenant, update.user_id)
            packed = pack_record(update.record, ids[update.record.fingerprint])
            calls.append((bucket, [field, update.expected_version, update.record.version, packed]))
        replies: list[Any] = [None] * len(calls)
        for node_client, indexes in self._by_server(calls):
            pipe = node_client.pipeline(transaction=False)
            for i in indexes:
                self._cas(keys=[calls[i][0]], args=calls[i][1], client=pipe)  # the pipe loads the script
            for i, reply in zip(indexes, pipe.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):  # MOVED/ASK after a reshard, a node restart: retry alone
                replies[i] = self._cas(keys=[calls[i][0]], args=calls[i][1])
        return [(int(ok), int(stored)) for ok, stored in replies]

    def _by_server(self, calls: Sequence[tuple[str, list[Any]]]) -> list[tuple[Any, list[int]]]:
        """Group call indexes by the server owning their key: redis-py cannot pipeline scripts
        through a cluster client, so a cluster gets one plain pipeline per node."""
        if not isinstance(self._client, redis.cluster.RedisCluster):
            return [(self._client, list(range(len(calls))))]
        groups: dict[str, list[int]] = {}
        for i, (key, _) in enumerate(calls):
            groups.setdefault(self._client.get_node_from_key(key).name, []).append(i)
        return [
            (self._client.get_redis_connection(self._client.get_node(node_name=name)), indexes)
            for name, indexes in groups.items()
        ]

    def _fingerprint_id(self, fingerprint: str) -> int:
        found = self._fingerprint_ids.get(fingerprint)
        if found is None:
            found = int(self._call(lambda: self._intern(keys=[self._meta_key], args=[fingerprint, _MAX_FINGERPRINTS])))
            self._fingerprint_ids[fingerprint] = found
            self._fingerprints[found] = fingerprint
        return found

    def _fingerprint_of(self, fingerprint_id: int) -> str:
        found = self._fingerprints.get(fingerprint_id)
        if found is None:
            raw = self._call(lambda: self._client.hget(self._meta_key, f"id:{fingerprint_id}"))
            if raw is None:
                raise CorruptObject(
                    f"registry {self.namespace!r} has a record with unknown fingerprint id {fingerprint_id}"
                )
            found = raw.decode()
            self._fingerprints[fingerprint_id] = found
            self._fingerprint_ids[found] = fingerprint_id
        return found

    def _check_layout(self) -> None:
        """Refuse to run against a namespace written with another bucket_bits (users would vanish)."""

        def check() -> bytes:
            pipe = self._client.pipeline(transaction=False)
            pipe.hsetnx(self._meta_key, "bucket_bits", self.bucket_bits)
            pipe.hget(self._meta_key, "bucket_bits")
            return pipe.execute()[1]

        stored = int(self._call(check))
        if stored != self.bucket_bits:
            raise InvalidArgument(
                f"registry namespace {self.namespace!r} uses bucket_bits={stored}, "
                f"this client was configured with {self.bucket_bits}"
            )
        self._layout_checked = True

    def _call(self, fn: Callable[[], T]) -> T:
        def checked() -> T:
            try:
                return fn()
            except redis.exceptions.ResponseError as exc:  # the record scripts' own refusal
                if "unknown adapter record format" in str(exc):
                    raise CorruptObject(f"registry {self.namespace!r}: {exc}") from exc
                raise

        return valkey.call(checked, "registry server")


def open_registry(config: RegistryConfig) -> Registry:
    """A Registry over a new client for `config.url` (connects lazily, on first use)."""
    if not config.url:
        raise InvalidArgument("the registry URL is empty: set registry.url (--registry-url)")
    options: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "decode_responses": False,
        "max_connections": valkey.MAX_CONNECTIONS,
    }
    client = valkey.connect(config.url, config.cluster, health_check_interval=30, **options)
    return Registry(client, namespace=config.namespace, bucket_bits=config.bucket_bits)


def _conflict(update: CasUpdate, stored: int) -> Conflict:
    if update.record.version <= update.expected_version:
        reason = (
            f"new version {update.record.version} must be greater than {update.expected_version} "
            f"(registry has {stored})"
        )
    else:
        reason = f"expected version {update.expected_version}, registry has {stored}"
    return Conflict(
        f"adapter of user {update.user_id!r:.80} (tenant {update.tenant!r:.40}) not updated to "
        f"version {update.record.version}: {reason}"
    )


def _parse_event_id(event_id: str) -> tuple[int, int]:
    if event_id == "":
        return 0, 0
    match = _EVENT_ID_RE.match(event_id) if isinstance(event_id, str) else None
    if not match or int(match.group(1)) >= _U48 or int(match.group(2)) >= _U32 or event_id == "0-0":
        raise InvalidArgument(
            f"last_event_id must be a stream id like '1700000000000-0' (ms < 2**48, "
            f"seq < 2**32, not 0-0) or '', got {event_id!r:.80}"
        )
    return int(match.group(1)), int(match.group(2))


def _check_int(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise InvalidArgument(f"{name} must be an int in [{low}, {high - 1}], got {value!r:.40}")
    return value


def _check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE_RE.match(namespace):
        raise InvalidArgument(f"registry namespace must match {_NAMESPACE_RE.pattern}, got {namespace!r:.80}")
    return namespace


def _check_bucket_bits(bits: int) -> int:
    return _check_int("bucket_bits", bits, 4, 25)


def _check_binary_client(client: Any) -> None:
    pool = getattr(client, "connection_pool", None) or getattr(client, "nodes_manager", None)
    if getattr(pool, "connection_kwargs", {}).get("decode_responses"):
        raise InvalidArgument("the registry needs a redis client with decode_responses=False (records are binary)")
