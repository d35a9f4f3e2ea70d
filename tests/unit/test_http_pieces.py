"""The edge's stream relay (`_pieces`): one thread reads a blocking stream and the event loop gets every piece
in order, then the stream's error, and leaving early cancels the stream."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from grpc import StatusCode

from personalize_service.client import PersonalizeClientError
from personalize_service.http.app import _pieces


class Stream:
    """A blocking stream of `texts`, then `error` if set; `hold` blocks after the first piece until cancelled."""

    def __init__(self, texts: list[str], error: Exception | None = None, hold: bool = False) -> None:
        self.texts, self.error, self.hold = texts, error, hold
        self.cancelled = threading.Event()

    def __iter__(self) -> Iterator[str]:
        for index, text in enumerate(self.texts):
            yield text
            if self.hold and index == 0:
                self.cancelled.wait(10)
                return
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled.set()


async def _collect(stream: Stream) -> list[str]:
    return [text async for text in _pieces(stream)]


def test_every_piece_arrives_in_order() -> None:
    texts = [f"p{i}" for i in range(200)]
    assert asyncio.run(_collect(Stream(texts))) == texts


def test_the_streams_error_is_raised_after_its_pieces() -> None:
    got: list[str] = []

    async def read() -> None:
        async for text in _pieces(Stream(["a", "b"], PersonalizeClientError(StatusCode.UNAVAILABLE, "worker gone"))):
            got.append(text)

    with pytest.raises(PersonalizeClientError, match="worker gone"):
        asyncio.run(read())
    assert got == ["a", "b"]


def test_leaving_early_cancels_the_stream() -> None:
    stream = Stream(["first", "never"], hold=True)

    async def leave_after_one() -> None:
        pieces = _pieces(stream)
        assert await pieces.__anext__() == "first"
        await pieces.aclose()

    asyncio.run(leave_after_one())
    assert stream.cancelled.is_set()
