"""Server interceptors: status mapping (+ call metrics), drain on shutdown, authentication, request size,
per-tenant rate limit.

Install them with `grpc.server(pool, interceptors=server_interceptors(keys, limiter, metrics, drain))`; the
order matters and that function fixes it: errors outermost (so it maps what the others raise), then the
drain (refuses calls during shutdown, before any work), then auth (sets the tenant), then the request
size, then the rate limit (reads the tenant).

Most interceptors wrap the *behavior* of a method handler (unary or streaming responses alike), because
only the behavior runs in the thread, and for the duration, of the call itself. Auth and the request size
act in `intercept_service` as well, where the call's headers are known and its message not yet parsed:
auth swaps a refused call's deserializer for one that drops the bytes, the size check reads their length.
"""

from __future__ import annotations

import abc
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from personalize.errors import InvalidArgument, PersonalizeError, Unavailable
from personalize_service.server.auth import ApiKeys, bearer_key, current_tenant, tenant_context
from personalize_service.server.errors import message_of, status_of
from personalize_service.server.limits import Limits, RateLimiter
from personalize_service.server.metrics import ServiceMetrics

log = logging.getLogger(__name__)

PUBLIC_METHOD_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods served without an API key or rate limit: health checking and server reflection."""
ADMIN_METHOD_PREFIX = "/personalize.v1.Admin/"
"""Methods that need an operator key."""
IMPORT_METHOD = "/personalize.v1.Personalize/ImportAdapter"
"""The one method whose request may be larger than Limits.max_request_bytes."""

_HANDLER_KINDS: dict[tuple[bool, bool], tuple[str, Callable[..., Any]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class CallInterceptor(grpc.ServerInterceptor, abc.ABC):
    """Runs `unary` or `stream` around every call of the methods it `applies_to`.

    `call()` invokes the wrapped behavior with the call's request (or request iterator) and context and
    returns its response (unary) or response iterator (streaming).
    """

    def applies_to(self, method: str) -> bool:
        """Whether to wrap `method` (full name, e.g. `/personalize.v1.Personalize/Generate`)."""
        return True

    @abc.abstractmethod
    def unary(self, call: Callable[[], Any], context: grpc.ServicerContext, method: str) -> Any:
        """Return call()'s response, or raise."""

    @abc.abstractmethod
    def stream(self, call: Callable[[], Iterator[Any]], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
        """Yield call()'s responses, or raise; a generator, so it runs as the responses are taken."""

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not self.applies_to(method):
            return handler
        return cached_wrapper(wrapper_cache(self), handler, method, lambda: _wrap_handler(handler, self, method))


_WRAPS_MAX = 512
"""Wrapped handlers an interceptor keeps; past this its cache starts over (a handler made per call must
not grow it without bound)."""


def wrapper_cache(owner: Any) -> dict[Any, tuple[Any, Any]]:
    """`owner`'s cache of wrapped handlers (made on first use: subclasses need not call a base __init__)."""
    cache: dict[Any, tuple[Any, Any]] | None = owner.__dict__.get("_wrap_cache")
    if cache is None:
        cache = owner.__dict__.setdefault("_wrap_cache", {})
    return cache


def cached_wrapper(cache: dict[Any, tuple[Any, Any]], handler: Any, key: Any, wrap: Callable[[], Any]) -> Any:
    """wrap() of `handler`, made once per (handler, key): grpc asks the interceptors for every call, and the
    handlers they wrap are the same objects call after call, so are their wrappers (and the wrappers of
    those, up the chain). A refusal (made per call, holding its error) is wrapped anew and never kept."""
    if getattr(handler, "request_deserializer", None) is _unread:
        return wrap()
    entry = cache.get((id(handler), key))
    if entry is None or entry[0] is not handler:  # an id is reused once its handler is gone
        if len(cache) >= _WRAPS_MAX:
            cache.clear()
        entry = (handler, wrap())
        cache[(id(handler), key)] = entry
    return entry[1]


def _wrap_handler(handler: Any, interceptor: CallInterceptor, method: str) -> Any:
    """A copy of `handler` whose behavior goes through `interceptor`."""
    behavior = getattr(handler, _HANDLER_KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))][0])

    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        def call() -> Any:
            return behavior(request, context)

        if handler.response_streaming:
            return interceptor.stream(call, context, method)
        return interceptor.unary(call, context, method)

    return _rebuild(handler, wrapped, handler.request_deserializer)


def _is_public(method: str) -> bool:
    return method.startswith(PUBLIC_METHOD_PREFIXES)


# ---- status mapping ----------------------------------------------------------------------------------


