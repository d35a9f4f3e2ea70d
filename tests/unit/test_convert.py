"""Translations between API messages and library types."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from personalize.engine.text import ChatMessage
from personalize.engine.types import GenerationResult, SamplingParams
from personalize.errors import InvalidArgument
from personalize.lora.format import canonical_safetensors
from personalize.worker import AdapterInfo, GenerationInfo, NodeStats
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.server import convert
from personalize_service.server.limits import Limits

LIMITS = Limits()
RESULT = GenerationResult(text="Hello!", prompt_tokens=7, completion_tokens=3, finish_reason="stop")
INFO = GenerationInfo(adapter_version=4, cache_tier="host", node_id="worker-0")


def test_generate_request_defaults_mean_greedy_default_budget_no_truncation() -> None:
    args = convert.generate_args(pb.GenerateRequest(user_id="alice", prompt="Hi"), LIMITS)
    assert args == convert.GenerateArgs("alice", "Hi", SamplingParams(max_new_tokens=64), False)
    assert args.params.temperature == 0.0 and args.params.top_p == 1.0


def test_generate_request_fields_are_carried() -> None:
    request = pb.GenerateRequest(
        user_id="bob",
        prompt="p",
        max_new_tokens=12,
        temperature=0.5,
        top_p=0.25,
        seed=2**63 + 5,
        stop=["\n", "END"],
        use_base_model=True,
    )
    user_id, prompt, params, use_base_model = convert.generate_args(request, LIMITS)
    assert (user_id, prompt, use_base_model) == ("bob", "p", True)
    assert params == SamplingParams(max_new_tokens=12, temperature=0.5, top_p=0.25, seed=2**63 + 5, stop=("\n", "END"))


def test_chat_and_sampling_options_are_carried() -> None:
    request = pb.GenerateRequest(
        user_id="bob",
        messages=[pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user", content="Hi")],
        top_k=40,
        repetition_penalty=1.3,
        logprobs=True,
    )
    args = convert.generate_args(request, LIMITS)
    assert args.prompt == (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"))
    assert (args.params.top_k, args.params.logprobs) == (40, True)
    assert args.params.repetition_penalty == pytest.approx(1.3)
    assert convert.generate_args(pb.GenerateRequest(user_id="b", prompt="p"), LIMITS).params.repetition_penalty == 1.0
    feedback = pb.FeedbackRequest(
        user_id="bob", messages=request.messages, completion="a", kind=pb.FeedbackRequest.ACCEPT
    )
    assert convert.feedback_args(feedback, LIMITS).messages == args.prompt
    feedback.prompt = "also a prompt"
    with pytest.raises(InvalidArgument, match="exactly one of prompt and messages"):
        convert.feedback_args(feedback, LIMITS)
    with_logprobs = GenerationResult("Hi", 2, 2, "length", logprobs=(-0.5, -1.25))
    assert list(convert.generate_response(with_logprobs, INFO).token_logprobs) == [-0.5, -1.25]


def test_negative_top_k_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="top_k must be >= 0"):
        SamplingParams(top_k=-1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"user_id": ""}, "user_id is empty"),
        ({"prompt": "x" * 20000}, "prompt is 20000 bytes"),
        ({"max_new_tokens": 10_000}, "max_new_tokens is 10000; the limit is 512"),
        ({"temperature": -1.0}, "temperature must be in"),
        ({"temperature": float("nan")}, "temperature must be in"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"stop": [""]}, "stop strings must be non-empty"),
        ({"repetition_penalty": -0.5}, "repetition_penalty must be > 0"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty must be > 0"),
        ({"repetition_penalty": 1000.0}, "repetition_penalty must be in"),
        ({"messages": [pb.ChatMessage(role="user", content="x")]}, "exactly one of prompt and messages"),
        ({"prompt": "", "messages": [pb.ChatMessage(role="", content="x")]}, r"messages\[0\].role is empty"),
        ({"prompt": "", "messages": [pb.ChatMessage(role="user", content="x" * 20000)]}, "messages is 20004 bytes"),
        (
            {"prompt": "", "messages": [pb.ChatMessage(role="user", content="x")] * 1025},
            r"messages has 1025 messages; the limit is 1024 \(max_chat_messages\)",
        ),
    ],
)
def test_bad_generate_requests_are_invalid_argument(fields: dict[str, object], message: str) -> None:
    request = pb.GenerateRequest(**{"user_id": "alice", "prompt": "Hi", **fields})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=message):
        convert.generate_args(request, LIMITS)


def test_generate_response_and_chunks() -> None:
    response = convert.generate_response(RESULT, INFO)
    assert response == pb.GenerateResponse(
        text="Hello!",
        adapter_version=4,
        node_id="worker-0",
        cache_tier="host",
        prompt_tokens=7,
        completion_tokens=3,
        finish_reason="stop",
    )
    assert convert.text_chunk("Hel") == pb.GenerateChunk(text="Hel")
    final = convert.final_chunk(RESULT, INFO)
    assert final.done and final.text == "" and final.final == response


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (pb.FeedbackRequest.ACCEPT, "accept"),
        (pb.FeedbackRequest.REJECT, "reject"),
        (pb.FeedbackRequest.CORRECT, "correct"),
        (pb.FeedbackRequest.PREFER, "prefer"),
    ],
)
def test_feedback_kinds(kind: int, name: str) -> None:
    request = pb.FeedbackRequest(
        user_id="alice",
        prompt="q",
        completion="a",
        kind=kind,  # type: ignore[arg-type]
        correction="c",
        rejected="r",
        event_key="k1",
    )
    args = convert.feedback_args(request, LIMITS)
    assert args == convert.FeedbackArgs("alice", "q", "a", name, "c", "r", "k1")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": pb.FeedbackRequest.KIND_UNSPECIFIED}, "one of ACCEPT, REJECT, CORRECT, PREFER, got KIND_UNSPECIFIED"),
        ({"kind": 17}, "got 17"),
        ({"kind": pb.FeedbackRequest.CORRECT}, "CORRECT needs a non-empty correction"),
        ({"kind": pb.FeedbackRequest.PREFER}, "PREFER needs a non-empty rejected"),
        ({"completion": "x" * 20000}, "completion is 20000 bytes; the limit is 16384"),
        ({"event_key": "k" * 300}, "event_key is 300 bytes"),
        ({"user_id": "a\x00"}, "control character"),
    ],
)
def test_bad_feedback_is_invalid_argument(fields: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"user_id": "alice", "prompt": "q", "completion": "a", "kind": pb.FeedbackRequest.ACCEPT}
    with pytest.raises(InvalidArgument, match=message):
        convert.feedback_args(pb.FeedbackRequest(**{**base, **fields}), LIMITS)  # type: ignore[arg-type]


def test_a_chat_at_the_message_limit_is_carried_and_one_more_is_refused_in_feedback_too() -> None:
    turn = pb.ChatMessage(role="user", content="x")
    limits = Limits(max_chat_messages=3)
    at_limit = pb.GenerateRequest(user_id="alice", messages=[turn] * 3)
    assert convert.generate_args(at_limit, limits).prompt == (ChatMessage("user", "x"),) * 3
    over = pb.FeedbackRequest(user_id="alice", messages=[turn] * 4, completion="a", kind=pb.FeedbackRequest.ACCEPT)
    with pytest.raises(InvalidArgument, match="messages has 4 messages; the limit is 3"):
        convert.feedback_args(over, limits)
    with pytest.raises(InvalidArgument, match="limit max_chat_messages must be >= 1"):
        Limits(max_chat_messages=0)


def test_feedback_ack() -> None:
    assert convert.feedback_ack("1-0", 3) == pb.FeedbackAck(event_id="1-0", partition=3)


def test_adapter_info_and_bundle() -> None:
    info = AdapterInfo(
        user_id="alice",
        version=3,
        rank=8,
        examples_seen=40,
        base_fingerprint="fp",
        updated_at_unix_ms=1_700_000_000_000,
        pending_events=2,
        owner_node="worker-1",
    )
    message = convert.adapter_info(info)
    assert message == pb.AdapterInfo(
        user_id="alice",
        version=3,
        rank=8,
        examples_seen=40,
        base_fingerprint="fp",
        updated_at_unix_ms=1_700_000_000_000,
        pending_events=2,
        owner_node="worker-1",
    )
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\x00\x01"}
    bundle = convert.adapter_bundle(files, info)
    assert dict(bundle.files) == files and bundle.info == message


def test_canonical_safetensors_sorts_metadata_and_keeps_the_tensors() -> None:
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.float16)}
    metadata = {f"key{i}": f"value {i} é" for i in range(12)}
    outputs = {canonical_safetensors(save_safetensors(tensors, metadata=metadata)) for _ in range(10)}
    assert len(outputs) == 1  # the writer's order varies from call to call; the canonical form does not
    (canonical,) = outputs
    assert (len(canonical) - 8) % 8 == 0
    loaded = load_safetensors(canonical)
    assert set(loaded) == {"a", "b"} and all(torch.equal(loaded[n], tensors[n]) for n in tensors)
    header = _header(canonical)
    assert list(header["__metadata__"]) == sorted(metadata) and header["__metadata__"] == metadata


@pytest.mark.parametrize(
    "data", [b"", b"\x00\x01", b"\xff" * 16, (4).to_bytes(8, "little") + b"null", (2).to_bytes(8, "little") + b"{}"]
)
def test_canonical_safetensors_leaves_other_bytes_alone(data: bytes) -> None:
    assert canonical_safetensors(data) == data


def _header(data: bytes) -> dict[str, Any]:
    """The parsed JSON header of safetensors bytes."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])  # type: ignore[no-any-return]


