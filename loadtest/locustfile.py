"""Locust workload for personalize: a million app users behind a few app-backend connections.

Each locust user is one app backend connection (a `PersonalizeClient`) making calls on behalf of end users
whose ids are drawn Zipf(s) over a population (default 1,000,000 users, s = 1.1: a few hot users, a long
tail of cold ones). Every call is reported to locust (request type "grpc") under its RPC name, so locust's
stats, charts, CSV and HTML report count it:

    Generate                unary generation
    GenerateStream          streaming generation, start to last chunk
    GenerateStream:ttfp     the same streams, start to first text piece (time to first token, TTFT)
    GenerateStream:itl      the same streams, between consecutive text pieces (inter-token latency)
    SubmitFeedback          a feedback event (accept / correct / reject / prefer)

Run (the server's address is locust's --host, or env PERSONALIZE_TARGET):

    locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 60s --host 127.0.0.1:50051 \\
        --population 1000000 --zipf-s 1.1 --mix generate=80,stream=10,feedback=10 --seed 0

Knobs (flag / environment variable / default): --api-key PERSONALIZE_API_KEY (none); --population
LOADTEST_POPULATION 1000000; --zipf-s LOADTEST_ZIPF_S 1.1; --mix LOADTEST_MIX
generate=80,stream=10,feedback=10; --feedback-kinds LOADTEST_FEEDBACK_KINDS accept=5,correct=3,reject=1,
prefer=1; --prompt-chars LOADTEST_PROMPT_CHARS 64; --max-new-tokens LOADTEST_MAX_NEW_TOKENS 32;
--seed LOADTEST_SEED 0; --user-prefix LOADTEST_USER_PREFIX user-; --think-time LOADTEST_THINK_TIME 0
(mean seconds between a locust user's calls, exponential; 0 = back to back); --call-timeout
LOADTEST_CALL_TIMEOUT 120; --protocol LOADTEST_PROTOCOL grpc (http: the same calls through the
OpenAI-compatible API, --host http://127.0.0.1:8000, reported as request type "http" under the same names);
--record-dir LOADTEST_RECORD_DIR (none).

With --record-dir, each locust process writes `record-<pid>.json` there when the test stops: the users it
sent feedback to (user -> events acknowledged) and the cache tiers its generations were served from, so
loadtest/loadtest_run.py can check the trainer applied every event. The same seed, population and
locust user count give the same user and call sequence per locust user (timing still varies).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

from personalize_service.client import PersonalizeClient

grpc_gevent.init_gevent()  # grpc's C core must yield to gevent, or one call blocks every locust user

CALLS = ("generate", "stream", "feedback")
KINDS = ("accept", "correct", "reject", "prefer")
WORDS = (
    "the",
    "adapter",
    "user",
    "model",
    "cache",
    "slot",
    "batch",
    "token",
    "lora",
    "rank",
    "serve",
    "learn",
    "answer",
    "prompt",
    "quick",
    "brown",
    "fox",
    "hello",
    "world",
    "tell",
    "me",
    "about",
)
DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_HTTP_TARGET = "http://127.0.0.1:8000"


# ---- options -------------------------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def add_arguments(parser: Any) -> None:
    """The workload's knobs as locust options (each also read from its environment variable; shown in the
    web UI; not in `locust --help`, which is printed before the locustfile loads)."""
    parser.add_argument(
        "--api-key",
        env_var="PERSONALIZE_API_KEY",
        default="",
        is_secret=True,
        help="API key sent as 'authorization: Bearer KEY' (none = no key)",
    )
    parser.add_argument(
        "--population",
        type=int,
        env_var="LOADTEST_POPULATION",
        default=1_000_000,
        help="distinct end users ids are drawn from",
    )
    parser.add_argument(
        "--zipf-s",
        type=float,
        env_var="LOADTEST_ZIPF_S",
        default=1.1,
        help="Zipf exponent of user popularity (P(rank k) ~ 1/k^s)",
    )
    parser.add_argument(
        "--mix",
        env_var="LOADTEST_MIX",
        default="generate=80,stream=10,feedback=10",
        help="call weights: generate, stream, feedback",
    )
    parser.add_argument(
        "--feedback-kinds",
        env_var="LOADTEST_FEEDBACK_KINDS",
        default="accept=5,correct=3,reject=1,prefer=1",
        help="feedback kind weights",
    )
    parser.add_argument(
        "--prompt-chars",
        type=int,
        env_var="LOADTEST_PROMPT_CHARS",
        default=64,
        help="prompt length in characters (~ tokens for the byte-level tiny model)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        env_var="LOADTEST_MAX_NEW_TOKENS",
        default=32,
        help="max_new_tokens of each generation",
    )
    parser.add_argument(
        "--seed", type=int, env_var="LOADTEST_SEED", default=0, help="seed of every user draw, call choice and prompt"
    )
    parser.add_argument(
        "--user-prefix",
        env_var="LOADTEST_USER_PREFIX",
        default="user-",
        help="end user ids are PREFIX + rank (rank 0 hottest)",
    )
    parser.add_argument(
        "--think-time",
        type=float,
        env_var="LOADTEST_THINK_TIME",
        default=0.0,
        help="mean seconds a locust user waits between calls (exponential; 0 = none)",
    )
    parser.add_argument(
        "--call-timeout",
        type=float,
        env_var="LOADTEST_CALL_TIMEOUT",
        default=120.0,
        help="deadline of each call in seconds",
    )
    parser.add_argument(
        "--protocol",
        env_var="LOADTEST_PROTOCOL",
        default="grpc",
        choices=["grpc", "http"],
        help="grpc: the SDK against --host HOST:PORT; http: the OpenAI-compatible API at --host http://HOST:PORT",
    )
    parser.add_argument(
        "--record-dir",
        env_var="LOADTEST_RECORD_DIR",
        default="",
        help="write record-<pid>.json (feedback users, cache tiers seen) here on test stop",
    )


def parse_weights(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """'a=80,b=20' -> {'a': 0.8, 'b': 0.2} over `names` (missing names weigh 0); ValueError if malformed."""
    weights = dict.fromkeys(names, 0.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in weights:
            raise ValueError(f"{part!r} in {text!r}: expected NAME=WEIGHT with NAME one of {list(names)}")
        weights[name.strip()] = float(value)
    total = sum(weights.values())
    if total <= 0 or any(w < 0 for w in weights.values()):
        raise ValueError(f"{text!r}: weights must be >= 0 and not all 0")
    return {name: w / total for name, w in weights.items()}


@dataclass(frozen=True)
class Workload:
    """The workload's parameters, from locust's parsed options (defaults when run without them)."""

    api_key: str = ""
    population: int = 1_000_000
    zipf_s: float = 1.1
    mix: str = "generate=80,stream=10,feedback=10"
    feedback_kinds: str = "accept=5,correct=3,reject=1,prefer=1"
    prompt_chars: int = 64
    max_new_tokens: int = 32
    seed: int = 0
    user_prefix: str = "user-"
    think_time: float = 0.0
    call_timeout: float = 120.0
    protocol: str = "grpc"
    record_dir: str = ""

    @classmethod
    def from_options(cls, options: Any) -> Workload:
        if options is None:
            return cls()
        return cls(
            **{
                name: getattr(options, name)
                for name in cls.__dataclass_fields__
                if getattr(options, name, None) is not None
            }
        )

    def call_weights(self) -> dict[str, float]:
        return parse_weights(self.mix, CALLS)

    def kind_weights(self) -> dict[str, float]:
        return parse_weights(self.feedback_kinds, KINDS)


# ---- user ids ------------------------------------------------------------------------------------------


class ZipfUsers:
    """Bounded Zipf over user ranks 0..population-1 (rank 0 hottest), sampled by inverse CDF."""

    def __init__(self, population: int, s: float) -> None:
        if population < 1:
            raise ValueError(f"population must be >= 1, got {population}")
        weights = np.arange(1, population + 1, dtype=np.float64) ** -s
        self.cdf = np.cumsum(weights)
        self.cdf /= self.cdf[-1]

    def draw(self, rng: np.random.Generator) -> int:
        """One rank; P(k) ∝ 1/(k+1)^s."""
        return min(int(np.searchsorted(self.cdf, rng.random(), side="right")), len(self.cdf) - 1)


@functools.lru_cache(maxsize=4)
def zipf_users(population: int, s: float) -> ZipfUsers:
    """The CDF, computed once per process (8 bytes per user)."""
    return ZipfUsers(population, s)


# ---- what the run saw: feedback users and cache tiers ---------------------------------------------------


class Record:
    """Per-process tally, written to --record-dir when the test stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.feedback: Counter[str] = Counter()
        self.tiers: Counter[str] = Counter()

    def feedback_acked(self, user_id: str) -> None:
        with self._lock:
            self.feedback[user_id] += 1

    def served_from(self, tier: str) -> None:
        with self._lock:
            self.tiers[tier or "none"] += 1

    def write(self, directory: str) -> Path:
        path = Path(directory) / f"record-{os.getpid()}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            data = {"feedback": dict(self.feedback), "cache_tiers": dict(self.tiers)}
        path.write_text(json.dumps(data, sort_keys=True))
        return path


