"""Feedback events: what a user said about an answer, validated, in the form stored on the stream."""

from __future__ import annotations

from dataclasses import dataclass, field

from personalize.errors import InvalidArgument

KINDS = ("accept", "reject", "correct", "prefer")


@dataclass(frozen=True)
class FeedbackEvent:
    """One user's reaction to one answer.

    accept: `completion` was good. reject: it was bad. correct: `correction` is the answer wanted.
    prefer: `completion` is preferred over `rejected`.
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
    trace: str = field(default="", compare=False)
    """W3C `traceparent` of the call that submitted it ("" = none), stored with the event so the trainer's
    round and publish join that trace."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(f"feedback kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "correct" and not self.correction:
            raise InvalidArgument("feedback kind 'correct' needs a non-empty correction")
        if self.kind == "prefer" and not self.rejected:
            raise InvalidArgument("feedback kind 'prefer' needs the rejected answer in 'rejected'")
        if self.kind in ("accept", "reject", "prefer") and not self.completion:
            raise InvalidArgument(f"feedback kind {self.kind!r} needs a non-empty completion")

    @property
    def target(self) -> str:
        """The answer this event teaches towards (or, for reject, away from)."""
        return self.correction if self.kind == "correct" else self.completion

    def to_fields(self) -> dict[str, str]:
        return {
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
            trace=f.get("tp", ""),
        )


def event_id_key(event_id: str) -> tuple[int, int]:
    """Order of Redis stream ids ("ms-seq"); "" sorts before every id."""
    if not event_id:
        return (-1, -1)
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)
