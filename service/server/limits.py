"""Request limits (the caps every request is held to) and the per-tenant rate and concurrency limiters.

Validators are pure: they return the (normalised) value or raise a domain error whose message names the
limit and the value. Size limits raise InvalidArgument (the same request never succeeds); rate and
concurrency limits raise ResourceExhausted (they clear with time).
"""

from __future__ import annotations

import logging
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from personalize.errors import InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)

KIB = 1024
MIB = 1024 * KIB
USER_ID_METADATA_KEY = "x-user-id"
IMPORT_FILE_NAMES = ("adapter_config.json", "adapter_model.safetensors")
"""The PEFT files an import must carry (never a pickle: adapter_model.bin is refused)."""
IMPORT_CHUNK_BYTES = MIB
"""Most bytes of file data one ImportAdapterStream chunk may carry."""
_CHUNK_ROOM = 64 * KIB
"""Room for a chunk's user_id, file name and framing above its data."""


MAX_QUEUED_PER_THREAD = 4
"""Calls a server accepts per handler thread (grpc's maximum_concurrent_rpcs); more are RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how fast and how much at once one tenant may ask."""

    max_user_id_bytes: int = 256
    """user_id is 1..this many bytes of UTF-8, without control characters."""
    max_prompt_bytes: int = 16 * KIB
    """Prompt size in UTF-8 bytes."""
    max_new_tokens: int = 512
    """Largest max_new_tokens a request may ask for."""
    default_new_tokens: int = 64
    """max_new_tokens used when a request leaves it 0."""
    max_chat_messages: int = 1024
    """Messages one chat (`messages` of Generate or SubmitFeedback) may hold: the template adds tokens per
    message, so without it 16 KiB of one-letter turns renders to over 100k tokens (a third of a second of
    the worker's CPU before the prompt is refused as too long)."""
    max_stop_strings: int = 16
    """Number of stop strings per request."""
    max_stop_bytes: int = 256
    """Size of one stop string in UTF-8 bytes."""
    max_feedback_text_bytes: int = 16 * KIB
    """Size of each feedback text field (prompt, completion, correction, rejected) in UTF-8 bytes."""
    max_event_key_bytes: int = 256
    """Size of a feedback idempotency key in UTF-8 bytes."""
    max_import_file_bytes: int = 64 * MIB
    """Size of each file of an imported adapter."""
    max_message_bytes: int = 4 * MIB
    """Largest message a server receives (grpc's receive limit, every method): grpc refuses a larger one
    with RESOURCE_EXHAUSTED before the rest of it arrives. Adapters above it import by ImportAdapterStream."""
    requests_per_second: float = 1000.0
    """Sustained request rate per tenant (token bucket refill rate)."""
    burst: int = 2000
    """Requests a tenant may make at once above the sustained rate (token bucket size)."""
    max_concurrent_generations: int = 256
    """Generations one tenant may have running or queued at once; a quarter of the default 1024 handler
    threads, so one tenant can never hold every thread. Per server, or across every worker with
    `--shared-limits` (leases in Valkey)."""
    feedback_per_second: float = 200.0
    """Sustained feedback events per tenant (the tenant's feedback quota, a token bucket): per server, or across
    every process with `--shared-limits`."""
    feedback_burst: int = 2000
    """Feedback events a tenant may send at once above feedback_per_second."""
    shared_timeout_s: float = 1.0
    """With `--shared-limits`: seconds a limit check waits on the shared Valkey before this process decides
    alone (its own buckets and counts: fail open, warned once per outage). A call waits at most this long on
    a stalled Valkey; a longer stall lets each process admit its own full limit meanwhile."""

    def __post_init__(self) -> None:
        for name in (
            "max_user_id_bytes",
            "max_prompt_bytes",
            "max_chat_messages",
            "max_new_tokens",
            "default_new_tokens",
            "max_stop_bytes",
            "max_feedback_text_bytes",
            "max_event_key_bytes",
            "max_import_file_bytes",
            "max_message_bytes",
            "burst",
            "max_concurrent_generations",
            "feedback_burst",
        ):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"limit {name} must be >= 1, got {getattr(self, name)}")
        if self.max_stop_strings < 0:
            raise InvalidArgument(f"limit max_stop_strings must be >= 0, got {self.max_stop_strings}")
        for name in ("requests_per_second", "feedback_per_second", "shared_timeout_s"):
            if not getattr(self, name) > 0:
                raise InvalidArgument(f"limit {name} must be > 0, got {getattr(self, name)}")
        smallest = max(self.max_request_bytes, IMPORT_CHUNK_BYTES + _CHUNK_ROOM)
        if self.max_message_bytes < smallest:
            raise InvalidArgument(
                f"limit max_message_bytes ({self.max_message_bytes}) is below {smallest}, the largest request "
                f"(max_request_bytes) or import chunk ({IMPORT_CHUNK_BYTES} bytes of data) a caller may send"
            )
        if self.default_new_tokens > self.max_new_tokens:
            raise InvalidArgument(
                f"limit default_new_tokens ({self.default_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})"
            )

    @property
    def max_request_bytes(self) -> int:
        """Largest serialized request of any method but ImportAdapter: the largest request the text limits
        allow (a feedback event's four texts, or a prompt with its stop strings) plus 64 KiB of room."""
        feedback = 4 * self.max_feedback_text_bytes + self.max_event_key_bytes
        generate = self.max_prompt_bytes + self.max_stop_strings * self.max_stop_bytes
        return max(feedback, generate) + self.max_user_id_bytes + 64 * KIB


