"""Server interceptors: status mapping (+ call metrics), drain on shutdown, authentication, per-tenant
rate limit.

Install them with `grpc.server(pool, interceptors=server_interceptors(keys, limiter, metrics, drain))`; the
order matters and that function fixes it: errors outermost (so it maps what the others raise), then the
drain (refuses calls during shutdown, before any work), then auth (sets the tenant), then the rate limit
(reads the tenant).

Each interceptor wraps the *behavior* of a method handler (unary or streaming responses alike) rather
than acting in `intercept_service`, because only the behavior runs in the thread, and for the duration,
of the call itself.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from personalize.errors import Unavailable
from personalize_service.server.auth import ApiKeys, current_tenant, tenant_context
from personalize_service.server.errors import message_of, status_of
from personalize_service.server.limits import RateLimiter
from personalize_service.server.metrics import ServiceMetrics

log = logging.getLogger(__name__)

PUBLIC_METHOD_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods served without an API key or rate limit: health checking and server reflection."""

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
        return _wrap_handler(handler, self, method)


def _wrap_handler(handler: Any, interceptor: CallInterceptor, method: str) -> Any:
    """A copy of `handler` whose behavior goes through `interceptor`."""
    attr, make = _HANDLER_KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]
    behavior = getattr(handler, attr)

    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        def call() -> Any:
            return behavior(request, context)

        if handler.response_streaming:
            return interceptor.stream(call, context, method)
        return interceptor.unary(call, context, method)

    return make(
        wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


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


class AuthInterceptor(CallInterceptor):
    """Resolves the caller's tenant from `authorization: Bearer <key>` and runs the call with
    `current_tenant()` set to it; raises Unauthenticated (-> UNAUTHENTICATED) on a missing or unknown key.
    Health checking and reflection need no key.
    """

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    def applies_to(self, method: str) -> bool:
        return not _is_public(method)

    def unary(self, call: Callable[[], Any], context: grpc.ServicerContext, method: str) -> Any:
        tenant = self.keys.tenant_of(context.invocation_metadata())
        return tenant_context(tenant).run(call)

    def stream(self, call: Callable[[], Iterator[Any]], context: grpc.ServicerContext, method: str) -> Iterator[Any]:
        tenant = self.keys.tenant_of(context.invocation_metadata())
        ctx = tenant_context(tenant)
        responses = ctx.run(call)
        try:
            while True:  # each step of the handler's generator runs with the tenant set
                try:
                    item = ctx.run(next, responses)
                except StopIteration:
                    return
                yield item
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                ctx.run(close)


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
    keys: ApiKeys, limiter: RateLimiter | None = None, metrics: ServiceMetrics | None = None, drain: Drain | None = None
) -> list[grpc.ServerInterceptor]:
    """The service's interceptors in the order they must run (outermost first): errors, drain (if given),
    auth, rate limit."""
    chain: list[grpc.ServerInterceptor] = [ErrorInterceptor(metrics)]
    if drain is not None:
        chain.append(DrainInterceptor(drain))
    chain.append(AuthInterceptor(keys))
    if limiter is not None:
        chain.append(RateLimitInterceptor(limiter))
    return chain
