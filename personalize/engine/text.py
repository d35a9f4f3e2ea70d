"""Text in and out of the model: prompt encoding (the one place serving and training tokenize a prompt)
and incremental detokenization with stop strings (pieces are emitted only once they are final)."""

from __future__ import annotations

from typing import Any


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids of `prompt` as the model sees it, serving and training alike: BOS (when the tokenizer
    has one) then the text without other special tokens; an empty result becomes one pad token, since a
    generation needs one position to start from."""
    ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [bos, *ids]
    return ids or [tokenizer.pad_token_id or 0]


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
