"""Continuous batching: requests join the running batch between decode steps and leave when done.

One engine thread owns the model, the KV rows and the lanes. `submit` is thread-safe and returns a
handle whose iterator yields text pieces as they are produced. Row n of the running batch is KV row and
lane n; when a request leaves, the last row moves into its place, so the batch stays a dense prefix.

Isolation: a row whose logits are not finite (a poisoned adapter) fails alone with AdapterError naming
its adapter; a prefill that raises fails only its joiners; a decode that raises fails the running rows
but not the queue; the engine thread itself never exits on an error. Fairness: waiting requests queue
per tenant and join the batch round robin across tenants, so one tenant's flood delays another tenant's
request by at most the time until a row frees (one join per free row, tenants taking turns).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from personalize.engine.llama import FastLlama
from personalize.engine.sampling import finite_rows, is_greedy, penalize_rows, sample_token, token_logprob
from personalize.engine.text import ChatMessage, TextStream, encode_input
from personalize.engine.types import GenerationResult, RequestTimings, SamplingParams, StreamPiece
from personalize.errors import (
    AdapterError,
    DeadlineExceeded,
    InvalidArgument,
    PersonalizeError,
    ResourceExhausted,
)
from personalize.lora.slots import SlotPool

if TYPE_CHECKING:
    from personalize.model import BaseModel

log = logging.getLogger(__name__)
_DONE = object()
_KEEP_FINISHED = 2048
"""Finished results kept for take_finished (the service takes them every second; older ones are dropped)."""


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of the running batch."""

    max_batch: int = 32
    """Most requests decoded together (rows of the KV cache and lanes)."""
    max_len: int = 1024
    """Most tokens per request, prompt plus completion."""
    max_prefill_tokens: int = 4096
    """Most prompt tokens prefilled in one step (padded), so joins never stall decoding for long."""
    max_waiting: int = 1024
    """Most requests queued before submit answers RESOURCE_EXHAUSTED."""
    stream_interval: int = 4
    """Tokens a streamed piece gathers before its reader is woken (vLLM's --stream-interval): the first text
    goes at once (time to first token is untouched), later text in pieces of this many tokens, the rest when
    the request ends. Each piece is a queue put, a handler wake-up and a gRPC message; 1 = one per token."""

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_len < 2 or self.max_prefill_tokens < 1 or self.stream_interval < 1:
            raise InvalidArgument(
                "engine max_batch >= 1, max_len >= 2, max_prefill_tokens >= 1 and stream_interval >= 1 are required"
            )


@dataclass(eq=False)
class _Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    slot: int | None
    stream: TextStream
    on_done: Callable[[GenerationResult | None], None] | None
    generator: torch.Generator | None
    tenant: str = ""
    """Whose request: the waiting queue admits tenants round robin."""
    label: str = ""
    """What serves it, for errors ("adapter v3 of user 'u'"); empty = the base model."""
    on_admit: Callable[[], None] | None = None
    """Runs once its lane holds the copy of its slot: the slot's pin may go (the engine reads only the lane)."""
    pieces: queue.Queue[Any] = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    result: GenerationResult | None = None
    error: BaseException | None = None
    generated: int = 0
    logprobs: list[float] = field(default_factory=list)
    """With params.logprobs: log p of each generated token."""
    unsent: int = 0
    """How many of `logprobs` (the last ones) no piece has carried yet."""
    held: str = ""
    """Text produced since the last piece, held until `stream_interval` tokens have passed."""
    put_at: int = -1
    """`generated` when the last piece was queued; -1 until the first."""
    seen: torch.Tensor | None = None
    """With a repetition penalty: [V] bool, the tokens of the prompt and completion so far, kept up to date
    per token (rebuilding it from the history each step costs O(length) per token)."""
    last_token: int = 0
    position: int = 0
    timings: RequestTimings = field(default_factory=lambda: RequestTimings(submitted=time.time()))


