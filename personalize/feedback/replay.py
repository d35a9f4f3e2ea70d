"""Which earlier examples a user's training rehearses and keeps: pure selection over FeedbackEvents.

Rehearsal keeps what a user taught before while new events teach something else, so it spans every kind.
Two rules keep a REJECT from undoing more than what it rejects: a reject drops the kept examples that teach
the answer it rejects (a later accept/correct/prefer drops the rejects it overrides), and neither side may
crowd the other out of the buffer or of a round. An example is kept once however often it was sent:
replaying one example many times in a round only over-trains it.
"""

from __future__ import annotations

from personalize.feedback.events import FeedbackEvent

SAME_OPENING = 8
"""Answers sharing an opening of this many characters (or one being a prefix of the other) teach the same."""


def _key(e: FeedbackEvent) -> tuple[object, ...]:
    return (e.kind, e.prompt, e.messages, e.target, e.rejected)


def _same(a: str, b: str) -> bool:
    n = min(len(a), len(b), SAME_OPENING)
    return n > 0 and a[:n] == b[:n]


def _wanted(e: FeedbackEvent) -> str:
    return "" if e.kind == "reject" else e.target


def merge(kept: list[FeedbackEvent], new: list[FeedbackEvent], size: int) -> list[FeedbackEvent]:
    """The buffer after `new` (oldest first): contradicted examples dropped, one of each, at most `size`, of
    which at most half rejects while there are other examples to keep."""
    out: list[FeedbackEvent] = []
    for e in [*kept, *new]:
        if e.kind == "reject":
            out = [o for o in out if not _same(_wanted(o), e.target)]
        else:
            out = [o for o in out if not (o.kind == "reject" and _same(o.target, e.target))]
        out = [o for o in out if _key(o) != _key(e)] + [e]
    return balanced(out, size)


def balanced(buffer: list[FeedbackEvent], k: int) -> list[FeedbackEvent]:
    """The newest k examples (oldest first), at most half of them rejects unless too few others exist."""
    if k <= 0:
        return []
    rejects = [i for i, e in enumerate(buffer) if e.kind == "reject"]
    others = [i for i, e in enumerate(buffer) if e.kind != "reject"]
    n_rej = min(len(rejects), max(k // 2, k - len(others)))
    n_oth = min(len(others), k - n_rej)
    chosen = sorted(rejects[len(rejects) - n_rej :] + others[len(others) - n_oth :])
    return [buffer[i] for i in chosen]


def rehearsal(kept: list[FeedbackEvent], new: list[FeedbackEvent], k: int) -> list[FeedbackEvent]:
    """The up to k kept examples trained again with `new`: not contradicted by or equal to a new one."""
    fresh = {_key(e) for e in new}
    return balanced([e for e in merge(kept, new, len(kept) + len(new)) if _key(e) not in fresh], k)
