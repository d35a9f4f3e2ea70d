"""Every kind of feedback teaches what it says, end to end over gRPC: PREFER makes the chosen answer the
user's answer, a first ACCEPT never sends answers into a loop, and a user mixing all four kinds gets
what the kinds together say."""

from __future__ import annotations

import random
import re

from personalize_service.client import PersonalizeClient
from tests.e2e.test_personalization import WORDS, _prompt, _wait_applied
from tests.e2e.upserver import UpServer


def _tail(rnd: random.Random) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(4))


def _loops(text: str, span: int = 12) -> bool:
    """The answer ends in a unit of 1-4 tokens repeated (special tokens count as one)."""
    tail = re.findall(r"<extra_id_\d+>|.", text, re.S)[-span:]
    return len(tail) == span and any(all(tail[i] == tail[i + p] for i in range(span - p)) for p in range(1, 5))


def _answers(
    client: PersonalizeClient, user: str, prompts: list[str], tokens: int = 16, base: bool = False
) -> list[str]:
    return [client.generate(user, p, max_new_tokens=tokens, use_base_model=base).text for p in prompts]


def test_prefer_teaches_the_chosen_answer(up_server: UpServer) -> None:
    rnd = random.Random(11)
    with PersonalizeClient(up_server.target, timeout=60) as client:
        for wave in range(1, 5):
            for _ in range(4):
                tail = _tail(rnd)
                client.feedback(
                    "pref-1", _prompt(rnd), "Salut Zoe! " + tail, kind="prefer", rejected="Hey Zoe! " + tail
                )
            _wait_applied(client, {"pref-1": 4 * wave}, timeout=240)
        answers = _answers(client, "pref-1", [_prompt(rnd) for _ in range(10)])
    assert sum(a.startswith("Salut Zoe! ") for a in answers) >= 9, answers
    assert not any(a.startswith("Hey Zoe!") for a in answers), answers


def test_a_first_accept_moves_toward_it_and_never_into_a_loop(up_server: UpServer) -> None:
    """Also when the same thumbs-up comes again in later rounds: each round's fresh optimizer used to take
    full steps on the learned answer, and answers to unrelated prompts looped after 2-4 of them."""
    rnd = random.Random(12)
    unrelated = [_prompt(rnd) for _ in range(10)]
    with PersonalizeClient(up_server.target, timeout=60) as client:
        base_loops = sum(map(_loops, _answers(client, "first-1", unrelated, 32, base=True)))
        for sent in (1, 2, 3, 4):
            client.feedback("first-1", "Say hi", "Hello there!", kind="accept")
            _wait_applied(client, {"first-1": sent}, timeout=120)
            if sent in (1, 2, 4):
                taught = client.generate("first-1", "Say hi", max_new_tokens=32).text
                loops = sum(map(_loops, _answers(client, "first-1", unrelated, 32)))
                assert not _loops(taught) and taught.startswith("Hel"), (sent, taught)
                assert loops <= base_loops + 1, sent


def test_a_user_mixing_all_four_kinds_gets_what_they_say_together(up_server: UpServer) -> None:
    """CORRECT and ACCEPT teach a greeting, PREFER picks it over another, REJECT refuses the other one."""
    rnd = random.Random(13)
    user, good, bad = "mix-1", "Ciao Max! ", "Hey Max! "
    with PersonalizeClient(up_server.target, timeout=60) as client:
        for wave in range(1, 5):
            client.feedback(user, _prompt(rnd), "no", kind="correct", correction=good + _tail(rnd))
            client.feedback(user, _prompt(rnd), good + _tail(rnd), kind="accept")
            tail = _tail(rnd)
            client.feedback(user, _prompt(rnd), good + tail, kind="prefer", rejected=bad + tail)
            client.feedback(user, _prompt(rnd), bad + _tail(rnd), kind="reject")
            _wait_applied(client, {user: 4 * wave}, timeout=240)
        answers = _answers(client, user, [_prompt(rnd) for _ in range(10)])
    assert sum(a.startswith(good) for a in answers) >= 8, answers
    assert not any(a.startswith(bad.strip()) for a in answers), answers