RECORD = Record()


@events.test_stop.add_listener
def write_record(environment: Environment, **_kwargs: Any) -> None:
    """Each locust process (master holds none in distributed runs) writes what its users did."""
    workload = Workload.from_options(environment.parsed_options)
    if workload.record_dir and (RECORD.feedback or RECORD.tiers):
        RECORD.write(workload.record_dir)


# ---- the OpenAI-compatible API, with the SDK's call shapes ------------------------------------------------


@dataclass(frozen=True)
class HttpReply:
    """What the workload reads of an answer: its size, the cache tier (headers), the text."""

    text: str
    cache_tier: str
    size: int

    def ByteSize(self) -> int:  # the protobuf message's name, so both protocols report alike
        return self.size


class HttpStream:
    """A streamed completion: iterate the text pieces; `response` once it ended with `data: [DONE]`."""

    def __init__(self, http: Any, body: dict[str, Any]) -> None:
        self._http, self._body = http, body
        self.response: HttpReply | None = None

    def __iter__(self) -> Any:
        texts: list[str] = []
        with self._http.stream("POST", "/v1/completions", json=self._body) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if line == "data: [DONE]":
                    self.response = HttpReply("".join(texts), "", sum(len(t.encode()) for t in texts))
                elif line.startswith("data: "):
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("text"):
                        texts.append(choices[0]["text"])
                        yield choices[0]["text"]

    def __enter__(self) -> HttpStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


