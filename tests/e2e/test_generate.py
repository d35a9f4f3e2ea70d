"""`personalize up` over gRPC: health, reflection, and base-model generations equal to transformers' own."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from personalize.model import BaseModel
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from tests.e2e.upserver import Stubs, UpServer, greedy_reference

PROMPTS = [
    pytest.param("Hello, world", 24, id="ascii"),
    pytest.param("What is 2+2?", 48, id="ends-at-eos"),
    pytest.param("日本語のテキスト", 24, id="multibyte"),
    pytest.param("a" * 200, 16, id="long-prompt"),
]


def test_health_is_serving(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "personalize.v1.Personalize", "personalize.v1.Admin"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"personalize.v1.Personalize", "personalize.v1.Admin", "grpc.health.v1.Health"} <= names


def test_start_says_there_are_no_api_keys(up_server: UpServer) -> None:
    assert "no API keys configured: accepting tenant 'default' without a key" in up_server.log()


@pytest.mark.parametrize(("prompt", "max_new_tokens"), PROMPTS)
def test_generate_without_adapter_is_the_base_models_greedy_output(
    stubs: Stubs, base: BaseModel, prompt: str, max_new_tokens: int
) -> None:
    request = pb.GenerateRequest(user_id="no-adapter-user", prompt=prompt, max_new_tokens=max_new_tokens)
    unary = stubs.api.Generate(request, timeout=120)
    chunks = list(stubs.api.GenerateStream(request, timeout=120))

    assert (unary.adapter_version, unary.cache_tier, unary.node_id) == (0, "none", "worker-0")
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].final == unary
    assert "".join(c.text for c in chunks) == unary.text
    expected_text, expected_finish = greedy_reference(base.model, base.tokenizer, prompt, max_new_tokens)
    assert (unary.text, unary.finish_reason) == (expected_text, expected_finish)
    assert unary.prompt_tokens == len(base.tokenizer.encode(prompt, add_special_tokens=False))
    if expected_finish == "length":
        assert unary.completion_tokens == max_new_tokens


def test_stop_string_ends_the_text_before_it(stubs: Stubs) -> None:
    full = stubs.api.Generate(pb.GenerateRequest(user_id="u", prompt="Hello, world", max_new_tokens=24), timeout=60)
    stop = full.text[5:8]
    cut = stubs.api.Generate(
        pb.GenerateRequest(user_id="u", prompt="Hello, world", max_new_tokens=24, stop=[stop]), timeout=60
    )
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]


def test_sampling_is_reproducible_by_seed(stubs: Stubs) -> None:
    def sample(seed: int) -> str:
        request = pb.GenerateRequest(user_id="u", prompt="Hello", max_new_tokens=16, temperature=1.0, seed=seed)
        return stubs.api.Generate(request, timeout=60).text

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_deadline_is_honoured(stubs: Stubs) -> None:
    request = pb.GenerateRequest(user_id="u", prompt="Hello, world", max_new_tokens=512)
    with pytest.raises(grpc.RpcError) as raised:
        stubs.api.Generate(request, timeout=0.05)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 30
    while stubs.admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes[0].load:  # the engine dropped it
        assert time.monotonic() < deadline, "the expired call kept running"
        time.sleep(0.05)
    after = stubs.api.Generate(pb.GenerateRequest(user_id="u", prompt="x", max_new_tokens=2), timeout=60)
    assert after.finish_reason in ("length", "eos")


def test_a_call_without_deadline_is_served(stubs: Stubs) -> None:
    request = pb.GenerateRequest(user_id="u", prompt="Hello, world", max_new_tokens=4)
    assert stubs.api.Generate(request).completion_tokens == 4  # grpcurl and others send no deadline
    assert list(stubs.api.GenerateStream(request))[-1].final.completion_tokens == 4


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("user_id", "", "user_id is empty"),
        ("user_id", "bad\nid", "control character"),
        ("max_new_tokens", 100000, "max_new_tokens is 100000; the limit is 512"),
        ("prompt", "p" * 20000, "max_prompt_bytes"),
        ("temperature", -1.0, "temperature must be in [0, 100]"),
    ],
)
def test_bad_generate_input_is_invalid_argument(stubs: Stubs, field: str, value: object, message: str) -> None:
    request = pb.GenerateRequest(user_id="u", prompt="hi", max_new_tokens=4)
    setattr(request, field, value)
    for call in (stubs.api.Generate, lambda r, timeout: list(stubs.api.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as raised:
            call(request, timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in raised.value.details()


def test_a_chat_of_more_messages_than_the_limit_is_refused_before_it_is_rendered(stubs: Stubs) -> None:
    turn = pb.ChatMessage(role="user", content="x")
    over = pb.GenerateRequest(user_id="u", messages=[turn] * 1025, max_new_tokens=2)
    with pytest.raises(grpc.RpcError) as raised:
        stubs.api.Generate(over, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages has 1025 messages; the limit is 1024 (max_chat_messages)" in raised.value.details()
    at_limit = pb.GenerateRequest(user_id="u", messages=[turn] * 1024, max_new_tokens=2)
    with pytest.raises(grpc.RpcError) as rendered:  # rendered, then too long for the tiny model's context
        stubs.api.Generate(at_limit, timeout=30)
    assert rendered.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the context limit is" in rendered.value.details()
    few = pb.GenerateRequest(user_id="u", messages=[turn] * 8, max_new_tokens=2)
    assert stubs.api.Generate(few, timeout=30).completion_tokens >= 1


def test_list_nodes_shows_this_node(stubs: Stubs, up_server: UpServer) -> None:
    nodes = stubs.admin.ListNodes(pb.ListNodesRequest(), timeout=10).nodes
    assert [(n.node_id, n.address, n.state) for n in nodes] == [("worker-0", up_server.target, "up")]
    assert nodes[0].capacity == 32


def test_feedback_is_durable_and_idempotent_per_event_key(stubs: Stubs) -> None:
    request = pb.FeedbackRequest(
        user_id="fb-u", prompt="p", completion="c", kind=pb.FeedbackRequest.ACCEPT, event_key="k-1"
    )
    first = stubs.api.SubmitFeedback(request, timeout=10)
    again = stubs.api.SubmitFeedback(request, timeout=10)
    assert first.event_id and first.event_id == again.event_id and first.partition == again.partition
    with pytest.raises(grpc.RpcError) as raised:
        stubs.api.SubmitFeedback(
            pb.FeedbackRequest(user_id="fb-u", prompt="p", completion="c", kind=pb.FeedbackRequest.PREFER), timeout=10
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
