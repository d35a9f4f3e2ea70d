"""The steady load of `make chaos` (loadtest/chaos.py): threads calling Generate and SubmitFeedback through
the router, every call recorded with its monotonic start and end, every feedback event re-sent with its
event_key until acknowledged."""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass

from personalize_service.client import PersonalizeClient, PersonalizeClientError

FAULTS = ("worker_sigkill", "trainer_sigkill", "valkey_restart", "s3_down", "corrupt_adapter", "partition")
PROMPTS = ("Say hi", "Tell me about LoRA", "What is the weather like?")
CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ChaosConfig:
    """One chaos run."""

    workers: int = 3
    users: int = 24
    """Load users, user ids chaos-0 .. chaos-<users-1>."""
    clients: int = 3
    """Load threads, each with its own channel to the router."""
    hold_s: float = 20.0
    """How long s3_down and partition last."""
    settle_timeout_s: float = 180.0
    """Bound on each wait: a fault's recovery, the trainer going mid-round, a user healing."""
    drain_timeout_s: float = 240.0
    """Bound on draining the feedback streams (and re-sending unacked events) at each check."""
    grace_s: float = 2.0
    """Added to each fault window after the system is healthy again."""
    calm_s: float = 4.0
    """Load runs this long before each fault."""
    max_new_tokens: int = 8
    feedback_per_s: float = 4.0
    """New feedback events per second, all load threads together (what the trainer keeps up with on two
    cores beside three workers under load)."""
    think_s: float = 0.1
    """Pause between a load thread's iterations (keeps a 2-core machine responsive)."""
    feedback_retry_s: float = 90.0
    """How long a load thread keeps re-sending one event before leaving it for the end."""
    faults: tuple[str, ...] = FAULTS
    seed: int = 0
    up_args: tuple[str, ...] = (
        "--train-steps",
        "1",
        "--train-max-steps",
        "4",
        "--train-max-events",
        "64",
        "--grace-s",
        "2",
        "--disk-cache",
        "0",
        "--keep-versions",
        "0",
    )
    """Short training rounds (the run checks bookkeeping, not what the adapters learn); no disk cache, so a
    restarted worker loads adapters from the store; every version kept, so that the record of the event ids
    each version was trained on (its examples object) stays whole for the exactly-once check."""

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULTS)
        if unknown or self.workers < 2 or self.users < self.workers or self.clients < 1:
            raise ValueError(
                f"bad chaos config (unknown faults {sorted(unknown)}, or workers < 2, users < "
                f"workers, clients < 1): {self}"
            )


# ---- the load -----------------------------------------------------------------------------------------


@dataclass
class Call:
    """One client call as the load saw it (times: time.monotonic())."""

    rpc: str
    user: str
    start: float
    end: float
    code: str
    """OK or the status code's name."""
    version: int = 0
    node: str = ""
    prompt: int = -1
    text: str = ""
    degraded: bool = False


@dataclass
class Event:
    """One feedback event: acked once a SubmitFeedback with its key returned."""

    key: str
    user: str
    attempts: int = 0
    acked: bool = False
    event_id: str = ""
    """The stream id the ack returned (a retry with the same key returns the same one)."""


