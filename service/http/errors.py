"""OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`) for every failure of the edge, with
the HTTP status of the gRPC code (ERROR_STATUS), never a traceback."""

from __future__ import annotations

from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from personalize import errors
from personalize_service.client import PersonalizeClientError
from personalize_service.server.errors import message_of, status_of

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
(RESOURCE_EXHAUSTED naming bytes) is 413; see `status_of_error`."""
RETRY_AFTER_S = "1"


class ApiError(Exception):
    """A request the edge itself refuses, with its HTTP status and OpenAI error fields."""

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


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def status_of_error(exc: PersonalizeClientError) -> tuple[int, str]:
    status, type_ = ERROR_STATUS.get(exc.code(), (500, "server_error"))
    if status == 429 and "bytes" in exc.details():
        return 413, "invalid_request_error"
    return status, type_


def error_response(exc: PersonalizeClientError) -> JSONResponse:
    status, type_ = status_of_error(exc)
    headers = {"Retry-After": RETRY_AFTER_S} if status in (429, 503) else None
    return JSONResponse(error_body(exc.details(), type_, None, exc.code().name.lower()), status, headers=headers)


def as_client_error(exc: errors.PersonalizeError) -> PersonalizeClientError:
    """A domain error raised in the edge itself (its own key check, the completion log) as the gRPC error
    a worker would have answered."""
    return PersonalizeClientError(status_of(exc) or grpc.StatusCode.INTERNAL, message_of(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Every failure as OpenAI's error JSON."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status)

    @app.exception_handler(PersonalizeClientError)
    async def _grpc_error(_: Request, exc: PersonalizeClientError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(errors.PersonalizeError)
    async def _domain_error(_: Request, exc: errors.PersonalizeError) -> JSONResponse:
        return error_response(as_client_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # loc is ("body", offset), not a field
            where = first.get("loc", ("body", "?"))[-1]
            why = first.get("ctx", {}).get("error", first.get("msg", ""))
            message = f"the request body is not valid JSON: {why} at character {where}"
            return JSONResponse(error_body(message, "invalid_request_error", None, None), 400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return JSONResponse(
            error_body(
                f"{param or 'body'}: {first.get('msg', 'invalid request').removeprefix('Value error, ')}",
                "invalid_request_error",
                param,
                None,
            ),
            400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, None), exc.status_code)

    @app.exception_handler(Exception)
    async def _any(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error ({type(exc).__name__})", "server_error", None, None), 500)
