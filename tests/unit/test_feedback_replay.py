"""Rehearsal selection: a reject drops only what it rejects, no side crowds out the other, no duplicates."""

from __future__ import annotations

import pytest

from personalize.feedback.events import FeedbackEvent
from personalize.feedback.replay import balanced, merge, rehearsal


def _e(kind: str, prompt: str, answer: str) -> FeedbackEvent:
    if kind == "correct":
        return FeedbackEvent("t", "u", kind, prompt, "no", correction=answer)
    if kind == "prefer":
        return FeedbackEvent("t", "u", kind, prompt, answer, rejected="Hey! " + answer)
    return FeedbackEvent("t", "u", kind, prompt, answer)


@pytest.mark.parametrize("kind", ["correct", "accept", "prefer"])
def test_a_reject_drops_the_kept_examples_teaching_what_it_rejects_and_nothing_else(kind: str) -> None:
    yo = [_e(kind, f"Q{i}", f"Yo Bob! {i}") for i in range(3)]
    bye = [_e(kind, f"S{i}", f"Bye Bob. {i}") for i in range(3)]
    no = _e("reject", "Q9", "Yo Bob! sky blue")
    assert merge([*yo, *bye], [no], 16) == [*bye, no]
    assert rehearsal([*yo, *bye], [no], 16) == bye


def test_a_later_positive_overrides_an_earlier_reject() -> None:
    no = _e("reject", "Q1", "Yo Bob! sky")
    yes = _e("accept", "Q2", "Yo Bob! cat")
    assert merge([no], [yes], 16) == [yes]


def test_rejects_never_crowd_out_other_examples() -> None:
    keep = [_e("correct", f"S{i}", f"Bye {i}") for i in range(8)]
    rejects = [_e("reject", f"Q{i}", f"Yo {i} there") for i in range(20)]
    kept = merge(keep, rejects, 16)
    assert [e for e in kept if e.kind != "reject"] == keep and len(kept) == 16
    assert kept[-1] == rejects[-1]  # the newest rejects stay
    assert sum(e.kind == "reject" for e in balanced(kept, 6)) == 3
    assert len(balanced(rejects, 6)) == 6  # without others, rejects fill the round


def test_an_example_sent_again_is_kept_and_rehearsed_once() -> None:
    hi = _e("accept", "Say hi", "Hello there!")
    assert merge([hi], [hi], 16) == [hi]
    assert rehearsal([hi], [hi], 16) == []
    assert merge([hi, _e("accept", "x", "y")], [hi], 16)[-1] == hi