class Load:
    """`clients` threads, each looping: Generate for a random user, then (at config.feedback_per_s over all
    threads) SubmitFeedback for a random user not frozen, re-sent with the same event_key until acked
    (bounded by config.feedback_retry_s; what is left is re-sent at the end)."""

    def __init__(self, target: str, users: list[str], config: ChaosConfig) -> None:
        self.target = target
        self.users = users
        self.config = config
        self.calls: list[Call] = []
        self.events: dict[str, Event] = {}
        self.frozen: set[str] = set()
        """Users that get no load feedback (a fault works on them)."""
        self.owner: dict[str, str] = {}
        """user -> node id of its latest successful Generate."""
        self._lock = threading.Condition()
        self._in_flight = 0
        self._next_feedback = time.monotonic()
        self._feedback_open = threading.Event()
        self._feedback_open.set()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"load-{i}", daemon=True) for i in range(config.clients)
        ]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._feedback_open.set()
        for thread in self._threads:
            thread.join(self.config.feedback_retry_s + 2 * CALL_TIMEOUT_S)

    def pause_feedback(self) -> None:
        """No new feedback events; returns once those being sent are acked or left for the end."""
        self._feedback_open.clear()
        deadline = time.monotonic() + self.config.feedback_retry_s + 2 * CALL_TIMEOUT_S
        with self._lock:
            while self._in_flight and time.monotonic() < deadline:
                self._lock.wait(0.2)

    def resume_feedback(self) -> None:
        self._feedback_open.set()

    def _run(self, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        with PersonalizeClient(self.target, timeout=CALL_TIMEOUT_S) as client:
            while not self._stop.is_set():
                user = rng.choice(self.users)
                self.generate(client, user, rng.randrange(len(PROMPTS)))
                fed = self._feedback_due(rng)
                if fed is not None:
                    self.feedback(client, fed, time.monotonic() + self.config.feedback_retry_s)
                self._stop.wait(self.config.think_s)

    def _feedback_due(self, rng: random.Random) -> str | None:
        """The user this thread sends the next feedback event for now (at config.feedback_per_s overall), or
        None; the event counts as in flight from here on, so that pause_feedback waits for it."""
        now = time.monotonic()
        with self._lock:
            choices = [u for u in self.users if u not in self.frozen]
            if not self._feedback_open.is_set() or now < self._next_feedback or not choices:
                return None
            self._next_feedback = max(self._next_feedback, now - 1.0) + 1.0 / self.config.feedback_per_s
            self._in_flight += 1
            return rng.choice(choices)

    def freeze(self, user: str, frozen: bool = True) -> None:
        """Send no more load feedback for `user` (returns once none is in flight), or again."""
        with self._lock:
            (self.frozen.add if frozen else self.frozen.discard)(user)
        if frozen:
            self.pause_feedback()
            self.resume_feedback()

    def generate(self, client: PersonalizeClient, user: str, prompt: int, max_new_tokens: int = 0) -> Call:
        start = time.monotonic()
        try:
            reply = client.generate(user, PROMPTS[prompt], max_new_tokens=max_new_tokens or self.config.max_new_tokens)
        except PersonalizeClientError as exc:
            call = Call(
                "Generate", user, start, time.monotonic(), exc.code().name, prompt=prompt, text=exc.details()[:200]
            )
        else:
            call = Call(
                "Generate",
                user,
                start,
                time.monotonic(),
                "OK",
                reply.adapter_version,
                reply.node_id,
                prompt,
                reply.text,
                bool(getattr(reply, "degraded", False)),
            )
            self.owner[user] = reply.node_id
        self.calls.append(call)
        return call

    def feedback(self, client: PersonalizeClient, user: str, give_up_at: float) -> Event:
        """A new event for `user` (its slot taken by _feedback_due), sent until acked or `give_up_at` (then
        it is left for Chaos.resend_unacked)."""
        event = self.new_event(user)
        try:
            self.send(client, event, give_up_at)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()
        return event

    def new_event(self, user: str) -> Event:
        event = Event(f"chaos-{os.urandom(8).hex()}", user)
        with self._lock:
            self.events[event.key] = event
        return event

    def send(self, client: PersonalizeClient, event: Event, give_up_at: float) -> bool:
        """SubmitFeedback with the event's key until acked (backoff 0.2 s .. 2 s) or `give_up_at`."""
        backoff = 0.2
        while not event.acked:
            event.attempts += 1
            start = time.monotonic()
            try:
                ack = client.feedback(event.user, PROMPTS[0], f"Hello {event.user}", kind="accept", event_key=event.key)
            except PersonalizeClientError as exc:
                self.calls.append(
                    Call(
                        "SubmitFeedback", event.user, start, time.monotonic(), exc.code().name, text=exc.details()[:200]
                    )
                )
                if time.monotonic() + backoff > give_up_at:
                    return False
                time.sleep(backoff)
                backoff = min(2.0, backoff * 2)
            else:
                self.calls.append(Call("SubmitFeedback", event.user, start, time.monotonic(), "OK"))
                event.event_id, event.acked = ack.event_id, True
        return True

    def acked(self) -> Counter[str]:
        with self._lock:
            return Counter(e.user for e in self.events.values() if e.acked)

    def acked_events(self) -> list[Event]:
        with self._lock:
            return [e for e in self.events.values() if e.acked]

    def unacked(self) -> list[Event]:
        with self._lock:
            return [e for e in self.events.values() if not e.acked]
