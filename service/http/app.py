"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions, /v1/models, plus /v1/feedback.

Each request is one gRPC call through the client SDK (`client_for(api_key)`), so routing happens where
the SDK routes: the gateway's RoutingClient sends it straight to the user's owner on the ring (service/http/
serve.py). Errors are OpenAI's error JSON (service/http/errors.py); adapter management is
service/http/adapters.py; the body limit and /metrics are service/http/middleware.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import grpc
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from personalize import errors
from personalize.completions import CompletionLog, Remembered, new_completion_id
from personalize_service.client import PersonalizeClient, PersonalizeClientError
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.http.adapters import MAX_IMPORT_BYTES, install_adapter_routes
from personalize_service.http.errors import (
    ApiError,
    as_client_error,
    error_body,
    install_error_handlers,
    status_of_error,
)
from personalize_service.http.middleware import TTFT_KEY, BodyLimit, HttpMetrics, MetricsMiddleware
from personalize_service.http.models import ChatCompletionRequest, ChatMessage, CompletionRequest, FeedbackBody

ANONYMOUS = "anonymous"
"""The user id sent (with use_base_model) for a request without `user`: the base model serves it."""
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
"""The engine's finish reasons as OpenAI's."""


def chat_turns(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """A chat as the (role, content) pairs sent in the proto's `messages`: the worker renders them with the
    model's chat template (the built-in tiny model's is `<|ROLE|>\\nCONTENT\\n` per message, then
    `<|assistant|>\\n`)."""
    return [(m.role, m.content or "") for m in messages]


MAX_BODY_BYTES = 1 << 20
"""Largest request body read (a prompt is at most 16 KiB on the worker), declared or chunked (middleware.BodyLimit);
an adapter import may send up to adapters.MAX_IMPORT_BYTES."""


@dataclass(frozen=True)
class Caller:
    """Who a request's API key is: the SDK client sending that key, and its tenant (None when the edge does
    not know it: a single gRPC target authenticates the key itself, and no completion is remembered)."""

    client: PersonalizeClient
    tenant: str | None = None


BLOCKING_THREADS = 256
"""Threads for the blocking SDK calls (anyio's default is 40): each unary call and each stream waiting for
its next piece holds one, so this bounds the calls in flight through one edge process."""


@contextlib.asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    anyio.to_thread.current_default_thread_limiter().total_tokens = BLOCKING_THREADS
    yield


def _body_limit(path: str) -> int:
    return MAX_IMPORT_BYTES if path.endswith("/adapter/import") else MAX_BODY_BYTES


def create_app(
    client_for: Callable[[str | None], Caller],
    model_name: str,
    fingerprint: str = "",
    *,
    completions: CompletionLog | None = None,
    metrics: HttpMetrics | None = None,
    probe: Callable[[], PersonalizeClient] | None = None,
    operator: Callable[[str | None], PersonalizeClient] | None = None,
) -> FastAPI:
    """The app; `client_for(api_key)` gives the Caller of that key (None = no key). With `completions`
    (and a known tenant) every completion is remembered, and feedback may name it by `completion_id`.
    `probe()` is the client /readyz asks (default: the keyless caller's). With `operator(api_key)` (the
    client of an operator key; it raises PermissionDenied for a tenant's key) GET /v1/stats serves Stats."""
    app = FastAPI(title="personalize (OpenAI-compatible)", docs_url=None, redoc_url=None, lifespan=_lifespan)
    metrics = app.state.metrics = metrics or HttpMetrics()

    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit_of=_body_limit)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    def client(request: Request) -> Caller:
        return client_for(_bearer(request))

    install_adapter_routes(app, client)

    _install_probes(app, probe or (lambda: client_for(None).client), metrics, model_name, fingerprint)
    if operator is not None:
        _install_stats(app, operator)

    def memory(caller: Caller, body: CompletionRequest | ChatCompletionRequest, prompt: str | None) -> Memory | None:
        if completions is None or caller.tenant is None or not body.user:
            return None
        messages = [m.model_dump() for m in body.messages] if isinstance(body, ChatCompletionRequest) else None
        return Memory(completions, caller.tenant, body.user, prompt, messages)

    @app.post("/v1/completions", response_model=None)
    async def completions_route(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: exactly one prompt per request is supported", param="prompt")
        caller = client(request)
        return await _generate(model_name, caller, body, prompts[0], memory(caller, body, prompts[0]), request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        caller = client(request)
        return await _generate(model_name, caller, body, chat_turns(body.messages), memory(caller, body, None), request)

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackBody, request: Request) -> dict[str, Any]:
        caller = client(request)
        user, prompt, completion = await _feedback_text(body, caller, completions)
        sdk = caller.client
        ack = await run_in_threadpool(
            lambda: sdk.feedback(
                user,
                prompt,
                completion,
                body.kind,
                correction=body.correction,
                rejected=body.rejected,
                event_key=body.event_key,
            )
        )
        return {"object": "feedback", "event_id": ack.event_id, "partition": ack.partition}

    return app


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return (auth[7:].strip() if auth.lower().startswith("bearer ") else "") or None


def _install_stats(app: FastAPI, operator: Callable[[str | None], PersonalizeClient]) -> None:
    """GET /v1/stats: the Admin API's Stats of every worker, for an operator key only (a tenant's key is 403
    permission_error, as the gRPC Admin API answers it PERMISSION_DENIED)."""

    @app.get("/v1/stats")
    async def stats(request: Request) -> dict[str, Any]:
        sdk = operator(_bearer(request))
        reply = await run_in_threadpool(sdk.stats)
        return {"object": "stats", **json_format.MessageToDict(reply, preserving_proto_field_name=True)}


def _install_probes(
    app: FastAPI, probe: Callable[[], PersonalizeClient], metrics: HttpMetrics, model_name: str, fingerprint: str
) -> None:
    """/healthz, /readyz (a worker answers), /metrics, /v1/models and /v1/models/{id}."""
    created = int(time.time())

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        try:
            nodes = (await run_in_threadpool(probe().list_nodes)).nodes
        except PersonalizeClientError as exc:
            if exc.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return JSONResponse({"status": "unavailable", "reason": exc.details()}, 503)
            nodes = [pb.Node(state="up")]  # a target that wants a key answered: it is up
        if not any(node.state == "up" for node in nodes):
            return JSONResponse({"status": "unavailable", "reason": "no worker is serving"}, 503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    served = {
        "id": model_name,
        "object": "model",
        "created": created,
        "owned_by": "personalize",
        "fingerprint": fingerprint,
    }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [served]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model != model_name:
            raise ApiError(
                404, f"the model {model!r} does not exist; this server serves {model_name!r}", code="model_not_found"
            )
        return served


Prompt = str | list[tuple[str, str]]
"""A text prompt, or a chat as (role, content) pairs."""


async def _feedback_text(
    body: FeedbackBody, caller: Caller, completions: CompletionLog | None
) -> tuple[str, Prompt, str]:
    """(user, prompt, completion) of a feedback body: remembered under its completion_id, or sent in full."""
    if body.completion_id:
        if completions is None or caller.tenant is None:
            raise ApiError(
                400, "this edge keeps no completions: send user, prompt and completion", param="completion_id"
            )
        known = await run_in_threadpool(completions.recall, caller.tenant, body.completion_id)
        messages = [ChatMessage(**m) for m in known.messages] if known.messages is not None else []
        return known.user_id, known.prompt if known.prompt is not None else chat_turns(messages), known.completion
    if body.user is None or body.completion is None:
        missing = "user" if body.user is None else "completion"
        raise ApiError(400, f"{missing}: give completion_id, or user, prompt|messages and completion", param=missing)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of prompt and messages", param="prompt")
    prompt = body.prompt if body.prompt is not None else chat_turns(body.messages or [])
    return body.user, prompt, body.completion


@dataclass(frozen=True)
class Memory:
    """Where and as what a completion is remembered once its text is known."""

    log: CompletionLog
    tenant: str
    user_id: str
    prompt: str | None
    messages: list[dict[str, Any]] | None

    def new_id(self, prefix: str) -> str:
        return new_completion_id(prefix, self.tenant, self.user_id)

    async def keep(self, completion_id: str, text: str) -> None:
        entry = Remembered(self.user_id, self.prompt, self.messages, text)
        await run_in_threadpool(self.log.remember, self.tenant, completion_id, entry)


async def _generate(
    model_name: str,
    caller: Caller,
    body: CompletionRequest | ChatCompletionRequest,
    prompt: Prompt,
    memory: Memory | None,
    request: Request,
) -> JSONResponse | StreamingResponse:
    if body.n != 1:
        raise ApiError(400, f"n: only n=1 is supported, got {body.n}", param="n")
    if (refused := body.unsupported()) is not None:
        raise ApiError(400, refused[1], param=refused[0])
    chat = isinstance(body, ChatCompletionRequest)
    options: dict[str, Any] = {
        "max_new_tokens": body.new_tokens(),
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed or 0,
        "stop": body.stops(),
        "use_base_model": not body.user,
        "top_k": max(body.top_k, 0),
        "repetition_penalty": body.repetition_penalty,
    }
    sdk, user = caller.client, body.user or ANONYMOUS
    prefix = "chatcmpl" if chat else "cmpl"
    ident = memory.new_id(prefix) if memory is not None else f"{prefix}-{uuid.uuid4().hex}"
    model = body.model or model_name
    if body.stream:
        stream = sdk.generate_stream(user, prompt, **options)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        timing = Timing(request.scope.get(TTFT_KEY, time.perf_counter()), request.app.state.metrics, request.url.path)
        return StreamingResponse(
            _sse(stream, ident, model, chat, include_usage, memory, timing), media_type="text/event-stream"
        )
    response = await sdk.agenerate(user, prompt, **options)
    if memory is not None:
        await memory.keep(ident, response.text)
    finish = FINISH.get(response.finish_reason, "stop")
    choice: dict[str, Any] = (
        {"index": 0, "message": {"role": "assistant", "content": response.text}, "finish_reason": finish}
        if chat
        else {"index": 0, "text": response.text, "logprobs": None, "finish_reason": finish}
    )
    return JSONResponse(
        {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": _usage(response),
        },
        headers=_headers(response),
    )


@dataclass(frozen=True)
class Timing:
    """When the request began, and where its time to first token is recorded."""

    start: float
    metrics: HttpMetrics
    route: str

    def first_token(self) -> None:
        self.metrics.ttft.labels(self.route).observe(time.perf_counter() - self.start)


async def _sse(
    stream: Any, ident: str, model: str, chat: bool, include_usage: bool, memory: Memory | None, timing: Timing
) -> AsyncIterator[str]:
    """OpenAI's chunks as SSE; leaving early (the client disconnected) cancels the gRPC call."""
    now = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: dict[str, Any] | None, **extra: Any) -> str:
        payload = {
            "id": ident,
            "object": kind,
            "created": now,
            "model": model,
            "choices": [choice] if choice else [],
            **extra,
        }
        return f"data: {json.dumps(payload)}\n\n"

    def piece(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    texts: list[str] = []
    try:
        if chat:
            yield chunk(piece("", None, first=True))
        try:
            async for text in _pieces(stream):
                if not texts:
                    timing.first_token()
                texts.append(text)
                yield chunk(piece(text, None))
            if memory is not None:
                await memory.keep(ident, "".join(texts))
        except (PersonalizeClientError, errors.PersonalizeError) as exc:  # headers are sent: an error event
            failed = exc if isinstance(exc, PersonalizeClientError) else as_client_error(exc)
            _, type_ = status_of_error(failed)
            yield f"data: {json.dumps(error_body(failed.details(), type_, None, failed.code().name.lower()))}\n\n"
            yield "data: [DONE]\n\n"
            return
        final = stream.response
        finish = FINISH.get(final.finish_reason, "stop") if final is not None else "stop"
        yield chunk(piece(None, finish))
        if include_usage and final is not None:
            yield chunk(None, usage=_usage(final))
        yield "data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        stream.cancel()
        raise
    finally:
        stream.cancel()


_PUMPS: set[asyncio.Future[None]] = set()
"""The threads reading a stream for `_pieces`, while they run."""


async def _pieces(stream: Any) -> AsyncIterator[str]:
    """The stream's text pieces on the event loop. One pool thread reads the whole gRPC stream and hands each
    piece over as it arrives: one wake of the loop per piece, where iterating in the thread pool cost two
    thread hops per piece. Raises what iterating raised; leaving early cancels the call and ends the thread."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str | None, BaseException | None]] = asyncio.Queue()
    left = threading.Event()

    def hand_over(item: tuple[str | None, BaseException | None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is reading
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def pump() -> None:
        try:
            for text in stream:
                if left.is_set():  # the reader left before the call had started: cancel it now
                    stream.cancel()
                    return
                hand_over((text, None))
        except Exception as exc:  # relayed to the reader, raised there
            hand_over((None, exc))
            return
        hand_over((None, None))

    reader = asyncio.ensure_future(anyio.to_thread.run_sync(pump))
    _PUMPS.add(reader)  # the loop keeps only a weak reference to a task
    reader.add_done_callback(_PUMPS.discard)
    try:
        while True:
            text, failed = await queue.get()
            if failed is not None:
                raise failed
            if text is None:
                return
            yield text
    finally:
        left.set()
        stream.cancel()


def _usage(response: Any) -> dict[str, int]:
    return {
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
        "total_tokens": response.prompt_tokens + response.completion_tokens,
    }


def _headers(response: Any) -> dict[str, str]:
    return {
        "x-personalize-adapter-version": str(response.adapter_version),
        "x-personalize-cache-tier": response.cache_tier,
        "x-personalize-node": response.node_id,
    }
