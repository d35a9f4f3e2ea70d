"""Feedback events: what a user said about an answer, validated, in the form stored on the stream."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from personalize.engine.text import ChatMessage
from personalize.errors import InvalidArgument

KINDS = ("accept", "reject", "correct", "prefer")


@dataclass(frozen=True)
class FeedbackEvent:
    """One user's reaction to one answer.

    accept: `completion` was good. reject: it was bad. correct: `correction` is the answer wanted.
    prefer: `completion` is preferred over `rejected`. The question is `prompt`, or, when `messages` is
    set (and `prompt` empty), a chat rendered with the model's chat template as when serving.
    """

    tenant: str
    user_id: str
    kind: str
    prompt: str
    completion: str
    correction: str = ""
    rejected: str = ""
    event_key: str = ""
    """Client idempotency key: a repeated key is stored once."""
    messages: tuple[ChatMessage, ...] = ()
    """The chat answered, instead of `prompt` (empty = a plain prompt)."""
    trace: str = field(default="", compare=False)
    """W3C `traceparent` of the call that submitted it ("" = none), stored with the event so the trainer's
    round and publish join that trace."""

    def __post_init__(self) -> None:
        if self.messages and self.prompt:
            raise InvalidArgument("feedback takes exactly one of prompt and messages")
        if self.kind not in KINDS:
            raise InvalidArgument(f"feedback kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "correct" and not self.correction:
            raise InvalidArgument("feedback kind 'correct' needs a non-empty correction")
        if self.kind == "prefer" and not self.rejected:
            raise InvalidArgument("feedback kind 'prefer' needs the rejected answer in 'rejected'")
        if self.kind in ("accept", "reject", "prefer") and not self.completion:
            raise InvalidArgument(f"feedback kind {self.kind!r} needs a non-empty completion")

    @property
    def question(self) -> str | tuple[ChatMessage, ...]:
        """What the model was asked: the chat when there is one, else the prompt (for `encode_input`)."""
        return self.messages or self.prompt

    @property
    def target(self) -> str:
        """The answer this event teaches towards (or, for reject, away from)."""
        return self.correction if self.kind == "correct" else self.completion

    def to_fields(self) -> dict[str, str]:
        fields = {
            "t": self.tenant,
            "u": self.user_id,
            "k": self.kind,
            "p": self.prompt,
            "c": self.completion,
            "x": self.correction,
            "r": self.rejected,
            "e": self.event_key,
            **({"tp": self.trace} if self.trace else {}),
        }
        if self.messages:
            fields["m"] = messages_json(self.messages)
        return fields

    @classmethod
    def from_fields(cls, fields: dict[bytes, bytes] | dict[str, str]) -> FeedbackEvent:
        f = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        return cls(
            tenant=f["t"],
            user_id=f["u"],
            kind=f["k"],
            prompt=f["p"],
            completion=f["c"],
            correction=f.get("x", ""),
            rejected=f.get("r", ""),
            event_key=f.get("e", ""),
            messages=messages_from_json(f.get("m", "")),
            trace=f.get("tp", ""),
        )


def messages_json(messages: tuple[ChatMessage, ...]) -> str:
    """A chat as stored (on the stream, in replay buffers): a JSON list of [role, content]."""
    return json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False)


def messages_from_json(raw: str) -> tuple[ChatMessage, ...]:
    """The chat of `messages_json` ("" = none); InvalidArgument when it is not such a list."""
    if not raw:
        return ()
    try:
        items = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"messages: not a JSON list of [role, content]: {exc}") from exc
    ok = isinstance(items, list) and all(
        isinstance(i, list) and len(i) == 2 and all(isinstance(x, str) for x in i) for i in items
    )
    if not ok:
        raise InvalidArgument("messages: not a JSON list of [role, content]")
    return tuple(ChatMessage(role, content) for role, content in items)


def event_id_key(event_id: str) -> tuple[int, int]:
    """Order of Redis stream ids ("ms-seq"); "" sorts before every id."""
    if not event_id:
        return (-1, -1)
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)
