"""Adapter management over HTTP, mirroring the gRPC API for operators without gRPC tooling:

    GET    /v1/users/{user}/adapter                  GetAdapter, as JSON
    DELETE /v1/users/{user}/adapter                  DeleteUser: {versions_deleted, events_deleted}
    GET    /v1/users/{user}/adapter/export?version=N ExportAdapter: application/zip of the PEFT files
                                                     (adapter_config.json, adapter_model.safetensors)
    POST   /v1/users/{user}/adapter/import           ImportAdapter: multipart/form-data, one part per PEFT
                                                     file, named by its filename (curl -F f=@adapter_config.json)

Export is a zip (not multipart) because every tool unpacks one (`curl -o a.zip URL && unzip a.zip`), and PEFT
loads the unpacked directory as it is.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import zipfile
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from personalize_service.http.errors import ApiError

MAX_IMPORT_BYTES = 128 << 20
"""Largest import body (the worker holds each file to 64 MiB)."""


def adapter_json(message: Any) -> dict[str, Any]:
    """A flat message (AdapterInfo, DeleteUserResponse) as JSON with every field, numbers as numbers (not
    proto3 JSON's strings for 64-bit integers)."""
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}


def parse_multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """File name -> bytes of every part of a multipart/form-data body (the part's filename, else its field
    name). Raises ApiError 400 when the body is not multipart or has no file."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(400, "import takes multipart/form-data, one part per PEFT file", param="content-type")
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    files: dict[str, bytes] = {}
    for part in message.iter_parts() if message.is_multipart() else ():
        name = part.get_filename() or part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            files[name.rsplit("/", 1)[-1]] = payload
    if not files:
        raise ApiError(400, "the multipart body has no file parts", param="files")
    return files


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in sorted(files.items()):
            archive.writestr(name, data)
    return buffer.getvalue()


def install_adapter_routes(app: FastAPI, client: Callable[[Request], Any]) -> None:
    """The routes above; `client(request)` is the Caller of the request's key."""

    @app.get("/v1/users/{user}/adapter")
    async def get_adapter(user: str, request: Request) -> dict[str, Any]:
        sdk = client(request).client
        return adapter_json(await run_in_threadpool(sdk.get_adapter, user))

    @app.delete("/v1/users/{user}/adapter")
    async def delete_adapter(user: str, request: Request) -> dict[str, Any]:
        sdk = client(request).client
        done = await run_in_threadpool(sdk.delete_user, user)
        return {"object": "user.deleted", "user": user, **adapter_json(done)}

    @app.get("/v1/users/{user}/adapter/export")
    async def export_adapter(user: str, request: Request, version: int = 0) -> Response:
        sdk = client(request).client
        exported = await run_in_threadpool(sdk.export_adapter, user, version)
        return Response(
            zip_of(exported.files),
            media_type="application/zip",
            headers={
                "content-disposition": f'attachment; filename="adapter-v{exported.info.version}.zip"',
                "x-personalize-adapter-version": str(exported.info.version),
            },
        )

    @app.post("/v1/users/{user}/adapter/import")
    async def import_adapter(user: str, request: Request) -> dict[str, Any]:
        sdk = client(request).client
        files = parse_multipart(request.headers.get("content-type", ""), await request.body())
        return adapter_json(await run_in_threadpool(sdk.import_adapter, user, files))