DEFAULT_LIMITS = Limits()


def grpc_message_options(limits: Limits) -> list[tuple[str, int]]:
    """gRPC channel options so an export (or a unary import) of two maximal files fits in one message."""
    size = 2 * limits.max_import_file_bytes + MIB
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]


def grpc_server_options(limits: Limits) -> list[tuple[str, int]]:
    """gRPC server options: it receives at most max_message_bytes per message (so no caller, keyed or not,
    can make it take in more before being refused) and sends exports of two maximal files."""
    return [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", 2 * limits.max_import_file_bytes + MIB),
    ]


# ---- validators --------------------------------------------------------------------------------------


def _utf8_size(name: str, text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"{name} is not valid UTF-8 (character at index {exc.start})") from None


def check_size(name: str, text: str, limit: int, limit_name: str) -> str:
    """`text` unchanged if its UTF-8 size is <= limit, else InvalidArgument naming both."""
    size = _utf8_size(name, text)
    if size > limit:
        raise InvalidArgument(f"{name} is {size} bytes; the limit is {limit} ({limit_name})")
    return text


def check_user_id(user_id: str, limits: Limits) -> str:
    """`user_id` unchanged if it is 1..max_user_id_bytes of UTF-8 with no control character (Cc)."""
    size = _utf8_size("user_id", user_id)
    if size == 0:
        raise InvalidArgument(f"user_id is empty; it must be 1-{limits.max_user_id_bytes} bytes of UTF-8")
    if size > limits.max_user_id_bytes:
        raise InvalidArgument(f"user_id is {size} bytes; the limit is {limits.max_user_id_bytes}")
    for index, char in enumerate(user_id):
        if unicodedata.category(char) == "Cc":
            raise InvalidArgument(f"user_id contains control character U+{ord(char):04X} at index {index}")
    return user_id


def check_prompt(prompt: str, limits: Limits) -> str:
    return check_size("prompt", prompt, limits.max_prompt_bytes, "max_prompt_bytes")


def check_max_new_tokens(max_new_tokens: int, limits: Limits) -> int:
    """The effective token budget: 0 -> default_new_tokens; above max_new_tokens -> InvalidArgument."""
    if max_new_tokens == 0:
        return limits.default_new_tokens
    if max_new_tokens < 0:
        raise InvalidArgument(f"max_new_tokens is {max_new_tokens}; it must be >= 0")
    if max_new_tokens > limits.max_new_tokens:
        raise InvalidArgument(f"max_new_tokens is {max_new_tokens}; the limit is {limits.max_new_tokens}")
    return max_new_tokens


def check_stop(stop: Sequence[str], limits: Limits) -> tuple[str, ...]:
    """The stop strings as a tuple, if there are at most max_stop_strings of at most max_stop_bytes."""
    if len(stop) > limits.max_stop_strings:
        raise InvalidArgument(f"stop has {len(stop)} strings; the limit is {limits.max_stop_strings}")
    for index, text in enumerate(stop):
        check_size(f"stop[{index}]", text, limits.max_stop_bytes, "max_stop_bytes")
    return tuple(stop)


def check_feedback_text(name: str, text: str, limits: Limits) -> str:
    return check_size(name, text, limits.max_feedback_text_bytes, "max_feedback_text_bytes")


def check_event_key(event_key: str, limits: Limits) -> str:
    return check_size("event_key", event_key, limits.max_event_key_bytes, "max_event_key_bytes")


def check_import_files(files: Mapping[str, bytes], limits: Limits) -> dict[str, bytes]:
    """The files as a dict if they are exactly IMPORT_FILE_NAMES, each <= max_import_file_bytes."""
    unknown = sorted(set(files) - set(IMPORT_FILE_NAMES))
    if unknown:
        raise InvalidArgument(f"import files {unknown} are not accepted; send exactly {list(IMPORT_FILE_NAMES)}")
    missing = [name for name in IMPORT_FILE_NAMES if name not in files]
    if missing:
        raise InvalidArgument(f"import is missing {missing}; send exactly {list(IMPORT_FILE_NAMES)}")
    for name, data in files.items():
        if len(data) > limits.max_import_file_bytes:
            raise InvalidArgument(
                f"import file {name} is {len(data)} bytes; the limit is "
                f"{limits.max_import_file_bytes} (max_import_file_bytes)"
            )
    return dict(files)


