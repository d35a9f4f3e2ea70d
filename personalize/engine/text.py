"""Text in and out of the model: prompt encoding (the one place serving and training tokenize a prompt or
render a chat with the model's chat template) and incremental detokenization with stop strings: pieces
are emitted only once they are final.

Each token costs a decode of a short window, never of the whole sequence (prefix and read offsets, as in
vLLM): `prefix` is where the window starts (tokens already emitted, kept so that a tokenizer's
context-dependent decoding — a SentencePiece leading space, a byte-level merge — sees the same left
context as a full decode), `read` is where the not-yet-emitted tokens start. The window is re-anchored
after every emitted piece, so its length stays at a few tokens whatever the output length.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from personalize.errors import InvalidArgument

_PREFIX_TOKENS = 5
"""Left context kept in the window: enough for every decoder's context rules (vLLM keeps 5 as well)."""


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids of `prompt` as the model sees it, serving and training alike: BOS (when the tokenizer
    has one) then the text without other special tokens; an empty result becomes one pad token, since a
    generation needs one position to start from."""
    ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        ids = [bos, *ids]
    return ids or [tokenizer.pad_token_id or 0]


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat, as chat templates take it."""

    role: str
    """system, user, assistant (or whatever roles the model's template knows)."""
    content: str


BUILTIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""The built-in tiny model's chat template: `<|ROLE|>\\nCONTENT\\n` per message, then `<|assistant|>\\n`."""


def encode_chat(tokenizer: Any, messages: Sequence[ChatMessage]) -> list[int]:
    """The token ids of a chat as the model sees it, serving and training alike: the model's chat template
    rendered with the generation prompt (`tokenizer.apply_chat_template(..., add_generation_prompt=True)`).
    InvalidArgument when the model has no chat template or there are no messages."""
    if not messages:
        raise InvalidArgument("messages: a chat needs at least one message")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument("messages: this model has no chat template; send a plain prompt instead")
    turns = [{"role": m.role, "content": m.content} for m in messages]
    try:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as exc:  # a template may raise on roles or orders it does not accept (jinja's raise_exception)
        raise InvalidArgument(f"messages: the model's chat template refused this chat: {exc}") from exc
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # some tokenizer versions return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def encode_input(tokenizer: Any, prompt: str | Sequence[ChatMessage]) -> list[int]:
    """A plain prompt through `encode_prompt`, a chat (ChatMessage sequence) through `encode_chat`."""
    return encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else encode_chat(tokenizer, prompt)


_SPECIAL_IDS: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The tokenizer's special token ids, computed once per tokenizer: a Python tokenizer decoding with
    `skip_special_tokens=True` rebuilds this set on every call (about 6x the cost of the decode itself
    for ByT5), and the engine decodes twice per token per row."""
    ids = _SPECIAL_IDS.get(tokenizer)
    if ids is None:
        ids = _SPECIAL_IDS[tokenizer] = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", ()))
    return ids


class TextStream:
    """Turns a growing list of token ids into text pieces, honouring stop strings.

    A piece is held back while it could still be the start of a stop string or an unfinished
    multi-byte character, so a caller never sees text that is later retracted; every piece returned by
    `push` and `flush` joined is the tokenizer's decode of all ids (cut before a stop string).
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.special = None if getattr(tokenizer, "is_fast", False) else special_ids(tokenizer)
        """Ids to drop before decoding, for a Python tokenizer; None = let a (Rust) fast tokenizer skip them."""
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.stopped = False
        self._prefix = 0
        self._read = 0
        self._pending = ""
        """Final text not yet emitted: the last `hold` characters, which may begin a stop string."""
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    def _decode(self, ids: list[int]) -> str:
        """The text of `ids` without special tokens (as decode(skip_special_tokens=True), cheaper)."""
        if self.special is None:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))
        return str(self.tokenizer.decode([i for i in ids if i not in self.special], skip_special_tokens=False))

    def _new_text(self, final: bool) -> str:
        """Text the tokens since `read` add to the window; empty while it ends in an unfinished character
        (unless `final`: at the end a broken byte decodes as U+FFFD, as in a full decode)."""
        window = self.ids[self._prefix :]
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(window)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        # Re-anchor: the window now starts a few tokens back from the end.
        self._read = len(self.ids)
        self._prefix = max(self._prefix, self._read - _PREFIX_TOKENS)
        return after[len(before) :]

    def _emit(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece

    def push(self, token_id: int) -> str:
        """Add one token; returns the newly final text (maybe empty). Sets `stopped` on a stop string,
        after which nothing more is emitted."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        delta = self._new_text(final=False)
        if not delta:
            return ""
        buf = self._pending + delta
        # A stop string ending in `delta` starts at most `hold` characters before it: inside `buf`.
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return self._emit(buf[:cut])
        keep = min(self.hold, len(buf))
        self._pending = buf[len(buf) - keep :]
        return self._emit(buf[: len(buf) - keep])

    def flush(self) -> str:
        """The rest of the text, at the end of generation."""
        if self.stopped:
            return ""
        buf = self._pending + self._new_text(final=True)
        self._pending = ""
        cut = min((i for i in (buf.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            buf = buf[:cut]
        return self._emit(buf)
