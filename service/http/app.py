"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions, /v1/models, plus /v1/feedback.

Each request is one gRPC call through the client SDK (`client_for(api_key)`), so routing happens where
the SDK routes. Errors are OpenAI's `{"error": {"message", "type", "param", "code"}}` with the HTTP
status of the gRPC code (ERROR_STATUS), never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from personalize_service.client import PersonalizeClient, PersonalizeClientError
from personalize_service.http.models import ChatCompletionRequest, ChatMessage, CompletionRequest, FeedbackBody

CHAT_TEMPLATE_DOC = """Chat messages become one prompt as `<|ROLE|>\\nCONTENT\\n` per message, then
`<|assistant|>\\n` for the answer (the built-in tiny model has no chat template of its own)."""

ERROR_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.DATA_LOSS: (500, "server_error"),
}
"""gRPC code -> (HTTP status, OpenAI error type); other codes are 500 server_error. A size limit
(RESOURCE_EXHAUSTED naming bytes) is 413; see `_status_of`."""
RETRY_AFTER_S = "1"
ANONYMOUS = "anonymous"
"""The user id sent (with use_base_model) for a request without `user`: the base model serves it."""
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
"""The engine's finish reasons as OpenAI's."""


def render_chat(messages: list[ChatMessage]) -> str:
    """The prompt of a chat (CHAT_TEMPLATE_DOC). A real model's own template, applied through its
    tokenizer, is a later step."""
    return "".join(f"<|{m.role}|>\n{m.content or ''}\n" for m in messages) + "<|assistant|>\n"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _status_of(exc: PersonalizeClientError) -> tuple[int, str]:
    status, type_ = ERROR_STATUS.get(exc.code(), (500, "server_error"))
    if status == 429 and "bytes" in exc.details():
        return 413, "invalid_request_error"
    return status, type_


def error_response(exc: PersonalizeClientError) -> JSONResponse:
    status, type_ = _status_of(exc)
    headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else None
    return JSONResponse(_body(exc.details(), type_, None, exc.code().name.lower()), status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's error JSON."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(_body(exc.message, exc.type, exc.param, exc.code), exc.status)

    @app.exception_handler(PersonalizeClientError)
    async def _grpc_error(_: Request, exc: PersonalizeClientError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return JSONResponse(
            _body(f"{param or 'body'}: {first.get('msg', 'invalid request')}", "invalid_request_error", param, None),
            400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_body(str(exc.detail), "invalid_request_error", None, None), exc.status_code)

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(_body(f"internal error ({type(exc).__name__})", "server_error", None, None), 500)


MAX_BODY_BYTES = 1 << 20
"""Largest request body read (a prompt is at most 16 KiB on the worker): a larger declared Content-Length is
413 before a byte of it is read or parsed, so no caller makes the edge buffer and forward megabytes."""


def _install_body_limit(app: FastAPI) -> None:
    @app.middleware("http")
    async def _limit(request: Request, call_next: Callable[[Request], Any]) -> Any:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse(
                _body(
                    f"request body is {length} bytes; the limit is {MAX_BODY_BYTES}",
                    "invalid_request_error",
                    None,
                    "request_too_large",
                ),
                413,
            )
        return await call_next(request)


def create_app(
    client_for: Callable[[str | None], PersonalizeClient], model_name: str, fingerprint: str = ""
) -> FastAPI:
    """The app; `client_for(api_key)` gives the SDK client sending that key (None = no key)."""
    app = FastAPI(title="personalize (OpenAI-compatible)", docs_url=None, redoc_url=None)
    created = int(time.time())

    _install_error_handlers(app)
    _install_body_limit(app)

    def client(request: Request) -> PersonalizeClient:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        return client_for(key or None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        try:
            await run_in_threadpool(client_for(None).list_nodes)
        except PersonalizeClientError as exc:
            if exc.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return JSONResponse({"status": "unavailable", "reason": exc.details()}, 503)
        return JSONResponse({"status": "ready"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "personalize",
                    "fingerprint": fingerprint,
                }
            ],
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: exactly one prompt per request is supported", param="prompt")
        return await _generate(model_name, client(request), body, prompts[0], chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        return await _generate(model_name, client(request), body, render_chat(body.messages), chat=True)

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackBody, request: Request) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of prompt and messages", param="prompt")
        prompt = body.prompt if body.prompt is not None else render_chat(body.messages or [])
        sdk = client(request)
        ack = await run_in_threadpool(
            lambda: sdk.feedback(
                body.user,
                prompt,
                body.completion,
                body.kind,
                correction=body.correction,
                rejected=body.rejected,
                event_key=body.event_key,
            )
        )
        return {"object": "feedback", "event_id": ack.event_id, "partition": ack.partition}

    return app


async def _generate(
    model_name: str, sdk: PersonalizeClient, body: CompletionRequest | ChatCompletionRequest, prompt: str, *, chat: bool
) -> JSONResponse | StreamingResponse:
    if body.n != 1:
        raise ApiError(400, f"n: only n=1 is supported, got {body.n}", param="n")
    options: dict[str, Any] = {
        "max_new_tokens": body.new_tokens(),
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed or 0,
        "stop": body.stops(),
        "use_base_model": not body.user,
    }
    user = body.user or ANONYMOUS
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    model = body.model or model_name
    if body.stream:
        stream = sdk.generate_stream(user, prompt, **options)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(stream, ident, model, chat, include_usage), media_type="text/event-stream")
    response = await run_in_threadpool(lambda: sdk.generate(user, prompt, **options))
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


async def _sse(stream: Any, ident: str, model: str, chat: bool, include_usage: bool) -> AsyncIterator[str]:
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

    pieces: Iterator[str] = iter(stream)
    try:
        if chat:
            yield chunk(piece("", None, first=True))
        try:
            async for text in iterate_in_threadpool(pieces):
                yield chunk(piece(text, None))
        except PersonalizeClientError as exc:
            _, type_ = _status_of(exc)
            yield f"data: {json.dumps(_body(exc.details(), type_, None, exc.code().name.lower()))}\n\n"
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