def check_import_chunk(index: int, file_name: str, size: int, received: int, limits: Limits) -> None:
    """Chunk `index` of a streamed import, `size` bytes of `file_name` after `received` of it, if it is for
    one of IMPORT_FILE_NAMES, carries at most IMPORT_CHUNK_BYTES and keeps the file within max_import_file_bytes."""
    if file_name not in IMPORT_FILE_NAMES:
        raise InvalidArgument(
            f"import chunk {index} is for file {file_name!r}, which is not accepted; "
            f"send exactly {list(IMPORT_FILE_NAMES)}"
        )
    if size > IMPORT_CHUNK_BYTES:
        raise InvalidArgument(
            f"import chunk {index} carries {size} bytes; the limit is {IMPORT_CHUNK_BYTES} "
            f"per chunk (IMPORT_CHUNK_BYTES)"
        )
    if received + size > limits.max_import_file_bytes:
        raise InvalidArgument(
            f"import file {file_name} is over {limits.max_import_file_bytes} bytes at chunk {index}; the limit is "
            f"{limits.max_import_file_bytes} (max_import_file_bytes)"
        )


def user_id_of(request: Any, context: Any, limits: Limits = DEFAULT_LIMITS) -> str:
    """The user a call is for: `x-user-id` metadata if present, else the request's `user_id`; validated.

    `request` may be None (a router forwarding bytes); `context` is a grpc.ServicerContext. If both
    are present and differ, InvalidArgument: routing by one user and serving another is never right.
    gRPC metadata values are printable ASCII, so a non-ASCII user id can only come from the request.
    """
    from_request = getattr(request, "user_id", "") if request is not None else ""
    from_metadata = next((v for k, v in context.invocation_metadata() or () if k == USER_ID_METADATA_KEY), None)
    if isinstance(from_metadata, bytes):
        from_metadata = from_metadata.decode("utf-8", "replace")
    if from_metadata is not None and from_request and from_metadata != from_request:
        raise InvalidArgument(
            f"{USER_ID_METADATA_KEY} metadata {from_metadata!r} differs from the request's user_id {from_request!r}"
        )
    return check_user_id(from_metadata if from_metadata is not None else from_request, limits)


# ---- rate and concurrency ----------------------------------------------------------------------------


@dataclass
class TokenBucket:
    """`rate` tokens per second up to `capacity`; starts full. Not thread-safe (RateLimiter locks)."""

    rate: float
    capacity: float
    tokens: float
    updated: float
    """Clock reading at the last refill, in seconds."""

    def try_take(self, now: float) -> bool:
        """Refill for the time since `updated`, then take one token if there is one."""
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class TenantBuckets:
    """One token bucket per tenant (tenants come from configured keys, so the map stays small). Thread-safe."""

    rate: float
    capacity: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, TokenBucket] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def take(self, tenant: str) -> bool:
        """Take one of `tenant`'s tokens; False if its bucket is empty."""
        with self._lock:
            now = self.clock()
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = TokenBucket(self.rate, self.capacity, self.capacity, now)
                self._buckets[tenant] = bucket
            return bucket.try_take(now)


# KEYS: the tenant's bucket (a hash: tokens, ts in server microseconds). ARGV: rate/s, capacity.
# The server's clock, so every process refills the same bucket at the same rate.
_SHARED_BUCKET_LUA = """
local rate, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(b[1]) or capacity, tonumber(b[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate / 1000000)
local ok = 0
if tokens >= 1 then
  tokens = tokens - 1
  ok = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return ok
"""


@dataclass
class SharedBuckets:
    """One token bucket per tenant kept in Valkey (one Lua call per take, one key per tenant and limit,
    `{<namespace>:<limit>:<tenant>}`, so on a Redis Cluster each bucket lives in one slot): the rate holds
    for the tenant however many processes take from it. When Valkey cannot be reached each process takes
    from its own `fallback` buckets (fail open, at the per-process limit), logged once per outage."""

    client: Any
    """A redis.Redis or RedisCluster (decode_responses off)."""
    namespace: str
    limit: str
    """The limit's part of the key: `rl` (requests), `fq` (feedback)."""
    fallback: TenantBuckets

    def __post_init__(self) -> None:
        self._take = self.client.register_script(_SHARED_BUCKET_LUA)
        self._warned = False

    def key(self, tenant: str) -> str:
        return f"{{{self.namespace}:{self.limit}:{tenant}}}"

    def take(self, tenant: str) -> bool:
        """Take one of `tenant`'s tokens from the shared bucket; False if it is empty."""
        from personalize import valkey
        from personalize.errors import Unavailable

        rate, capacity = self.fallback.rate, self.fallback.capacity
        try:
            allowed = bool(valkey.call(lambda: self._take(keys=[self.key(tenant)], args=[rate, capacity]), "limits"))
        except Unavailable as exc:
            if not self._warned:
                log.warning("shared %s limits unavailable, limiting per process: %s", self.limit, exc)
                self._warned = True
            return self.fallback.take(tenant)
        self._warned = False
        return allowed