class RequestHandle:
    """A submitted request: iterate for text pieces, or block on result()."""

    def __init__(self, request: _Request, engine: Engine) -> None:
        self._req = request
        self._engine = engine

    def __iter__(self) -> Iterator[str]:
        """The text as it is produced (see `pieces`)."""
        for piece in self.pieces():
            if piece.text:
                yield piece.text

    def pieces(self) -> Iterator[StreamPiece]:
        """The text as it is produced, with the logprobs of its tokens: each item joins every piece queued
        since the previous one, so a reader that falls behind the engine catches up in one item (one gRPC
        message) instead of many. The last item may have logprobs and no text (an EOS, a stop string)."""
        pieces = self._req.pieces
        while True:
            ready = [pieces.get()]
            while ready[-1] is not _DONE:
                try:
                    ready.append(pieces.get_nowait())
                except queue.Empty:
                    break
            done = ready[-1] is _DONE
            joined: list[StreamPiece] = ready[:-1] if done else ready
            if joined:
                text = "".join(p.text for p in joined)
                yield StreamPiece(text, tuple(lp for p in joined for lp in p.logprobs))
            if done:
                if self._req.error is not None:
                    raise self._req.error
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        if timeout is not None and timeout > 86400 * 365:  # beyond a year means none: Event.wait overflows
            timeout = None
        if not self._req.done.wait(timeout):
            self.cancel()
            raise DeadlineExceeded(f"generation did not finish within {timeout} s")
        if self._req.error is not None:
            raise self._req.error
        assert self._req.result is not None
        return self._req.result

    def cancel(self) -> None:
        """Ask the engine to drop the request at its next step (its result is 'cancelled')."""
        self._req.cancelled = True
        self._engine.wake()