def test_export_and_import_args() -> None:
    assert convert.export_args(pb.ExportAdapterRequest(user_id="u", version=2), LIMITS) == ("u", 2)
    files = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"w"}
    assert convert.import_args(pb.ImportAdapterRequest(user_id="u", files=files), LIMITS) == ("u", files)
    with pytest.raises(InvalidArgument, match="missing"):
        request = pb.ImportAdapterRequest(user_id="u", files={"adapter_config.json": b"{}"})
        convert.import_args(request, LIMITS)


def test_delete_response() -> None:
    assert convert.delete_response(3, 5) == pb.DeleteUserResponse(versions_deleted=3, events_deleted=5)


def test_stats_response() -> None:
    stats = NodeStats(
        node_id="worker-0",
        resident={"device": 2, "host": 5},
        bytes={"device": 100},
        hits={"device": 9},
        misses={"device": 1, "host": 1},
        batch_occupancy=3.5,
        max_batch_occupancy=8,
        queue_depth=2,
        stream_lag=11,
    )
    response = convert.stats_response([stats, NodeStats(node_id="worker-1")], degraded=True)
    assert response.degraded
    first, second = response.nodes
    assert first.node_id == "worker-0" and dict(first.resident) == {"device": 2, "host": 5}
    assert dict(first.bytes) == {"device": 100} and dict(first.hits) == {"device": 9}
    assert dict(first.misses) == {"device": 1, "host": 1}
    assert (first.batch_occupancy, first.max_batch_occupancy) == (3.5, 8)
    assert (first.queue_depth, first.stream_lag) == (2, 11)
    assert second == pb.NodeStats(node_id="worker-1")
