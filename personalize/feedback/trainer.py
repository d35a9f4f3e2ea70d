"""The online trainer: feedback events of many users -> one batched training round -> new versions.

A round reads events (its own and dead consumers' pending first), drops events already applied
(id <= the user's last_event_id), trains every user's adapter together in one forward/backward per step
(row n uses its user's slot of a stacked, trainable adapter tensor; users' parameters are disjoint, so
gradients never mix), publishes each user's new version by CAS, and only then acknowledges the events.

Faults stay with the user they hit: a user whose adapter the store cannot serve right now waits for a later
round; one whose current object is corrupt or missing is retrained from its newest intact older version.
A user's events are published only as an unbroken prefix: an older unapplied event held by another trainer
makes the newer ones wait, since publishing past it would mark it applied.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from personalize.adapters.registry import AdapterRecord
from personalize.adapters.repository import AdapterRepository
from personalize.adapters.store.keys import user_digest
from personalize.errors import Conflict, CorruptObject, InvalidArgument, NotFound, PersonalizeError, Unavailable
from personalize.feedback.batch import TrainBatch, build_batch, select_rows
from personalize.feedback.events import FeedbackEvent, event_id_key
from personalize.feedback.examples import VersionExamples, encode, stored_examples, without_legacy
from personalize.feedback.losses import (
    chunked_token_logprobs,
    distinctive_mask,
    dpo_loss,
    sft_loss,
    unlikelihood_loss,
)
from personalize.feedback.replay import merge, rehearsal
from personalize.feedback.stacked import MaskedAdam, StackedAdapters
from personalize.feedback.stream import Delivered, FeedbackStream
from personalize.lora.adapter import Adapter
from personalize.lora.format import zero_adapter
from personalize.lora.layers import eject, inject, use_slots

if TYPE_CHECKING:
    from personalize.model import BaseModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerConfig:
    """How rounds are formed and how hard each trains."""

    rank: int = 8
    """Rank of a new user's adapter."""
    alpha: float = 16.0
    """LoRA alpha of a new user's adapter."""
    lr: float = 2e-3
    """Adam learning rate."""
    lr_ratio_b: float = 4.0
    """Learning-rate multiplier of lora_b over lora_a (LoRA+)."""
    steps: int = 4
    """Optimizer steps a user gets per new event in a round (replayed examples ride along), so the training
    an event receives does not depend on how events happened to be split into rounds ..."""
    min_steps: int = 1
    """... but at least this many per round ..."""
    max_steps: int = 48
    """... and at most this many."""
    fit_loss: float = 0.1
    """A user whose wanted answers (accept, correct, the chosen of prefer) still have a mean token NLL above
    this after its step budget keeps training ...; a half-learned answer is what loops ("ererer"). A user without
    rejects whose wanted answers are below learned_loss when the round begins takes no step: more steps on a
    learned answer are a fresh Adam's noise, and loop too. A user with prefer events also stops as soon as it gets
    below prefer_fit_loss (DPO's margin keeps growing and garbles the chosen answer); the others use their whole
    budget (stopping them early too cost CORRECT's generalization: 0.89 on unseen prompts)."""
    fit_steps: int = 16
    """... up to this many steps per new event (and at most max_steps)."""
    prefer_fit_loss: float = 0.05
    """fit_loss of a user with prefer events (where it stops mid-round, and what counts as learned when a
    round begins): at 0.1 one of ten chosen answers on unseen prompts still came out garbled ("Salutrene!")
    after 16 prefer events (tests/e2e/test_feedback_kinds.py, 8 of 10 where 9 are asserted)."""
    learned_loss: float = 0.25
    """A user without rejects or prefers whose wanted answers are below this mean token NLL when the round
    begins takes no step (a prefer user's bar is prefer_fit_loss; looser than fit_loss: an answer left at
    0.106 by its first round's fitting steps was trained again by each resend, a fresh Adam's 16 steps each
    time, and after 4 ACCEPTs 15 of 40 unrelated answers looped)."""
    warmup: int = 4
    """Steps over which a user's learning rate ramps up from lr/warmup to lr in every round: a round starts a
    fresh Adam, whose first update moves every weight by ~lr whatever the gradient's size."""
    lora_dropout: float = 0.2
    """Dropout on the adapters' input while training (not in a round's first step, which measures what is
    already learned and takes prefer's reference): a regularizer that makes a few examples generalize. On
    unseen prompts, 4 users per kind, seed 0, 0.0 -> 0.2 moved CORRECT / ACCEPT / PREFER from 0.95 / 0.82 /
    0.84 to 1.00 / 0.975 / 0.96 and a second behaviour kept through 12 rejects from 0.54 to 0.975
    (docs/feedback.md). Its masks come from a generator seeded by the round's events, so a round trained
    again gives the same adapters."""
    dropout_min_examples: int = 4
    """A user trains under lora_dropout only in a round with at least this many examples (new and
    rehearsed): one example has no pattern to generalize, and under dropout a one-event user ended its round
    half learned (clean NLL 0.15-0.19 where fit_loss is 0.1), which loops."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) on the adapters."""
    max_events: int = 256
    """Most events taken into one round."""
    max_tokens: int = 256
    """Longest training example (prompt + answer), in tokens; longer ones keep their end."""
    beta: float = 0.1
    """DPO temperature for prefer events."""
    reject_weight: float = 0.5
    """Weight of a reject event's unlikelihood loss against the other rows of the user's round (at 1.0, twelve
    rejects of one behaviour also wore down a second one: 0.95 -> 0.75; at 0.5 it stayed 0.95)."""
    reject_distinctive: bool = True
    """A reject's unlikelihood covers only the rejected answer's tokens that none of the user's wanted answers
    in the round (replayed ones included) contain: lowering the words and names it shares with them wore the
    user's other taught behaviour down too."""
    prefer_nll: float = 1.0
    """Weight of the chosen answer's mean token NLL added to a prefer event's DPO loss (as RPO and Llama 3's
    preference training): DPO alone only moves the chosen answer above the rejected one, this makes it likely."""
    grad_clip: float = 1.0
    """Per-user gradient norm cap (never a global norm, which would couple users)."""
    max_attempts: int = 3
    """Rounds an event may fail (non-finite loss) before it goes to the dead-letter stream."""
    claim_idle_ms: int = 30_000
    """Pending events idle this long (their trainer died) are claimed."""
    block_ms: int = 200
    """How long a read waits for new events."""
    linger_ms: int = 250
    """After the first new events arrive, how long to keep gathering more into the same round (bigger
    rounds batch better and train each user's burst together)."""
    replay: int = 16
    """Recent examples kept with each adapter and trained on again with new ones (0 = off) ..."""
    replay_per_event: int = 3
    """... at most this many of them per new event in a round (keeps rounds of trickling feedback small)."""
    loss_chunk_tokens: int = 1024
    """Answer tokens whose logits are computed at once (float32 [chunk, vocab], recomputed in backward):
    bounds the loss's memory at real vocabulary sizes instead of [rows, length, vocab] for the round."""

    def __post_init__(self) -> None:
        if self.rank < 1 or self.steps < 1 or self.lr <= 0 or self.max_events < 1:
            raise InvalidArgument("trainer rank, steps, max_events must be >= 1 and lr > 0")
        if not 1 <= self.min_steps <= self.max_steps:
            raise InvalidArgument("trainer steps need 1 <= min_steps <= max_steps")
        if self.loss_chunk_tokens < 1:
            raise InvalidArgument(f"trainer loss_chunk_tokens must be >= 1, got {self.loss_chunk_tokens}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise InvalidArgument(f"trainer lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def replay_for(self, new_events: int) -> int:
        """Most replayed examples a user with `new_events` new events trains on with them in a round."""
        return min(self.replay, self.replay_per_event * new_events)

    def steps_for(self, new_events: int) -> int:
        """Optimizer steps of a user bringing `new_events` new events to a round."""
        return max(self.min_steps, min(self.max_steps, self.steps * new_events))

    def fit_steps_for(self, new_events: int) -> int:
        """Most steps of such a user whose wanted answers are not learned yet (see fit_loss)."""
        return max(self.steps_for(new_events), min(self.max_steps, self.fit_steps * new_events))


@dataclass
class UserJob:
    """One user's share of a round."""

    tenant: str
    user_id: str
    record: AdapterRecord | None
    adapter: Adapter
    events: list[Delivered]
    replay: list[FeedbackEvent] = field(default_factory=list)
    """Earlier examples of this user, rehearsed with the new events (never counted as new)."""

    def training(self, rehearse: int) -> list[FeedbackEvent]:
        """The new events and up to `rehearse` earlier examples they do not contradict (see replay.py)."""
        new = [d.event for d in self.events]
        return [*rehearsal(self.replay, new, rehearse), *new]

    def examples(self, keep: int) -> list[FeedbackEvent]:
        """The examples (at most `keep`) to store with the next version for later rounds to rehearse."""
        return merge(self.replay, [d.event for d in self.events], keep)


@dataclass
class RoundReport:
    """What a round did, for metrics and tests."""

    events: int = 0
    users: int = 0
    published: list[tuple[str, str, int]] = field(default_factory=list)
    skipped_applied: int = 0
    failed_users: int = 0
    deferred_users: int = 0
    """Users whose fresh events wait for a later round (store unavailable, an older event held elsewhere)."""
    recovered_users: int = 0
    """Users retrained from an older intact version because their current object was corrupt or missing."""
    dead_lettered: int = 0
    publish_failures: int = 0
    """Publishes that failed (store or registry unreachable, an unwritable adapter); a Conflict is not one."""
    seconds: float = 0.0
    train_seconds: float = 0.0
    started_at: float = 0.0
    """Seconds since the epoch when the round began (for traces)."""
    traces: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    """(tenant, user_id) -> the traceparents of the user's events in the round (events that carried one)."""
    publish_times: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    """(tenant, user_id) -> (start, end) of the user's publish, seconds since the epoch."""


def train_round(
    model: Any, tokenizer: Any, jobs: list[UserJob], config: TrainerConfig, device: torch.device | str = "cpu"
) -> tuple[list[Adapter], list[bool], list[float]]:
    """Train every job's adapter together. Returns (new adapters, finite flags, last loss) per job."""
    stacked = StackedAdapters([j.adapter for j in jobs], model.config, device=device)
    batch = build_batch(
        tokenizer, [j.training(config.replay_for(len(j.events))) for j in jobs], config.max_tokens, device
    )
    eject(model)
    state = inject(model, stacked)
    # LoRA+: B learns faster than A (Hayou et al. 2024), which matters when B starts at zero.
    opt = MaskedAdam(
        [(list(stacked.a.values()), config.lr), (list(stacked.b.values()), config.lr * config.lr_ratio_b)],
        users=len(jobs),
        weight_decay=config.weight_decay,
        warmup=config.warmup,
    )
    budget = torch.tensor([config.steps_for(len(j.events)) for j in jobs], device=device)
    cap = torch.tensor([config.fit_steps_for(len(j.events)) for j in jobs], device=device)
    finite = torch.ones(len(jobs), dtype=torch.bool, device=device)
    unfit = torch.ones(len(jobs), dtype=torch.bool, device=device)
    rejects = torch.zeros(len(jobs), device=device).index_add(0, batch.user_index, batch.is_reject.float()) > 0
    prefers = torch.zeros(len(jobs), dtype=torch.bool, device=device)
    if batch.pairs.numel():  # DPO's margin grows without bound: a user with prefer events stops once fit
        prefers[batch.user_index[batch.pairs[:, 0]]] = True
    ref: torch.Tensor | None = None
    generator = torch.Generator(device=device).manual_seed(round_seed(jobs))
    rows_of = torch.bincount(batch.user_index, minlength=len(jobs))
    rates = torch.where(rows_of >= config.dropout_min_examples, config.lora_dropout, 0.0)
    dropped = bool((rates > 0).any())
    per_user = torch.zeros(len(jobs), device=device)
    fit_bar = torch.where(prefers, config.prefer_fit_loss, config.fit_loss)
    try:
        for step in range(int(cap.max())):
            active = finite & ((budget > step) | (unfit & (cap > step)))
            if not active.any():
                break
            rows = active[batch.user_index]  # only users with steps left pay for a forward/backward
            sub = batch if bool(rows.all()) else select_rows(batch, rows)
            dropout = (rates[sub.user_index], generator) if step and dropped else None  # step 0 measures
            per_user, fit, sub_ref = _user_losses(
                model, state, sub, config, None if ref is None else ref[rows], len(jobs), dropout
            )
            ref = sub_ref if ref is None else ref  # step 0 runs every row: the reference is complete
            finite &= torch.isfinite(per_user) | ~active
            unfit = torch.where(active, fit > fit_bar, unfit)
            if step == 0:  # already learned when the round began (a resent answer): no step, not one
                learned = (fit <= torch.where(prefers, fit_bar, config.learned_loss)) & ~rejects
            active &= finite & ((budget > step) | unfit) & ~learned  # each step a fresh Adam's noise
            active &= unfit | rejects | ~prefers
            total = torch.where(active, per_user, torch.zeros_like(per_user)).sum()
            opt.zero_grad()
            if not active.any():
                break
            total.backward()  # inactive users get no loss term, and MaskedAdam leaves them untouched
            stacked.clip_per_user(config.grad_clip)
            opt.step(active)
    finally:
        eject(model)
    adapters = [stacked.adapter(u, j.adapter.rank, j.adapter.alpha, j.adapter.metadata) for u, j in enumerate(jobs)]
    return adapters, finite.tolist(), per_user.detach().tolist()


def round_seed(jobs: list[UserJob]) -> int:
    """A round's dropout seed: a function of its users and their events' ids, nothing else."""
    h = hashlib.blake2b(digest_size=8)
    for j in jobs:
        h.update(repr((j.tenant, j.user_id, [d.event_id for d in j.events])).encode())
    return int.from_bytes(h.digest(), "big") >> 1


def _user_losses(
    model: Any,
    state: dict[str, Any],
    batch: TrainBatch,
    config: TrainerConfig,
    ref: torch.Tensor | None,
    users: int,
    dropout: tuple[torch.Tensor, torch.Generator] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, fit, reference) per user: fit is the mean token NLL of the answers the user wants."""
    with use_slots(state, batch.user_index, dropout):
        hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    logp, mask = chunked_token_logprobs(hidden, output_head(model), batch.labels, config.loss_chunk_tokens)
    seq = logp.sum(-1)
    ref = seq.detach() if ref is None else ref  # the reference is the user's version at round start
    nll = sft_loss(logp, mask)
    row_loss = torch.zeros_like(seq)
    row_loss = torch.where(batch.is_sft, nll, row_loss)
    wanted = batch.is_sft.clone()
    if batch.pairs.numel():
        wanted[batch.pairs[:, 0]] = True
    reject_mask = mask
    if config.reject_distinctive:
        reject_mask = distinctive_mask(mask, batch.labels[:, 1:], batch.user_index, wanted, batch.is_reject)
    row_loss = torch.where(batch.is_reject, unlikelihood_loss(logp, reject_mask), row_loss)
    weight = batch.is_sft.to(seq.dtype) + config.reject_weight * batch.is_reject.to(seq.dtype)
    if batch.pairs.numel():
        c, r = batch.pairs[:, 0], batch.pairs[:, 1]
        pair_loss = dpo_loss(seq[c], seq[r], ref[c], ref[r], config.beta)
        if config.prefer_nll:
            pair_loss = pair_loss + config.prefer_nll * nll[c]
        row_loss = row_loss.index_put((c,), pair_loss)
        weight = weight.index_put((c,), torch.ones_like(pair_loss))
    per_user = _per_user(row_loss * weight, weight, batch.user_index, users)
    fit = _per_user(nll.detach() * wanted, wanted.to(seq.dtype), batch.user_index, users)
    return per_user, fit, ref


def output_head(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The causal LM's hidden -> logits map, as its forward applies it (lm_head, then Gemma 2's final logit
    soft-capping when configured)."""
    cap = getattr(model.config, "final_logit_softcapping", None)

    def head(hidden: torch.Tensor) -> torch.Tensor:
        logits = model.lm_head(hidden)
        return torch.tanh(logits / cap) * cap if cap else logits

    return head


def _per_user(values: torch.Tensor, weight: torch.Tensor, user_index: torch.Tensor, users: int) -> torch.Tensor:
    """Weighted mean of row values [N] per user -> [U] (0 for a user without weight)."""
    total = torch.zeros(users, dtype=values.dtype, device=values.device).index_add(0, user_index, values)
    count = torch.zeros(users, dtype=values.dtype, device=values.device).index_add(0, user_index, weight)
    return total / count.clamp(min=1)


class Trainer:
    """Consumes the feedback stream and publishes new adapter versions. One round at a time."""

    def __init__(
        self,
        config: TrainerConfig,
        base: BaseModel,
        repo: AdapterRepository,
        stream: FeedbackStream,
        consumer: str,
        notify: Callable[[str, str, int], None] | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
    ) -> None:
        """`on_round(report)` runs after every round, empty ones too (the service's metrics and traces)."""
        self.config = config
        self.base = base
        self.repo = repo
        self.stream = stream
        self.consumer = consumer
        self.notify = notify
        self.on_round = on_round
        self.model = copy.deepcopy(base.model).float().requires_grad_(False)
        self._carry: list[Delivered] = []
        self._attempts: dict[str, int] = defaultdict(int)
        self.rounds = 0
        self.last_report = RoundReport()

    def _gather(self, got: list[Delivered], claim: bool) -> list[Delivered]:
        """Add claimed and new events to `got` (in place, so a failed read loses nothing gathered)."""
        if claim:
            got += self.stream.claim(self.consumer, self.config.claim_idle_ms, self.config.max_events)
        room = max(0, self.config.max_events - len(got))
        if room:
            got += self.stream.read(self.consumer, room, 0 if got else self.config.block_ms)
        deadline = time.monotonic() + self.config.linger_ms / 1000
        while got and len(got) < self.config.max_events and time.monotonic() < deadline:
            more = self.stream.read(
                self.consumer, self.config.max_events - len(got), max(1, int((deadline - time.monotonic()) * 1000))
            )
            if not more:
                break
            got += more
        return _unique(got)

    def _jobs(self, delivered: list[Delivered], report: RoundReport) -> list[UserJob]:
        by_user: dict[tuple[str, str], list[Delivered]] = defaultdict(list)
        for d in delivered:
            by_user[(d.event.tenant, d.event.user_id)].append(d)
        jobs = []
        for (tenant, user_id), events in by_user.items():
            record = self.repo.record(tenant, user_id)
            done_id = event_id_key(record.last_event_id) if record else (-1, -1)
            applied = [d.event_id for d in events if event_id_key(d.event_id) <= done_id]
            live = self.stream.pending_ids(tenant, user_id)
            fresh = [d for d in events if event_id_key(d.event_id) > done_id and d.event_id in live]
            stale = applied + [
                d.event_id for d in events if event_id_key(d.event_id) > done_id and d.event_id not in live
            ]
            self.stream.ack(tenant, user_id, stale)  # already applied, or deleted with the user
            report.skipped_applied += len(applied)
            fresh = self._unbroken(fresh, live, done_id, report)
            if fresh:
                job = self._job(tenant, user_id, record, fresh, report)
                if job is not None:
                    jobs.append(job)
        return jobs

    def _unbroken(
        self, fresh: list[Delivered], live: set[str], done_id: tuple[int, int], report: RoundReport
    ) -> list[Delivered]:
        """The fresh events older than any unapplied event of the user this trainer does not hold; the rest
        wait. Publishing last_event_id past such an event would make its holder skip it as applied."""
        held = {d.event_id for d in fresh}
        others = [k for i in live if i not in held and (k := event_id_key(i)) > done_id]
        if not fresh or not others:
            return fresh
        gap = min(others)
        waiting = [d for d in fresh if event_id_key(d.event_id) > gap]
        if waiting:
            self._carry += waiting
            report.deferred_users += 1
        return [d for d in fresh if event_id_key(d.event_id) < gap]

    def _job(
        self, tenant: str, user_id: str, record: AdapterRecord | None, events: list[Delivered], report: RoundReport
    ) -> UserJob | None:
        """The user's share of the round, or None when its adapter cannot be had now (events wait or fail)."""
        try:
            adapter = self._start_adapter(tenant, user_id, record, report)
            replay = stored_examples(self.repo, tenant, user_id, adapter).replay
        except Unavailable as exc:
            log.warning("user %r: adapter unavailable (%s); its events wait for a later round", user_id, exc)
            self._carry += events
            report.deferred_users += 1
            return None
        except Exception as exc:  # e.g. trained on another base, or an imported file we cannot use
            log.warning("user %r: cannot train on its adapter: %s", user_id, exc)
            report.failed_users += 1
            self._retry_or_dead_letter(events, f"adapter unusable: {_describe(exc)}", report)
            return None
        return UserJob(tenant, user_id, record, adapter, events, replay)

    def _start_adapter(self, tenant: str, user_id: str, record: AdapterRecord | None, report: RoundReport) -> Adapter:
        """The adapter the user's training starts from: the current version, or after losing it (corrupt or
        missing object) the newest intact older one, or the seeded zero adapter."""
        if record is None:
            return self._fresh_adapter(tenant, user_id)
        try:
            return self.repo.load(tenant, user_id, record)
        except (CorruptObject, NotFound) as exc:
            found = self.repo.load_intact(tenant, user_id, record.version)
            adapter, version = found if found is not None else (self._fresh_adapter(tenant, user_id), 0)
            log.warning(
                "user %r: adapter v%d is lost (%s); training v%d from %s",
                user_id,
                record.version,
                exc,
                record.version + 1,
                f"intact v{version}" if version else "a fresh adapter",
            )
            report.recovered_users += 1
            return adapter

    def _fresh_adapter(self, tenant: str, user_id: str) -> Adapter:
        # Seeded by the user's hash: a new user's starting point is the same on every trainer.
        g = torch.Generator().manual_seed(int.from_bytes(user_digest(tenant, user_id)[:4], "little"))
        return zero_adapter(self.repo.spec, self.config.rank, self.config.alpha, generator=g)

    def run_round(self, claim: bool = True) -> RoundReport:
        """Read, train, publish, acknowledge. Returns what happened (empty if no events arrived).

        If the round fails (the registry or stream unreachable), every event it held is carried to the next:
        those not yet acknowledged are then trained, the others recognised as applied."""
        start = time.perf_counter()
        report = RoundReport(started_at=time.time())
        got, self._carry = self._carry, []
        try:
            delivered = self._gather(got, claim)
            report.events = len(delivered)
            for d in delivered:
                if d.event.trace:
                    report.traces.setdefault((d.event.tenant, d.event.user_id), []).append(d.event.trace)
            jobs = self._jobs(delivered, report) if delivered else []
            report.users = len(jobs)
            if jobs:
                t0 = time.perf_counter()
                trained = self._train(jobs, report)
                report.train_seconds = time.perf_counter() - t0
                for job, adapter, ok, loss in trained:
                    self._finish(job, adapter, ok, loss, report)
        except BaseException:
            self._carry = _unique([*got, *self._carry])
            raise
        self.rounds += 1
        report.seconds = time.perf_counter() - start
        self.last_report = report
        if self.on_round is not None:
            try:
                self.on_round(report)
            except Exception:  # metrics and traces must never stop training
                log.exception("on_round hook failed")
        return report

    def _train(self, jobs: list[UserJob], report: RoundReport) -> list[tuple[UserJob, Adapter, bool, float]]:
        """Train the jobs together; if that raises, train each alone, so a user whose data breaks training
        (an exception of any type) fails alone and everyone else's events are still trained this round."""
        try:
            adapters, finite, losses = train_round(self.model, self.base.tokenizer, jobs, self.config)
            return list(zip(jobs, adapters, finite, losses, strict=True))
        except Exception as exc:
            if len(jobs) == 1:
                return self._fail_training(jobs[0], exc, report)
            log.warning("a batched round of %d users failed (%s); training them one by one", len(jobs), exc)
        out: list[tuple[UserJob, Adapter, bool, float]] = []
        for job in jobs:
            try:
                (adapter,), (ok,), (loss,) = train_round(self.model, self.base.tokenizer, [job], self.config)
                out.append((job, adapter, ok, loss))
            except Exception as exc:
                out += self._fail_training(job, exc, report)
        return out

    def _fail_training(self, job: UserJob, exc: Exception, report: RoundReport) -> list[Any]:
        log.warning("user %r: training failed: %s", job.user_id, _describe(exc))
        report.failed_users += 1
        self._retry_or_dead_letter(job.events, f"training failed: {_describe(exc)}", report)
        return []

    def _finish(self, job: UserJob, adapter: Adapter, ok: bool, loss: float, report: RoundReport) -> None:
        ids = [d.event_id for d in job.events]
        if not ok:
            report.failed_users += 1
            self._retry_or_dead_letter(job.events, f"loss not finite ({loss})", report)
            return
        if not self.stream.pending_ids(job.tenant, job.user_id) & set(ids):
            return  # the user was deleted during the round: publish nothing
        seen = (job.record.examples_seen if job.record else 0) + len(ids)
        examples = encode(VersionExamples(ids, job.examples(self.config.replay)))
        publish_start = time.time()
        try:
            last = max(ids, key=event_id_key)
            published = self.repo.publish(
                job.tenant, job.user_id, without_legacy(adapter), job.record, seen, last, examples
            )
            report.publish_times[(job.tenant, job.user_id)] = (publish_start, time.time())
        except Conflict:
            self._carry += job.events  # another writer won; retrain from its version next round
            return
        except Unavailable as exc:
            log.warning("publishing %s failed: %s; events stay pending", job.user_id, exc)
            report.publish_failures += 1
            self._carry += job.events
            return
        except Exception as exc:  # the user's adapter cannot be written (its data): retry, then dead-letter
            log.warning("publishing %s failed: %s", job.user_id, _describe(exc))
            report.failed_users += 1
            report.publish_failures += 1
            self._retry_or_dead_letter(job.events, f"publish failed: {_describe(exc)}", report)
            return
        if not self.stream.pending_ids(job.tenant, job.user_id) & set(ids):
            self.repo.delete(job.tenant, job.user_id)  # deleted while publishing: retract
            return
        self.stream.ack(job.tenant, job.user_id, ids)
        for i in ids:
            self._attempts.pop(i, None)
        report.published.append((job.tenant, job.user_id, published.record.version))
        if self.notify is not None:
            self.notify(job.tenant, job.user_id, published.record.version)

    def _retry_or_dead_letter(self, events: list[Delivered], reason: str, report: RoundReport) -> None:
        for d in events:
            self._attempts[d.event_id] += 1
            if self._attempts[d.event_id] >= self.config.max_attempts:
                self.stream.dead_letter(d, reason)
                self._attempts.pop(d.event_id, None)
                report.dead_lettered += 1
            else:
                self._carry.append(d)

    def run_forever(self, stop: threading.Event, claim_every_s: float = 5.0) -> None:
        """Rounds until `stop` is set; failures of a dependency back off and retry (events stay pending)."""
        self.stream.ensure_group()
        self._carry = self.stream.read_own_pending(self.consumer, self.config.max_events)  # restarted mid-round?
        last_claim = 0.0
        while not stop.is_set():
            try:
                now = time.monotonic()
                claim = now - last_claim >= claim_every_s
                if claim:
                    last_claim = now
                self.run_round(claim=claim)
            except PersonalizeError as exc:
                log.warning("trainer round failed: %s; retrying", exc)
                stop.wait(1.0)
            except Exception:  # a bug must not stop every tenant's training: log it, back off, go on
                log.exception("trainer round failed unexpectedly; retrying")
                stop.wait(1.0)


def _describe(exc: BaseException) -> str:
    """A short reason for the dead-letter stream: the exception's type and the start of its message."""
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _unique(delivered: list[Delivered]) -> list[Delivered]:
    """One of each event, oldest first (a carried event may also come back by claim or read)."""
    by_id = {d.event_id + "@" + str(d.partition): d for d in delivered}
    return sorted(by_id.values(), key=lambda d: event_id_key(d.event_id))
