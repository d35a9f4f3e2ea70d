"""Learning from feedback, end to end over gRPC: each user's answers pick up that user's signature and
nobody else's; every acknowledged event is applied exactly once, even when the trainer is SIGKILLed."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from personalize_service.client import NotFoundError, PersonalizeClient
from tests.e2e.upserver import UpServer, start_up

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi"]
WORDS = (
    "the a cat dog sky blue run fast slow tree house car why how what when is are you me green small big "
    "river song light night day"
).split()


def _prompt(rnd: random.Random) -> str:
    return "Q: " + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 8))) + "?\nA: "


def _wait_applied(client: PersonalizeClient, users: dict[str, int], timeout: float) -> None:
    """Until every user's examples_seen reaches its count and nothing is pending."""
    deadline = time.monotonic() + timeout
    left = dict(users)
    while left:
        for user, count in list(left.items()):
            try:
                info = client.get_adapter(user)
            except Exception:
                continue
            if info.examples_seen >= count and info.pending_events == 0:
                assert info.examples_seen == count, f"{user}: {info.examples_seen} examples, sent {count}"
                del left[user]
        assert time.monotonic() < deadline, f"not applied in {timeout}s: {sorted(left)[:5]}"
        time.sleep(0.2)


def test_each_user_learns_their_signature_and_only_theirs(up_server: UpServer) -> None:
    rnd = random.Random(7)
    signatures = {f"sig-{n}": f"Ciao {n}! " for n in NAMES}
    with PersonalizeClient(up_server.target, timeout=60) as client:
        for wave in range(1, 5):  # 16 events per user, arriving in four waves as real feedback trickles in
            for user, sig in signatures.items():
                for _ in range(4):
                    tail = " ".join(rnd.choice(WORDS) for _ in range(4))
                    client.feedback(user, _prompt(rnd), "whatever", kind="correct", correction=sig + tail)
            _wait_applied(client, {u: 4 * wave for u in signatures}, timeout=240)
        unseen = [_prompt(rnd) for _ in range(10)]
        calls = [(u, p, False) for u in signatures for p in unseen] + [("sig-Alice", p, True) for p in unseen]
        with ThreadPoolExecutor(16) as pool:  # concurrent: users' rows share engine batches
            answers = list(
                pool.map(lambda c: client.generate(c[0], c[1], max_new_tokens=16, use_base_model=c[2]), calls)
            )
    personal = [(u, a) for (u, _, base), a in zip(calls, answers, strict=True) if not base]
    base = [a for (_, _, b), a in zip(calls, answers, strict=True) if b]
    hit_rate = sum(a.text.startswith(signatures[u]) for u, a in personal) / len(personal)
    leaks = [(u, a.text) for u, a in personal if any(s.strip() in a.text for v, s in signatures.items() if v != u)]
    assert hit_rate >= 0.95, [a.text for _, a in personal][:20]
    assert leaks == []
    assert all(a.adapter_version >= 4 for _, a in personal)
    assert not any(a.text.startswith(s) for a in base for s in signatures.values())
    assert all(a.adapter_version == 0 for a in base)


@pytest.fixture
def trainer_cluster(tmp_path: Path) -> Iterator[UpServer]:
    server = start_up(
        tmp_path / "data",
        tmp_path / "up.log",
        "--train-steps",
        "1",
        "--train-max-steps",
        "1",
        "--train-max-events",
        "150",
        "--claim-idle-ms",
        "2000",
    )
    yield server
    server.stop()


def _trainer_pid(data_dir: Path, not_pid: int = 0, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = int((data_dir / "trainer.pid").read_text())
            if pid != not_pid:
                return pid
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError("no trainer process appeared")


def _wait_progress(client: PersonalizeClient, users: dict[str, int], since: int, timeout: float = 120) -> None:
    """Until more than `since` events are applied: a kill before a fresh trainer has even imported its
    model would test nothing (1000 events go in faster than a trainer starts)."""
    deadline = time.monotonic() + timeout
    while _applied(client, users) <= since:
        assert time.monotonic() < deadline, f"the trainer applied nothing in {timeout}s"
        time.sleep(0.2)


def _applied(client: PersonalizeClient, users: dict[str, int]) -> int:
    total = 0
    for user, sent in users.items():
        if sent:
            with contextlib.suppress(NotFoundError):  # no adapter yet
                total += client.get_adapter(user).examples_seen
    return total


def test_every_event_applied_exactly_once_across_trainer_kills(trainer_cluster: UpServer) -> None:
    rnd = random.Random(3)
    users = {f"once-{i}": 0 for i in range(100)}
    kills, backlogs = 0, []  # backlogs: events acknowledged but not yet applied, read just before each kill
    applied_at_kill = 0  # events applied when the last trainer died
    pid = _trainer_pid(trainer_cluster.data_dir)
    with PersonalizeClient(trainer_cluster.target, timeout=60) as client:
        for n in range(1000):
            user = f"once-{n % 100}"
            client.feedback(user, _prompt(rnd), "a", kind="correct", correction=f"b {n}")
            users[user] += 1
            if n in (200, 450, 700):  # the restarted trainer is up and applying before the next kill
                _wait_progress(client, users, since=applied_at_kill)
            if n in (250, 500, 750):  # SIGKILL the trainer while it works through the backlog
                time.sleep(0.5)
                backlogs.append(sum(node.stream_lag for node in client.stats().nodes))
                os.kill(pid, signal.SIGKILL)
                kills += 1
                applied_at_kill = _applied(client, users)
                pid = _trainer_pid(trainer_cluster.data_dir, not_pid=pid)
        _wait_applied(client, users, timeout=300)
        stats = client.stats()
    assert kills == 3
    assert max(backlogs) > 0, backlogs  # precondition: at least one kill hit the trainer with work to do
    assert all(node.stream_lag == 0 for node in stats.nodes)
    assert "trainer exited" in trainer_cluster.log()