class Engine:
    """Continuous-batching generator over one base model and a pool of device slots."""

    def __init__(self, base: BaseModel, config: EngineConfig, pool: SlotPool | None = None) -> None:
        self.base = base
        self.config = config
        self.tokenizer = base.tokenizer
        self.eos_ids = frozenset(getattr(base, "eos_ids", ())) or frozenset({self.tokenizer.eos_token_id})
        """Token ids that end a request (every EOS of the checkpoint's generation config)."""
        self.pool = pool
        self.pool_lock = threading.Lock()
        """Held while reading or writing `pool` slots (the cache writes, the engine copies into lanes)."""
        lanes = None
        if pool is not None:
            lanes = SlotPool(
                base.config, config.max_batch, pool.r_max, pool.target_modules, pool.scaling.dtype, pool.scaling.device
            )
        self.model = FastLlama(base.model, config.max_batch, config.max_len, lanes)
        self.device = base.device
        self._waiting = _FairQueue()
        self._running: list[_Request] = []
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0
        self.occupancy_sum = 0
        self.max_occupancy = 0
        self.tokens_generated = 0
        self._finished: deque[GenerationResult] = deque(maxlen=_KEEP_FINISHED)

    def take_finished(self) -> list[GenerationResult]:
        """Results (with timings) of the requests finished since the last call, oldest first; at most the
        last _KEEP_FINISHED are kept between calls (the service turns them into latency metrics)."""
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        return out

    # -- submission (any thread) -------------------------------------------------------------------------
    def encode(self, prompt: str | tuple[ChatMessage, ...]) -> list[int]:
        return encode_input(self.tokenizer, prompt)

    def submit(
        self,
        prompt: str | tuple[ChatMessage, ...] | list[int],
        params: SamplingParams,
        slot: int | None = None,
        on_done: Callable[[GenerationResult | None], None] | None = None,
        tenant: str = "",
        label: str = "",
        on_admit: Callable[[], None] | None = None,
    ) -> RequestHandle:
        """Queue a request of `tenant` using adapter `slot` of the pool (None = base model), named `label` in
        errors. on_admit runs once its lane holds the slot's copy (the slot is free to change from then on),
        on_done on completion. `prompt`: text, a chat (tuple of messages) or token ids (a list)."""
        ids = list(prompt) if isinstance(prompt, list) else self.encode(prompt)
        if len(ids) >= self.config.max_len:
            raise InvalidArgument(f"prompt is {len(ids)} tokens; the context limit is {self.config.max_len}")
        if slot is not None and (self.pool is None or not 0 <= slot < self.pool.num_slots):
            raise InvalidArgument(f"slot {slot} does not exist")
        gen = None
        if not is_greedy(params.temperature):
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        req = _Request(
            next(self._ids),
            ids,
            params,
            slot,
            TextStream(self.tokenizer, params.stop),
            on_done,
            gen,
            tenant,
            label,
            on_admit=on_admit,
        )
        with self._cond:
            if len(self._waiting) >= self.config.max_waiting:
                raise ResourceExhausted(f"engine queue is full ({self.config.max_waiting} waiting requests)")
            self._waiting.append(req)
            self._cond.notify()
        return RequestHandle(req, self)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def mean_occupancy(self) -> float:
        return self.occupancy_sum / self.steps if self.steps else 0.0

    # -- the engine thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait(0.5)
                if self._stop:
                    break
            try:
                self.step()
            except Exception as exc:  # last resort: fail the running rows, never hang callers or exit
                log.exception("engine step failed")
                self._fail_running(exc)

    def run_until_idle(self) -> None:
        """Step on the caller's thread until nothing is waiting or running (tests, benchmarks)."""
        while self._waiting or self._running:
            self.step()

    def step(self) -> None:
        """One iteration: drop cancelled rows, admit and prefill joiners, then decode every running row."""
        self._drop_cancelled()
        self._admit()
        if self._running:
            self._decode()

    # -- step parts -------------------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        for req in [r for r in self._running if r.cancelled]:
            self._finish(req, "cancelled")

    def _take_joiners(self) -> list[_Request]:
        joiners: list[_Request] = []
        budget = self.config.max_prefill_tokens
        with self._cond:
            while self._waiting and len(self._running) + len(joiners) < self.config.max_batch:
                req = self._waiting.peek()
                longest = max([len(r.prompt_ids) for r in joiners] + [len(req.prompt_ids)])
                if joiners and longest * (len(joiners) + 1) > budget:
                    break
                self._waiting.pop()
                if req.cancelled:
                    self._complete(req, GenerationResult("", len(req.prompt_ids), 0, "cancelled"))
                    continue
                joiners.append(req)
        return joiners

    def _admit(self) -> None:
        joiners = self._take_joiners()
        if not joiners:
            return
        row0 = len(self._running)
        lanes = self.model.lanes
        if lanes is not None:
            with self.pool_lock:
                for n, req in enumerate(joiners):
                    if req.slot is None:
                        lanes.clear_slot(row0 + n)
                    else:
                        assert self.pool is not None
                        lanes.copy_slot(self.pool, req.slot, row0 + n)
            for req in joiners:  # outside pool_lock: the callback takes the cache's lock
                _run_callback(req.on_admit)
        longest = max(len(r.prompt_ids) for r in joiners)
        ids = torch.zeros(len(joiners), longest, dtype=torch.long)
        for n, req in enumerate(joiners):
            ids[n, : len(req.prompt_ids)] = torch.tensor(req.prompt_ids)
        lengths = torch.tensor([len(r.prompt_ids) for r in joiners])
        admitted = time.time()
        for req in joiners:
            req.timings.admitted = admitted
        try:
            logits = self.model.prefill(ids.to(self.device), lengths.to(self.device), row0)
        except Exception as exc:  # only the joiners' rows were touched: the running batch goes on
            log.exception("prefill failed")
            for req in joiners:
                self._complete(req, None, _step_error(exc))
            return
        self._running.extend(joiners)
        for req in joiners:
            req.position = len(req.prompt_ids)
        self._sample_and_emit(joiners, logits)

    def _decode(self) -> None:
        batch = self._running
        self.steps += 1
        self.occupancy_sum += len(batch)
        self.max_occupancy = max(self.max_occupancy, len(batch))
        ids = torch.tensor([r.last_token for r in batch], device=self.device)
        positions = torch.tensor([r.position for r in batch], device=self.device)
        try:
            logits = self.model.decode(ids, positions)
        except Exception as exc:  # every running row's state is suspect; the queue is not
            log.exception("decode failed")
            self._fail_running(exc)
            return
        for r in batch:
            r.position += 1
        self._sample_and_emit(list(batch), logits)

    def _penalized(self, reqs: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        """logits with each row's repetition penalty applied over its prompt and completion so far."""
        rows = [n for n, r in enumerate(reqs) if r.params.repetition_penalty != 1.0]
        if not rows:
            return logits
        seen = torch.stack([_seen_mask(reqs[n], logits.shape[-1], logits.device) for n in rows])  # [rows, V]
        penalty = torch.tensor([reqs[n].params.repetition_penalty for n in rows], device=logits.device)
        out = logits.clone()
        index = torch.tensor(rows, device=logits.device)
        out[index] = penalize_rows(logits[index], seen, penalty)
        return out

    def _sample_and_emit(self, reqs: list[_Request], raw: torch.Tensor) -> None:
        finite = finite_rows(raw)
        logits = self._penalized(reqs, raw)
        greedy = torch.argmax(logits, dim=-1).tolist()
        for n, req in enumerate(reqs):
            if not finite[n]:
                what = req.label or "the base model"
                self._fail(req, AdapterError(f"{what} produced non-finite logits; its weights are unusable"))
                continue
            try:
                self._emit(req, greedy[n], logits[n], raw[n])
            except Exception as exc:  # this row's sampling or detokenizing failed: it alone ends
                log.exception("sampling request %d failed", req.id)
                self._fail(req, _step_error(exc))

    def _emit(self, req: _Request, greedy: int, logits: torch.Tensor, raw: torch.Tensor) -> None:
        """Choose the next token from (penalized) `logits`; its logprob, when asked, is under `raw`."""
        p = req.params
        if is_greedy(p.temperature):
            token = greedy
        else:
            token = sample_token(logits, p.temperature, p.top_p, req.generator, top_k=p.top_k)
        if p.logprobs:
            req.logprobs.append(token_logprob(raw, token))
            req.unsent += 1
        req.generated += 1
        self.tokens_generated += 1
        now, t = time.time(), req.timings
        if t.first_token:
            t.token_gaps.append(now - t.finished)
        else:
            t.first_token = now
        t.finished = now  # the latest token, until the request ends
        req.last_token = token
        if req.seen is not None:
            req.seen[token] = True
        if token in self.eos_ids and not p.ignore_eos:
            self._finish(req, "eos")
            return
        piece = req.stream.push(token)
        req.held += piece
        if req.stream.stopped:
            self._finish(req, "stop")
        elif req.generated >= p.max_new_tokens or req.position + 1 >= self.config.max_len:
            self._finish(req, "length")
        elif piece and (req.put_at < 0 or req.generated - req.put_at >= self.config.stream_interval):
            # only on a token that released text: a piece's logprobs are those of the tokens its text holds
            self._put(req, "")

    @staticmethod
    def _put(req: _Request, tail: str) -> None:
        """Queue the held text and `tail` as one piece for the request's reader, with the logprobs no piece
        has carried yet."""
        unsent = tuple(req.logprobs[len(req.logprobs) - req.unsent :]) if req.unsent else ()
        req.unsent, req.put_at = 0, req.generated
        text, req.held = req.held + tail, ""
        req.pieces.put(StreamPiece(text, unsent))

    def _remove(self, req: _Request) -> None:
        row = self._running.index(req)
        last = len(self._running) - 1
        if row != last:  # keep the batch a dense prefix: the last row takes the freed place
            self.model.move_row(last, row)
            self._running[row] = self._running[last]
        self._running.pop()

    def _fail(self, req: _Request, err: BaseException) -> None:
        self._remove(req)
        self._complete(req, None, err)

    def _finish(self, req: _Request, reason: str) -> None:
        self._remove(req)
        tail = req.stream.flush()
        if (tail or req.held or req.unsent) and reason != "cancelled":
            self._put(req, tail)
        req.timings.finished = time.time()
        result = GenerationResult(
            req.stream.text, len(req.prompt_ids), req.generated, reason, tuple(req.logprobs), req.timings
        )
        self._finished.append(result)
        self._complete(req, result)

    def _complete(self, req: _Request, result: GenerationResult | None, error: BaseException | None = None) -> None:
        req.result, req.error = result, error
        req.pieces.put(_DONE)
        req.done.set()
        if req.on_done is not None:
            try:
                req.on_done(result)
            except Exception:
                log.exception("on_done callback failed")

    def _fail_running(self, exc: BaseException) -> None:
        """Fail every running row (a step that raised outside any one row); waiting requests stay queued."""
        victims, self._running = self._running, []
        for req in victims:
            if not req.done.is_set():
                self._complete(req, None, _step_error(exc))


def _seen_mask(req: _Request, vocab: int, device: torch.device) -> torch.Tensor:
    """The request's [V] bool mask of seen tokens, built from its history on first use (then `_emit` keeps
    it current)."""
    if req.seen is None:
        req.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        req.seen[torch.tensor(req.prompt_ids + req.stream.ids, device=device)] = True
    return req.seen


def _run_callback(callback: Callable[[], None] | None) -> None:
    if callback is not None:
        try:
            callback()
        except Exception:
            log.exception("on_admit callback failed")


def _step_error(exc: BaseException) -> BaseException:
    return exc if isinstance(exc, PersonalizeError) else RuntimeError(f"engine step failed: {exc}")


class _FairQueue:
    """Waiting requests, one FIFO per tenant; peek/pop take the tenants in turn (round robin).

    Not thread-safe: the engine's condition guards it."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[_Request]] = {}
        self._turn: deque[str] = deque()
        """Tenants with waiting requests; the first one's request is next."""
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[_Request]:
        for q in self._queues.values():
            yield from q

    def append(self, req: _Request) -> None:
        q = self._queues.get(req.tenant)
        if q is None:
            q = self._queues[req.tenant] = deque()
            self._turn.append(req.tenant)
        q.append(req)
        self._size += 1

    def peek(self) -> _Request:
        return self._queues[self._turn[0]][0]

    def pop(self) -> _Request:
        tenant = self._turn.popleft()
        q = self._queues[tenant]
        req = q.popleft()
        self._size -= 1
        if q:
            self._turn.append(tenant)  # back of the line: every other waiting tenant goes first
        else:
            del self._queues[tenant]
        return req