class HttpSdk:
    """The SDK's generate / generate_stream / feedback over /v1/completions and /v1/feedback (httpx, one
    keep-alive connection pool per locust user)."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        import httpx  # only the http protocol needs it

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout)

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        reply = self.http.post(path, json=body)
        reply.raise_for_status()
        return reply

    def generate(self, user_id: str, prompt: str, max_new_tokens: int) -> HttpReply:
        body = {"prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "user": user_id}
        reply = self._post("/v1/completions", body)
        text = reply.json()["choices"][0]["text"]
        return HttpReply(text, reply.headers.get("x-personalize-cache-tier", ""), len(reply.content))

    def generate_stream(self, user_id: str, prompt: str, max_new_tokens: int) -> HttpStream:
        body = {"prompt": prompt, "max_tokens": max_new_tokens, "temperature": 0, "user": user_id, "stream": True}
        return HttpStream(self.http, body)

    def feedback(self, user_id: str, prompt: str, completion: str, kind: str, **extra: str) -> HttpReply:
        body = {"user": user_id, "prompt": prompt, "completion": completion, "kind": kind, **extra}
        reply = self._post("/v1/feedback", body)
        return HttpReply("", "", len(reply.content))

    def close(self) -> None:
        self.http.close()


# ---- the client locust sees ----------------------------------------------------------------------------


class LocustPersonalizeClient:
    """The SDK's calls, each reported to locust with `events.request.fire` (locust's pattern for non-HTTP
    protocols): response time in ms, response size in bytes, the exception if it failed."""

    def __init__(
        self,
        sdk: PersonalizeClient | HttpSdk,
        environment: Environment,
        record: Record = RECORD,
        protocol: str = "grpc",
    ) -> None:
        self.sdk = sdk
        self.environment = environment
        self.record = record
        self.protocol = protocol

    def _fire(
        self, name: str, started: float, length: int, exception: Exception | None, context: Mapping[str, Any]
    ) -> None:
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=exception,
            context=dict(context),
        )

    def _call(self, name: str, fn: Callable[[], Any], context: Mapping[str, Any]) -> Any:
        """fn() timed and reported under `name`; None on failure (reported, not raised)."""
        started = time.perf_counter()
        try:
            response = fn()
        except Exception as exc:  # every failure counts as a failed request, not a locust user error
            self._fire(name, started, 0, exc, context)
            return None
        self._fire(name, started, response.ByteSize(), None, context)
        return response

    def generate(self, user_id: str, prompt: str, max_new_tokens: int) -> Any:
        response = self._call(
            "Generate", lambda: self.sdk.generate(user_id, prompt, max_new_tokens=max_new_tokens), {"user_id": user_id}
        )
        if response is not None:
            self.record.served_from(response.cache_tier)
        return response

    def generate_stream(self, user_id: str, prompt: str, max_new_tokens: int) -> Any:
        """A stream, reported as 'GenerateStream:ttfp' at its first text piece (successful streams
        with text only), 'GenerateStream:itl' for the gap before each later piece, and 'GenerateStream'
        once the last chunk arrived (or it failed)."""
        context = {"user_id": user_id}
        started = previous = time.perf_counter()
        size = 0
        try:
            stream = self.sdk.generate_stream(user_id, prompt, max_new_tokens=max_new_tokens)
            with stream:
                for piece in stream:
                    name = "GenerateStream:itl" if size else "GenerateStream:ttfp"
                    self._fire(name, previous if size else started, len(piece.encode()), None, context)
                    previous = time.perf_counter()
                    size += len(piece.encode())
        except Exception as exc:
            self._fire("GenerateStream", started, size, exc, context)
            return None
        if stream.response is None:
            self._fire("GenerateStream", started, size, RuntimeError("stream ended without a final chunk"), context)
            return None
        self._fire("GenerateStream", started, size, None, context)
        self.record.served_from(stream.response.cache_tier)
        return stream.response

    def feedback(
        self, user_id: str, prompt: str, completion: str, kind: str, *, correction: str = "", rejected: str = ""
    ) -> Any:
        ack = self._call(
            "SubmitFeedback",
            lambda: self.sdk.feedback(
                user_id,
                prompt,
                completion,
                kind,  # type: ignore[arg-type]
                correction=correction,
                rejected=rejected,
            ),
            {"user_id": user_id, "kind": kind},
        )
        if ack is not None:
            self.record.feedback_acked(user_id)
        return ack

    def close(self) -> None:
        self.sdk.close()


# ---- the locust user -----------------------------------------------------------------------------------

_USER_NUMBERS = itertools.count()
"""Per process: the n-th locust user started here gets stream n of the seed."""


def _process_index(environment: Environment) -> int:
    runner = environment.runner
    return int(runner.worker_index) + 1 if isinstance(runner, WorkerRunner) else 0


class PersonalizeUser(User):
    """One app-backend connection making calls for Zipf-drawn end users, back to back (or --think-time)."""

    host = os.environ.get("PERSONALIZE_TARGET", DEFAULT_TARGET)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.workload = Workload.from_options(environment.parsed_options)
        self.users = zipf_users(self.workload.population, self.workload.zipf_s)
        self.rng = np.random.default_rng([self.workload.seed, _process_index(environment), next(_USER_NUMBERS)])
        calls, kinds = self.workload.call_weights(), self.workload.kind_weights()
        self.calls, self.call_p = list(calls), np.array(list(calls.values()))
        self.kinds, self.kind_p = list(kinds), np.array(list(kinds.values()))
        key, timeout = self.workload.api_key or None, self.workload.call_timeout
        sdk: PersonalizeClient | HttpSdk = (
            HttpSdk(self.host or DEFAULT_HTTP_TARGET, key, timeout)
            if self.workload.protocol == "http"
            else PersonalizeClient(self.host or DEFAULT_TARGET, api_key=key, timeout=timeout)
        )
        self.client = LocustPersonalizeClient(sdk, environment, protocol=self.workload.protocol)

    def wait_time(self) -> float:
        think = self.workload.think_time
        return float(self.rng.exponential(think)) if think > 0 else 0.0

    def on_stop(self) -> None:
        self.client.close()

    @task
    def call(self) -> None:
        """One call, chosen by the mix, for one Zipf-drawn end user."""
        call = self.calls[int(self.rng.choice(len(self.calls), p=self.call_p))]
        user_id = f"{self.workload.user_prefix}{self.users.draw(self.rng)}"
        prompt = self.text(self.workload.prompt_chars)
        if call == "generate":
            self.client.generate(user_id, prompt, self.workload.max_new_tokens)
        elif call == "stream":
            self.client.generate_stream(user_id, prompt, self.workload.max_new_tokens)
        else:
            self.send_feedback(user_id, prompt)

    def send_feedback(self, user_id: str, prompt: str) -> None:
        kind = self.kinds[int(self.rng.choice(len(self.kinds), p=self.kind_p))]
        answer_chars = max(8, self.workload.max_new_tokens)
        completion = self.text(answer_chars)
        extra = (
            {"correction": self.text(answer_chars)}
            if kind == "correct"
            else {"rejected": self.text(answer_chars)}
            if kind == "prefer"
            else {}
        )
        self.client.feedback(user_id, prompt, completion, kind, **extra)

    def text(self, chars: int) -> str:
        """Seeded words up to `chars` characters (at least one character)."""
        words: list[str] = []
        length = 0
        while length < chars:
            word = WORDS[int(self.rng.integers(len(WORDS)))]
            words.append(word)
            length += len(word) + 1
        return " ".join(words)[: max(1, chars)]
