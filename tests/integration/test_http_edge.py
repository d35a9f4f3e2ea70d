"""The HTTP edge without a server behind it: the chat template, the gRPC-code -> HTTP-status table, and a
dead gRPC target answered as OpenAI's 503 error with Retry-After (a real channel to a port nobody holds)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from fastapi.testclient import TestClient
from transformers import ByT5Tokenizer

from personalize.engine.text import BUILTIN_CHAT_TEMPLATE
from personalize_service.client import PersonalizeClient, PersonalizeClientError
from personalize_service.http import chat_turns, create_app
from personalize_service.http.app import Caller
from personalize_service.http.errors import error_response
from personalize_service.http.models import UNSUPPORTED, ChatMessage
from personalize_service.net import find_free_port


def test_chat_goes_as_messages_which_the_builtin_template_renders_then_the_assistant_turn() -> None:
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]
    turns = chat_turns(messages)
    assert turns == [("system", "Be brief."), ("user", "Hi")]
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = BUILTIN_CHAT_TEMPLATE
    chat = [{"role": role, "content": content} for role, content in turns]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"


@pytest.mark.parametrize(
    ("code", "details", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "bad", 400),
        (grpc.StatusCode.UNAUTHENTICATED, "key", 401),
        (grpc.StatusCode.PERMISSION_DENIED, "no", 403),
        (grpc.StatusCode.NOT_FOUND, "who", 404),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "request of 9000 bytes over the limit", 413),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit", 429),
        (grpc.StatusCode.UNAVAILABLE, "down", 503),
        (grpc.StatusCode.INTERNAL, "oops", 500),
    ],
)
def test_grpc_codes_map_to_http_statuses(code: grpc.StatusCode, details: str, status: int) -> None:
    response = error_response(PersonalizeClientError(code, details))
    assert response.status_code == status
    assert ("retry-after" in response.headers) == (status in (429, 503))


@pytest.fixture
def dead() -> Iterator[TestClient]:
    sdk = PersonalizeClient(f"127.0.0.1:{find_free_port()}", timeout=5, retries=0)
    with TestClient(create_app(lambda _key: Caller(sdk), "tiny")) as client:
        yield client
    sdk.close()


def test_a_dead_worker_is_openais_503_with_retry_after(dead: TestClient) -> None:
    reply = dead.post("/v1/completions", json={"prompt": "hi", "user": "alice"})
    assert reply.status_code == 503 and reply.headers["retry-after"]
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert dead.get("/readyz").status_code == 503 and dead.get("/healthz").status_code == 200


def test_bad_requests_name_the_field(dead: TestClient) -> None:
    reply = dead.post("/v1/chat/completions", json={"messages": []})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    reply = dead.post("/v1/completions", json={"prompt": "hi", "n": 3})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n"
    reply = dead.post("/v1/feedback", json={"user": "a", "completion": "c", "kind": "accept"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"
    for field, value in (("max_tokens", 2**40), ("max_completion_tokens", 2**32), ("seed", -1), ("seed", 2**64)):
        reply = dead.post("/v1/completions", json={"prompt": "hi", field: value})  # out of the proto field's range
        assert reply.status_code == 400 and reply.json()["error"]["param"] == field, (field, value, reply.text)


def test_a_body_over_the_limit_is_413_before_it_is_read(dead: TestClient) -> None:
    from personalize_service.http.app import MAX_BODY_BYTES

    response = dead.post(
        "/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "limit" in response.json()["error"]["message"]
    small = dead.post("/v1/completions", json={"prompt": "Hi", "n": 2})
    assert small.status_code == 400  # a body under the limit still reaches validation


def test_a_chunked_body_over_the_limit_is_413(dead: TestClient) -> None:
    from personalize_service.http.app import MAX_BODY_BYTES

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent with Transfer-Encoding: chunked
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    response = dead.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    small = dead.post(
        "/v1/completions",
        content=iter([b'{"prompt": "Hi",', b' "n": 2}']),
        headers={"content-type": "application/json"},
    )
    assert small.status_code == 400 and small.json()["error"]["param"] == "n"  # a small chunked body is read


def test_a_chat_message_without_content_is_400_naming_it(dead: TestClient) -> None:
    reply = dead.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}, {"role": "user"}]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages.1.content"


def test_the_edge_runs_blocking_calls_on_more_threads_than_anyios_default(dead: TestClient) -> None:
    import anyio

    from personalize_service.http.app import BLOCKING_THREADS

    async def tokens() -> float:
        return anyio.to_thread.current_default_thread_limiter().total_tokens

    assert dead.portal is not None and dead.portal.call(tokens) == BLOCKING_THREADS > 40


REFUSED = [
    ("/v1/completions", "echo", True),
    ("/v1/completions", "logprobs", 0),  # completions' logprobs=0 still asks for the chosen tokens' logprobs
    ("/v1/completions", "logprobs", 2),
    ("/v1/chat/completions", "logprobs", True),
    ("/v1/chat/completions", "top_logprobs", 3),
    ("/v1/completions", "frequency_penalty", 0.5),
    ("/v1/chat/completions", "presence_penalty", -1.0),
    ("/v1/completions", "logit_bias", {"50": 100}),
    ("/v1/completions", "best_of", 3),
    ("/v1/completions", "suffix", " end"),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "functions", [{"name": "f"}]),
    ("/v1/chat/completions", "function_call", {"name": "f"}),
]
NEUTRAL = {
    "echo": False,
    "logprobs": None,
    "top_logprobs": 0,
    "frequency_penalty": 0,
    "presence_penalty": 0.0,
    "logit_bias": {},
    "best_of": 1,
    "suffix": "",
    "response_format": {"type": "text"},
    "tools": [],
    "tool_choice": "auto",
    "functions": None,
    "function_call": "none",
}
"""What SDKs send by default: it changes nothing, so it must reach the worker (here a dead one: 503)."""


def _body(route: str, **fields: Any) -> dict[str, Any]:
    what = {"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    return {**what, "user": "alice", **fields}


@pytest.mark.parametrize(("route", "field", "value"), REFUSED)
def test_an_output_changing_option_this_server_lacks_is_400_naming_it(
    dead: TestClient, route: str, field: str, value: Any
) -> None:
    reply = dead.post(route, json=_body(route, **{field: value}))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and "not supported" in error["message"], error


def test_the_neutral_values_sdks_send_by_default_are_accepted(dead: TestClient) -> None:
    assert set(NEUTRAL) == set(UNSUPPORTED)
    for route in ("/v1/completions", "/v1/chat/completions"):
        reply = dead.post(route, json=_body(route, **NEUTRAL))
        assert reply.status_code == 503, reply.text  # past validation, to the (dead) worker


def test_chat_content_parts_join_as_text() -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    assert ChatMessage(role="user", content=parts).content == "Hello\nworld"


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages.0.content",
            "'image_url'; only text parts",
        ),
        ({"messages": [{"role": "user", "content": [{"text": "no type"}]}]}, "messages.0.content", "only text"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role", "'assistant'"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.role", "'user'"),
    ],
)
def test_chat_messages_this_server_cannot_render_are_400_naming_them(
    dead: TestClient, fields: dict[str, Any], param: str, says: str
) -> None:
    reply = dead.post("/v1/chat/completions", json=fields)
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == param and says in error["message"], error
    assert not error["message"].startswith(f"{param}: Value error"), error


def test_a_token_id_prompt_and_a_broken_body_are_400_saying_so(dead: TestClient) -> None:
    reply = dead.post("/v1/completions", json={"prompt": [1, 2, 3]})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "prompt" and "token-id prompts" in error["message"]
    reply = dead.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] is None and "not valid JSON" in error["message"], error


def test_a_model_is_retrieved_by_its_id_and_another_is_404(dead: TestClient) -> None:
    reply = dead.get("/v1/models/tiny")
    assert reply.status_code == 200 and reply.json()["id"] == "tiny" and reply.json()["object"] == "model"
    assert reply.json() == dead.get("/v1/models").json()["data"][0]
    reply = dead.get("/v1/models/gpt-4o")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