@dataclass
class TenantQuota:
    """A per-tenant token bucket limit: per process, or shared through Valkey when `client` is set (see
    SharedBuckets). Subclasses say which limit (`limit`, its rate and burst) and how a refusal reads."""

    limits: Limits
    clock: Callable[[], float] = time.monotonic
    client: Any = None
    """A Valkey client to share the buckets through; None = this process's own buckets."""
    namespace: str = "pz"
    limit: ClassVar[str] = ""
    _buckets: TenantBuckets | SharedBuckets = field(init=False)

    def __post_init__(self) -> None:
        local = TenantBuckets(self.rate, self.burst, self.clock)
        self._buckets = local if self.client is None else SharedBuckets(self.client, self.namespace, self.limit, local)

    @property
    def shared(self) -> bool:
        return self.client is not None

    @property
    def rate(self) -> float:
        raise NotImplementedError

    @property
    def burst(self) -> int:
        raise NotImplementedError

    def refusal(self, tenant: str) -> str:
        raise NotImplementedError

    def check(self, tenant: str) -> None:
        """Count one call of `tenant`; ResourceExhausted naming the limit if its bucket is empty."""
        if not self._buckets.take(tenant):
            raise ResourceExhausted(self.refusal(tenant))

    def _scope(self) -> str:
        return "; shared by every process" if self.shared else ""


@dataclass
class RateLimiter(TenantQuota):
    """Requests per tenant: requests_per_second, with a burst of `burst`."""

    limit: ClassVar[str] = "rl"

    @property
    def rate(self) -> float:
        return self.limits.requests_per_second

    @property
    def burst(self) -> int:
        return self.limits.burst

    def refusal(self, tenant: str) -> str:
        return (
            f"tenant {tenant!r} is over its request rate: the limit is {self.rate:g} requests/s with a burst "
            f"of {self.burst} (requests_per_second, burst{self._scope()}); retry later"
        )


@dataclass
class SharedRateLimiter(RateLimiter):
    """A RateLimiter whose buckets live in Valkey: the rate and burst hold for the tenant however many
    routers, gateways and workers serve it."""

    def __post_init__(self) -> None:
        if self.client is None:
            raise InvalidArgument("SharedRateLimiter needs a Valkey client")
        super().__post_init__()


@dataclass
class FeedbackQuota(TenantQuota):
    """Feedback events per tenant: feedback_per_second, with a burst of feedback_burst, so one tenant cannot
    fill the feedback partitions every tenant shares. Shared by every process when `client` is set."""

    limit: ClassVar[str] = "fq"

    @property
    def rate(self) -> float:
        return self.limits.feedback_per_second

    @property
    def burst(self) -> int:
        return self.limits.feedback_burst

    def refusal(self, tenant: str) -> str:
        return (
            f"tenant {tenant!r} is over its feedback quota: the limit is {self.rate:g} events/s with a burst "
            f"of {self.burst} (feedback_per_second, feedback_burst{self._scope()}); retry later"
        )


def concurrency_refusal(tenant: str, running: int, limit: int, scope: str = "") -> str:
    """What a caller over max_concurrent_generations is told (`scope`: "; shared by every process" or "")."""
    return (
        f"tenant {tenant!r} has {running} generations running; the limit is {limit} "
        f"(max_concurrent_generations{scope}); retry later"
    )


@dataclass
class ConcurrencyLimiter:
    """Counts running generations per tenant in this process; `hold` refuses one over
    max_concurrent_generations. SharedConcurrencyLimiter (leases.py) counts them across processes."""

    limits: Limits
    _running: dict[str, int] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    @contextmanager
    def hold(self, tenant: str) -> Iterator[None]:
        """Occupy one of `tenant`'s generation places for the `with` body; ResourceExhausted if none free."""
        limit = self.limits.max_concurrent_generations
        with self._lock:
            running = self._running.get(tenant, 0)
            if running >= limit:
                raise ResourceExhausted(concurrency_refusal(tenant, running, limit))
            self._running[tenant] = running + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._running[tenant] - 1
                if left:
                    self._running[tenant] = left
                else:
                    del self._running[tenant]

    def running(self, tenant: str) -> int:
        with self._lock:
            return self._running.get(tenant, 0)
