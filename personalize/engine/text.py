"""Incremental detokenization with stop strings: pieces are emitted only once they are final."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Turns a growing list of token ids into text pieces, honouring stop strings.

    A piece is held back while it could still be the start of a stop string or an unfinished
    multi-byte character, so a caller never sees text that is later retracted.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly final text (maybe empty). Sets `stopped` on a stop string."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next byte
            return ""
        self.text = text
        start = max(0, self.emitted - self.hold)
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            return self.flush()
        safe_end = max(self.emitted, len(text) - self.hold)
        piece = text[self.emitted:safe_end]
        self.emitted = safe_end
        return piece

    def flush(self) -> str:
        """The rest of the text, at the end of generation."""
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece
