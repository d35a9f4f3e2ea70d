"""Hostile input to every RPC of a running server: each call gets a precise status (never UNKNOWN or
INTERNAL), and the server keeps serving a valid call afterwards.

Examples per run: env PERSONALIZE_FUZZ_EXAMPLES (default 100).
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personalize.model import BaseModel
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from tests.e2e.upserver import Stubs, adapter_files, make_peft_adapter

EXAMPLES = int(os.environ.get("PERSONALIZE_FUZZ_EXAMPLES", "100"))
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CALL_TIMEOUT_S = 30.0

hostile_texts = st.one_of(
    st.text(max_size=40),  # any code point but surrogates: controls, NUL, emoji, RTL marks
    st.sampled_from(["", "\x00", "a\x00b", "\n", "🙂" * 70, "x" * 257, "é" * 129, "../../etc/passwd", " ", "\u202e"]),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=300),
)
texts = st.sampled_from(["fuzz-a", "fuzz-b", "fuzz 🙂"]) | hostile_texts  # plausible values reach deeper code
prompts = st.one_of(texts, st.just("p" * 20_000), st.just("🙂" * 5_000), st.text(max_size=2_000))
uint32 = st.one_of(st.integers(0, 12), st.sampled_from([513, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
uint64 = st.one_of(st.integers(0, 3), st.just(2**64 - 1), st.integers(0, 2**64 - 1))
floats = st.one_of(st.just(0.0), st.floats(0, 2, width=32), st.floats(width=32))  # + NaN, inf, negatives
file_names = st.one_of(
    st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "../x", ""]),
    st.text(max_size=20),
)
kinds = st.integers(-2, 6) | st.integers(-(2**31), 2**31 - 1)  # unknown enum values included
auth = st.none() | st.text(alphabet=string.ascii_letters + string.digits + " :-_", max_size=30)
CONFIG_EDITS = [
    ('"r": 4', '"r": -1'),
    ('"r": 4', '"r": 100000'),
    ('"r": 4', '"r": "four"'),
    ('"lora_alpha": 8', '"lora_alpha": NaN'),
    ("q_proj", "embed_tokens"),
    ("LORA", "IA3"),
    ('"use_dora": false', '"use_dora": true'),
    ("{", "["),
]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` truncated, with bytes overwritten, or (a JSON config) with a field edited."""
    how = draw(st.sampled_from(["truncate", "overwrite", "edit", "as-is"]))
    if how == "truncate":
        return data[: draw(st.integers(0, len(data)))]
    if how == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=16))
        return data[:at] + patch + data[at + len(patch) :]
    if how == "edit":
        old, new = draw(st.sampled_from(CONFIG_EDITS))
        return data.replace(old.encode(), new.encode())
    return data


@st.composite
def import_files(draw: st.DrawFn, real: dict[str, bytes]) -> dict[str, bytes]:
    """Random files, the right names with random bytes, or a real PEFT adapter's files mutated."""
    shape = draw(st.sampled_from(["random", "random-bytes", "mutated"]))
    if shape == "random":
        return draw(st.dictionaries(file_names, st.binary(max_size=4096), max_size=4))
    if shape == "random-bytes":
        return {name: draw(st.binary(max_size=4096)) for name in real}
    return {name: draw(mutated(data)) for name, data in real.items()}


@st.composite
def generate_requests(draw: st.DrawFn) -> pb.GenerateRequest:
    stop = draw(st.lists(texts, max_size=3) | st.lists(texts, max_size=20))
    return pb.GenerateRequest(
        user_id=draw(texts),
        prompt=draw(prompts),
        max_new_tokens=draw(uint32),
        temperature=draw(floats),
        top_p=draw(floats),
        seed=draw(uint64),
        stop=stop,
        use_base_model=draw(st.booleans()),
    )


@st.composite
def feedback_requests(draw: st.DrawFn) -> pb.FeedbackRequest:
    return pb.FeedbackRequest(
        user_id=draw(texts),
        prompt=draw(prompts),
        completion=draw(prompts),
        kind=draw(kinds),
        correction=draw(texts),
        rejected=draw(texts),
        event_key=draw(texts),
    )