class ErrorInterceptor(CallInterceptor):
    """Maps exceptions to status codes (service/server/errors.py) and counts every call's final status.

    - a domain error (personalize.errors) -> its code, with its message as details;
    - a grpc.RpcError from a downstream call (the router's) -> that call's code and details;
    - an abort or set_code by the handler itself -> left as the handler set it;
    - anything else -> INTERNAL, logged with its traceback under an error id that the details carry.
    """

    def __init__(self, metrics: ServiceMetrics | None = None) -> None:
        self.metrics = metrics

    def unary(self, call: Callable[[], Any], context: grpc.ServicerContext, method: str) -> Any:
        start = time.perf_counter()
        try:
            response = call()
        except Exception as exc:
            self._fail(exc, context, method, start)
        self._observe(method, _handler_code(context) or grpc.StatusCode.OK, start)
        return response

    def stream(self, call: Callable[[], Iterator[Any]], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
        start = time.perf_counter()
        try:
            yield from call()
        except GeneratorExit:  # the client went away and grpc dropped the response iterator
            self._observe(method, grpc.StatusCode.CANCELLED, start)
            raise
        except Exception as exc:
            self._fail(exc, context, method, start)
        self._observe(method, _handler_code(context) or grpc.StatusCode.OK, start)

    def _fail(self, exc: Exception, context: grpc.ServicerContext, method: str, start: float) -> NoReturn:
        """Record the failed call and end it with its status."""
        code, details = _classify(exc, context, method)
        self._observe(method, code, start)
        if details is not None:
            context.abort(code, details)  # raises
        raise exc

    def _observe(self, method: str, code: grpc.StatusCode, start: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_call(method.lstrip("/"), code.name, time.perf_counter() - start)


def _classify(exc: Exception, context: grpc.ServicerContext, method: str) -> tuple[grpc.StatusCode, str | None]:
    """(code, details) for an exception a handler raised; details None = the handler already set them."""
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        return exc.code(), exc.details() or ""
    code = status_of(exc)
    if code is not None:
        return code, message_of(exc)
    already = _handler_code(context)
    if already is not None and already != grpc.StatusCode.OK:
        return already, None
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", error_id, method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, (
        f"internal error {error_id} ({type(exc).__name__}); the server log has the details"
    )


def _handler_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The code the handler set with set_code/abort, if any (None on grpc versions without code())."""
    code = getattr(context, "code", None)
    return code() if callable(code) else None


# ---- authentication and rate limit -------------------------------------------------------------------


class AuthInterceptor(grpc.ServerInterceptor):
    """Resolves the caller from `authorization: Bearer <key>` when the call's headers arrive, before its
    message is parsed, and runs the call with `current_tenant()` set. A missing or unknown key is
    UNAUTHENTICATED, a tenant's key on the Admin API PERMISSION_DENIED; a refused call's message is
    never deserialized (its handler takes the bytes unread). Health checking and reflection need no key.
    """

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys
        self._scopes: dict[str, _TenantScope] = {}

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or _is_public(method):
            return handler
        try:
            key = bearer_key(handler_call_details.invocation_metadata)
            if method.startswith(ADMIN_METHOD_PREFIX):
                tenant = self.keys.authorize_operator(key)
            else:
                tenant = self.keys.authenticate(key)
        except PersonalizeError as exc:
            return _refusal(handler, exc)
        scope = self._scopes.get(tenant)
        if scope is None:
            scope = self._scopes.setdefault(tenant, _TenantScope(tenant))
        wrap = functools.partial(_wrap_handler, handler, scope, method)
        return cached_wrapper(wrapper_cache(self), handler, (method, tenant), wrap)


class _TenantScope(CallInterceptor):
    """Runs one call (every step of a streaming handler's generator) with `current_tenant()` = tenant."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant

    def unary(self, call: Callable[[], Any], context: grpc.ServicerContext, method: str) -> Any:
        return tenant_context(self.tenant).run(call)

    def stream(self, call: Callable[[], Iterator[Any]], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
        ctx = tenant_context(self.tenant)
        responses = ctx.run(call)
        try:
            while True:
                try:
                    item = ctx.run(next, responses)
                except StopIteration:
                    return
                yield item
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                ctx.run(close)


_UNREAD = object()
"""The "request" of a refused call: its bytes are dropped without parsing."""


def _unread(data: bytes) -> object:
    return _UNREAD


def _refusal(handler: Any, error: PersonalizeError) -> Any:
    """A handler of `handler`'s kind that raises `error` without deserializing the request."""

    def refuse(request: Any, context: grpc.ServicerContext) -> NoReturn:
        raise error

    return _rebuild(handler, refuse, _unread)


class RequestSizeInterceptor(grpc.ServerInterceptor):
    """Refuses a request over `limit` bytes (every method but those in `exempt`) by its raw length, before
    it is parsed: INVALID_ARGUMENT naming the limit. The server-wide receive limit stays large enough for
    an ImportAdapter; this is the small limit of everything else."""

    def __init__(self, limit: int, exempt: tuple[str, ...] = (IMPORT_METHOD,)) -> None:
        self.limit = limit
        self.exempt = exempt

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or handler.request_streaming or _is_public(method) or method in self.exempt:
            return handler
        return cached_wrapper(wrapper_cache(self), handler, method, lambda: self._checked(handler, method))

    def _checked(self, handler: Any, method: str) -> Any:
        """`handler` refusing a request over the limit before it is parsed."""
        behavior = getattr(handler, _HANDLER_KINDS[(False, bool(handler.response_streaming))][0])
        parse = handler.request_deserializer
        limit = self.limit

        def deserialize(data: bytes) -> Any:
            if len(data) > limit:
                return _Oversized(len(data))
            return data if parse is None else parse(data)

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Oversized):
                raise InvalidArgument(
                    f"{method.rsplit('/', 1)[-1]} request is {request.size} bytes; the limit is {limit} "
                    f"(max_request_bytes, derived from the text limits; only ImportAdapter may be larger)"
                )
            return behavior(request, context)

        return _rebuild(handler, checked, deserialize)


@dataclass(frozen=True)
class _Oversized:
    """The "request" of a call whose message was over the limit, never parsed."""

    size: int


def _rebuild(handler: Any, behavior: Callable[..., Any], deserializer: Callable[[bytes], Any] | None) -> Any:
    """A handler of `handler`'s kind with `behavior` and `deserializer` in place of its own."""
    _, make = _HANDLER_KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(behavior, request_deserializer=deserializer, response_serializer=handler.response_serializer)


class RateLimitInterceptor(CallInterceptor):
    """Counts each call against its tenant's token bucket; ResourceExhausted when it is empty.

    Must run inside AuthInterceptor (it reads `current_tenant()`).
    """

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def applies_to(self, method: str) -> bool:
        return not _is_public(method)

    def unary(self, call: Callable[[], Any], context: grpc.ServicerContext, method: str) -> Any:
        self.limiter.check(current_tenant())
        return call()

    def stream(self, call: Callable[[], Iterator[Any]], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
        self.limiter.check(current_tenant())
        yield from call()


# ---- graceful shutdown -------------------------------------------------------------------------------


class Drain:
    """Calls in flight, and a draining flag: once draining, new calls are refused with UNAVAILABLE while
    the ones in flight finish. Thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._draining = False

    @property
    def active(self) -> int:
        return self._active

    def enter(self) -> None:
        """Count a new call; Unavailable if draining."""
        with self._cond:
            if self._draining:
                raise Unavailable(
                    "this server is shutting down and takes no new calls; retry (another "
                    "node, or this one once it is back, will answer)"
                )
            self._active += 1

    def exit(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def start(self) -> None:
        """Refuse new calls from now on."""
        with self._cond:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; False if some still are after `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0, timeout)


class DrainInterceptor(CallInterceptor):
    """Counts calls in a Drain and refuses new ones while it drains. Health and reflection always answer
    (health then says NOT_SERVING)."""

    def __init__(self, drain: Drain) -> None:
        self.drain = drain

    def applies_to(self, method: str) -> bool:
        return not _is_public(method)

    def unary(self, call: Callable[[], Any], context: grpc.ServicerContext, method: str) -> Any:
        self.drain.enter()
        try:
            return call()
        finally:
            self.drain.exit()

    def stream(self, call: Callable[[], Iterator[Any]], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
        self.drain.enter()
        try:
            yield from call()
        finally:
            self.drain.exit()


def server_interceptors(
    keys: ApiKeys,
    limiter: RateLimiter | None = None,
    metrics: ServiceMetrics | None = None,
    drain: Drain | None = None,
    limits: Limits | None = None,
) -> list[grpc.ServerInterceptor]:
    """The service's interceptors in the order they must run (outermost first): errors, drain (if given),
    auth, request size (`limits`, or the limiter's), rate limit."""
    chain: list[grpc.ServerInterceptor] = [ErrorInterceptor(metrics)]
    if drain is not None:
        chain.append(DrainInterceptor(drain))
    chain.append(AuthInterceptor(keys))
    limits = limits or (limiter.limits if limiter is not None else None)
    if limits is not None:
        chain.append(RequestSizeInterceptor(limits.max_request_bytes))
    if limiter is not None:
        chain.append(RateLimitInterceptor(limiter))
    return chain
