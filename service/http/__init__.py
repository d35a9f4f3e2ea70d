"""The OpenAI-compatible HTTP edge: `create_app` (FastAPI) and `serve_http` (uvicorn in a thread).

It holds no engine: every request becomes a gRPC call through the client SDK, with the request's
`Authorization: Bearer KEY` passed through as the tenant key and `user` as the user id.
"""

from personalize_service.http.app import chat_turns, create_app
from personalize_service.http.serve import GatewayConfig, HttpServer, serve_http

__all__ = ["GatewayConfig", "HttpServer", "chat_turns", "create_app", "serve_http"]
