"""Just enough of the protobuf wire format for the router to route a request without deserializing it:
read one string field of a message's top level, and append one.

    tag = varint(field_number << 3 | wire_type); wire types 0 varint, 1 fixed64, 2 length-delimited,
    5 fixed32 (3/4, groups, are not used by proto3 messages and are refused).

A string field appended to a serialized message overrides an earlier value of the same field when the
message is parsed (the last value wins), as documented for protobuf's merging of concatenated messages.
"""

from __future__ import annotations

from personalize.errors import InvalidArgument

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it) of the varint at `pos`."""
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise InvalidArgument("request body is not a protobuf message (a truncated varint)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes, start: int, end: int) -> str:
    try:
        return data[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("a string field of the request is not valid UTF-8") from None


def last_string(data: bytes, number: int) -> str:
    """The value of string field `number` at the top level of the message `data` (the last one when it
    occurs more than once, as a parser would take it); "" if absent. InvalidArgument if `data` is not
    a well-formed message."""
    pos, found = 0, (0, 0)
    while pos < len(data):
        tag, pos = _varint(data, pos)
        kind = tag & 7
        if kind == _VARINT:
            _, pos = _varint(data, pos)
            continue
        if kind == _FIXED64:
            pos += 8
        elif kind == _FIXED32:
            pos += 4
        elif kind == _LEN:
            size, pos = _varint(data, pos)
            if tag >> 3 == number:
                found = (pos, pos + size)
            pos += size
        else:
            raise InvalidArgument(f"request body is not a proto3 message (wire type {kind})")
        if pos > len(data):
            raise InvalidArgument("request body is not a protobuf message (a field runs past its end)")
    return _string(data, *found)


def leading_string(data: bytes, number: int) -> str | None:
    """The value of string field `number` when it is the message's first field (where serializers put a
    message's lowest-numbered field), else None; reads nothing past it."""
    tag = number << 3 | _LEN
    if not data or data[0] != tag or tag >= 0x80:
        return None
    size, pos = _varint(data, 1)
    if pos + size > len(data):
        raise InvalidArgument("request body is not a protobuf message (a field runs past its end)")
    return _string(data, pos, pos + size)


def string_field(number: int, value: str) -> bytes:
    """String field `number` = `value`, serialized (to append to a message)."""
    encoded = value.encode("utf-8")
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(encoded)) + encoded
