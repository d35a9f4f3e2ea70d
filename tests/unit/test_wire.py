"""The router's wire reader agrees with protobuf's own parser on the fields it reads."""

from __future__ import annotations

import pytest

from personalize.errors import InvalidArgument
from personalize_service.gen.personalize.v1 import personalize_pb2 as pb
from personalize_service.server import wire

MESSAGES = [
    pb.GenerateRequest(user_id="ünï", prompt="hi" * 100, max_new_tokens=300, temperature=0.5, seed=7, stop=["a"]),
    pb.GenerateRequest(prompt="no user"),
    pb.FeedbackRequest(user_id="u", event_key="k" * 200, correction="c"),
    pb.ImportAdapterRequest(user_id="u", files={"a": b"\x00" * 1000}),
    pb.GetAdapterRequest(),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_last_string_reads_what_the_parser_reads(message: object) -> None:
    data = message.SerializeToString()  # type: ignore[attr-defined]
    for field in message.DESCRIPTOR.fields:  # type: ignore[attr-defined]
        if field.type == field.TYPE_STRING and not field.is_repeated:
            assert wire.last_string(data, field.number) == getattr(message, field.name)
    appended = data + wire.string_field(1, "routed")
    assert type(message).FromString(appended).user_id == "routed" == wire.last_string(appended, 1)  # type: ignore[attr-defined]
    assert wire.leading_string(data, 1) == (message.user_id or None)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "data", [b"\x0a\x05ab", b"\x08", b"\x0f", b"\xff\xff"], ids=["short", "varint", "group", "tag"]
)
def test_a_malformed_body_is_invalid_argument(data: bytes) -> None:
    with pytest.raises(InvalidArgument):
        wire.last_string(data, 1)