def _calls(stubs: Stubs, draw: st.DrawFn, real_files: dict[str, bytes]) -> dict[str, Callable[..., Any]]:
    """Every RPC, each with one hostile request."""
    api, admin = stubs.api, stubs.admin
    generate = draw(generate_requests())
    user = draw(texts)
    return {
        "Generate": lambda **kw: api.Generate(generate, **kw),
        "GenerateStream": lambda **kw: list(api.GenerateStream(draw(generate_requests()), **kw)),
        "SubmitFeedback": lambda **kw: api.SubmitFeedback(draw(feedback_requests()), **kw),
        "GetAdapter": lambda **kw: api.GetAdapter(pb.GetAdapterRequest(user_id=user), **kw),
        "ExportAdapter": lambda **kw: api.ExportAdapter(
            pb.ExportAdapterRequest(user_id=user, version=draw(uint64)), **kw
        ),
        "ImportAdapter": lambda **kw: api.ImportAdapter(
            pb.ImportAdapterRequest(user_id=draw(texts), files=draw(import_files(real_files))), **kw
        ),
        "DeleteUser": lambda **kw: api.DeleteUser(pb.DeleteUserRequest(user_id=draw(texts)), **kw),
        "Stats": lambda **kw: admin.Stats(pb.StatsRequest(), **kw),
        "ListNodes": lambda **kw: admin.ListNodes(pb.ListNodesRequest(), **kw),
    }


@pytest.fixture(scope="module")
def real_files(base: BaseModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A real PEFT adapter's files, to mutate."""
    directory = tmp_path_factory.mktemp("fuzz-adapter")
    make_peft_adapter(base.model, seed=3, directory=directory, targets=("q_proj", "v_proj"))
    return adapter_files(directory)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hostile_input_gets_a_precise_status_and_the_server_keeps_serving(
    stubs: Stubs, real_files: dict[str, bytes], data: st.DataObject
) -> None:
    for name, call in _calls(stubs, data.draw, real_files).items():
        try:
            call(timeout=CALL_TIMEOUT_S)  # valid auth (this server has no keys): the handlers see every input
        except grpc.RpcError as exc:
            assert exc.code() not in NEVER, f"{name}: {exc.code().name} {exc.details()}"
            assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"{name} hung"
            assert exc.code() != grpc.StatusCode.UNAUTHENTICATED, f"{name} never reached its handler"
    valid = stubs.api.Generate(
        pb.GenerateRequest(user_id="fuzz-check", prompt="Hello", max_new_tokens=2), timeout=CALL_TIMEOUT_S
    )
    assert valid.finish_reason in ("length", "eos")


@settings(max_examples=max(10, EXAMPLES // 4), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=auth.filter(lambda key: key is not None))
def test_hostile_authorization_gets_a_precise_status_and_the_server_keeps_serving(stubs: Stubs, key: str) -> None:
    """Random `authorization` values on valid calls: refused or served, never UNKNOWN/INTERNAL or a hang."""
    calls = {
        "Generate": lambda **kw: stubs.api.Generate(
            pb.GenerateRequest(user_id="fuzz-auth", prompt="Hi", max_new_tokens=1), **kw
        ),
        "GetAdapter": lambda **kw: stubs.api.GetAdapter(pb.GetAdapterRequest(user_id="fuzz-auth"), **kw),
        "Stats": lambda **kw: stubs.admin.Stats(pb.StatsRequest(), **kw),
    }
    for name, call in calls.items():
        try:
            call(timeout=CALL_TIMEOUT_S, metadata=(("authorization", key),))
        except grpc.RpcError as exc:
            assert exc.code() not in NEVER, f"{name}: {exc.code().name} {exc.details()}"
            assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"{name} hung"
    valid = stubs.api.Generate(
        pb.GenerateRequest(user_id="fuzz-check", prompt="Hello", max_new_tokens=2), timeout=CALL_TIMEOUT_S
    )
    assert valid.finish_reason in ("length", "eos")
