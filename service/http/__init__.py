"""The OpenAI-compatible HTTP edge: `create_app` (FastAPI) and `serve_http` (uvicorn in a thread).

It holds no engine: every request becomes a gRPC call through the client SDK, with the request's
`Authorization: Bearer KEY` passed through as the tenant key and `user` as the user id.
"""

from personalize_service.http.app import CHAT_TEMPLATE_DOC, create_app, render_chat
from personalize_service.http.serve import GatewayConfig, HttpServer, serve_http

__all__ = ["CHAT_TEMPLATE_DOC", "GatewayConfig", "HttpServer", "create_app", "render_chat", "serve_http"]
