"""Batched multi-user training: losses behave, users' gradients never mix, ranks are kept."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from personalize.errors import InvalidArgument
from personalize.feedback.batch import build_batch, encode_example
from personalize.feedback.events import FeedbackEvent
from personalize.feedback.examples import VersionExamples, decode, encode, legacy_replay
from personalize.feedback.losses import (
    chunked_token_logprobs,
    distinctive_mask,
    distinctive_mask_reference,
    dpo_loss,
    sft_loss,
    token_logprobs,
    unlikelihood_loss,
)
from personalize.feedback.stacked import MaskedAdam
from personalize.feedback.stream import Delivered
from personalize.feedback.trainer import TrainerConfig, UserJob, train_round
from personalize.lora.adapter import Adapter
from personalize.lora.format import AdapterSpec, zero_adapter
from personalize.lora.layers import lora_dropout
from personalize.model import BaseModel
from tests.helpers import make_adapter


def _event(user: str, kind: str, i: int) -> FeedbackEvent:
    return FeedbackEvent(
        "t", user, kind, f"Q: question {i}?\nA: ", f"answer {i}", correction=f"better {i}", rejected=f"worse {i}"
    )


def _job(base: BaseModel, user: str, kinds: list[str], seed: int, rank: int = 4) -> UserJob:
    spec = AdapterSpec.for_model(base.model, 16)
    adapter = zero_adapter(spec, rank, 2.0 * rank, generator=torch.Generator().manual_seed(seed))
    events = [Delivered(0, f"1-{i}", _event(user, k, i)) for i, k in enumerate(kinds)]
    return UserJob("t", user, None, adapter, events)


def test_losses_prefer_the_right_answer() -> None:
    logits = torch.zeros(2, 3, 5)
    logits[0, :, 2] = 5.0  # row 0 puts its mass on token 2
    labels = torch.tensor([[-100, 2, 2], [-100, 2, 2]])
    logp, mask = token_logprobs(logits, labels)
    assert mask.sum() == 4
    sft = sft_loss(logp, mask)
    assert sft[0] < sft[1]  # likely answer -> low NLL
    ul = unlikelihood_loss(logp, mask)
    assert ul[0] > ul[1]  # likely answer -> high unlikelihood penalty
    seq = logp.sum(-1)
    assert dpo_loss(seq[:1], seq[1:], torch.zeros(1), torch.zeros(1), 0.1) < dpo_loss(
        seq[1:], seq[:1], torch.zeros(1), torch.zeros(1), 0.1
    )


@pytest.mark.parametrize("chunk_tokens", [1, 4, 10_000])
def test_chunked_loss_equals_the_full_logits_loss_and_grads(chunk_tokens: int) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 9, 16, generator=g)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[:, :4] = -100  # prompts
    labels[1, 7:] = -100  # padding
    results = []
    for chunked in (False, True):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad()
        if chunked:
            logp, mask = chunked_token_logprobs(h, head, labels, chunk_tokens)
        else:
            logp, mask = token_logprobs(head(h), labels)
        loss = (sft_loss(logp, mask) + unlikelihood_loss(logp, mask) + logp.sum(-1)).sum()
        loss.backward()
        assert h.grad is not None and head.weight.grad is not None
        results.append((logp.detach(), mask, loss.detach(), h.grad.clone(), head.weight.grad.clone()))
    (full_logp, full_mask, full_loss, full_dh, full_dw), (logp, mask, loss, dh, dw) = results
    assert torch.equal(mask, full_mask)
    assert torch.allclose(logp, full_logp, atol=1e-6) and torch.allclose(loss, full_loss, atol=1e-5)
    assert torch.allclose(dh, full_dh, atol=1e-6) and torch.allclose(dw, full_dw, atol=1e-6)


def test_a_reject_lowers_only_its_distinctive_tokens() -> None:
    """Tokens a user's wanted answers also contain (a name, common words) leave the rejected answer's loss;
    another user's wanted answers do not protect them."""
    targets = torch.tensor([[5, 7, 9, 2], [6, 7, 9, 2], [5, 7, 8, 2], [6, 7, 8, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    users = torch.tensor([0, 0, 1, 0])
    wanted = torch.tensor([True, False, True, False])
    reject = torch.tensor([False, True, False, True])
    got = distinctive_mask(mask, targets, users, wanted, reject)
    assert got[1].tolist() == [True, False, False, False]  # 7, 9, 2 are in user 0's wanted row
    assert got[3].tolist() == [True, False, True, False]  # 8 is only user 1's
    assert torch.equal(got[[0, 2]], mask[[0, 2]])
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        targets = torch.randint(0, 12, (9, 6), generator=g)
        mask = torch.rand(9, 6, generator=g) > 0.2
        users = torch.randint(0, 3, (9,), generator=g)
        kind = torch.randint(0, 3, (9,), generator=g)
        wanted, reject = kind == 0, kind == 1
        assert torch.equal(
            distinctive_mask(mask, targets, users, wanted, reject),
            distinctive_mask_reference(mask, targets, users, wanted, reject),
        )


def test_batch_labels_cover_only_the_answer(base: BaseModel) -> None:
    ids, labels = encode_example(base.tokenizer, "Q: hi", "yo", 64)
    assert labels[: len(ids) - 3] == [-100] * (len(ids) - 3)
    assert labels[-3:] == ids[-3:] and ids[-1] == base.tokenizer.eos_token_id
    batch = build_batch(base.tokenizer, [[_event("a", "prefer", 0)], [_event("b", "reject", 1)]], 64)
    assert batch.user_index.tolist() == [0, 0, 1]
    assert batch.pairs.tolist() == [[0, 1]]
    assert batch.is_reject.tolist() == [False, False, True]


def test_users_trained_together_equal_users_trained_alone(base: BaseModel) -> None:
    """Gradients never mix: a user's new adapter does not depend on who else shared the round (without LoRA
    dropout, whose masks are drawn for the round's whole batch at once)."""
    # Users get 2, 4 and 6 steps: budgets differ (no fitting steps: at this lr, rounding noise grows over many).
    cfg = TrainerConfig(steps=2, min_steps=2, lr=1e-2, fit_steps=0, lora_dropout=0.0)
    model = copy.deepcopy(base.model).requires_grad_(False)
    jobs = [
        _job(base, "alice", ["correct", "accept"], 1),
        _job(base, "bob", ["reject", "prefer", "correct"], 2),
        _job(base, "carol", ["prefer"], 3, rank=8),
    ]
    together, finite, _ = train_round(model, base.tokenizer, jobs, cfg)
    assert all(finite)
    for job, adapter in zip(jobs, together, strict=True):
        (alone,), _, _ = train_round(model, base.tokenizer, [job], cfg)
        for key, (a, b) in adapter.weights.items():
            torch.testing.assert_close(a, alone.weights[key][0], atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(b, alone.weights[key][1], atol=2e-5, rtol=1e-4)
        assert adapter.rank == job.adapter.rank
        moved = sum(float((b - job.adapter.weights[k][1]).abs().sum()) for k, (_, b) in adapter.weights.items())
        assert moved > 0


def test_lora_dropout_is_on_and_a_round_trained_again_from_the_same_events_gives_the_same_adapters(
    base: BaseModel,
) -> None:
    model = copy.deepcopy(base.model).requires_grad_(False)
    jobs = [_job(base, "alice", ["correct", "accept"], 1), _job(base, "bob", ["prefer"], 2)]
    cfg = TrainerConfig(steps=3, min_steps=3, lr=1e-2, fit_steps=0, dropout_min_examples=1)
    assert cfg.lora_dropout > 0
    runs = [train_round(model, base.tokenizer, jobs, c)[0] for c in (cfg, cfg, replace(cfg, lora_dropout=0.0))]
    for first, again, undropped in zip(*runs, strict=True):
        assert all(torch.equal(first.weights[k][1], again.weights[k][1]) for k in first.weights)
        assert not all(torch.equal(first.weights[k][1], undropped.weights[k][1]) for k in first.weights)
    other = [jobs[0], UserJob("t", "bob", None, jobs[1].adapter, [replace(jobs[1].events[0], event_id="9-9")])]
    reseeded = train_round(model, base.tokenizer, other, cfg)[0][0]
    assert not all(torch.equal(runs[0][0].weights[k][1], reseeded.weights[k][1]) for k in reseeded.weights)
    with pytest.raises(InvalidArgument, match="lora_dropout must be in"):
        TrainerConfig(lora_dropout=1.0)


def test_lora_dropout_per_row_drops_and_rescales_only_the_rows_given_a_rate() -> None:
    x = torch.ones(3, 50, 40)
    rates = torch.tensor([0.0, 0.5, 0.2])
    out = lora_dropout(x, rates, torch.Generator().manual_seed(1))
    assert torch.equal(out[0], x[0])
    for row, p in ((1, 0.5), (2, 0.2)):
        kept = out[row] != 0
        assert out[row][kept].unique().tolist() == pytest.approx([1 / (1 - p)])
        assert abs(float(kept.float().mean()) - (1 - p)) < 0.05
    assert torch.equal(out, lora_dropout(x, rates, torch.Generator().manual_seed(1)))
    assert not torch.equal(out, lora_dropout(x, rates, torch.Generator().manual_seed(2)))


def test_a_user_with_fewer_examples_than_dropout_min_examples_trains_without_dropout(base: BaseModel) -> None:
    """One example has no pattern to generalize; under dropout a one-event user ended half learned (loops)."""
    model = copy.deepcopy(base.model).requires_grad_(False)
    jobs = [_job(base, "one", ["accept"], 1), _job(base, "four", ["correct"] * 4, 2)]
    cfg = TrainerConfig(steps=3, min_steps=3, lr=1e-2, fit_steps=0)
    dropped, plain = (train_round(model, base.tokenizer, jobs, c)[0] for c in (cfg, replace(cfg, lora_dropout=0.0)))
    same = [
        all(torch.equal(d.weights[k][1], p.weights[k][1]) for k in d.weights)
        for d, p in zip(dropped, plain, strict=True)
    ]
    assert same == [True, False]


def test_training_lowers_the_loss_and_keeps_padding_zero(base: BaseModel) -> None:
    model = copy.deepcopy(base.model).requires_grad_(False)
    jobs = [_job(base, "dave", ["correct"] * 4, 4, rank=2), _job(base, "erin", ["correct"] * 4, 5, rank=8)]
    _, _, first = train_round(model, base.tokenizer, jobs, TrainerConfig(steps=1, min_steps=1, max_steps=1))
    adapters, _, later = train_round(model, base.tokenizer, jobs, TrainerConfig(steps=3, min_steps=12, lr=1e-2))
    assert all(b < a for a, b in zip(first, later, strict=True))
    assert all(a.shape[0] == 2 for a, _ in adapters[0].weights.values())


def test_a_half_learned_answer_keeps_training_until_it_is_fit(base: BaseModel) -> None:
    """One event's step budget leaves its answer half learned (which loops); fitting steps finish it."""
    model = copy.deepcopy(base.model).requires_grad_(False)
    jobs = [_job(base, "hana", ["accept"], 7)]
    _, _, (budget_only,) = train_round(model, base.tokenizer, jobs, TrainerConfig(fit_steps=0))
    _, _, (fitted,) = train_round(model, base.tokenizer, jobs, TrainerConfig(fit_loss=0.1, fit_steps=32))
    assert budget_only > 0.1 >= fitted


def test_a_learned_answer_takes_no_more_steps(base: BaseModel) -> None:
    """A round starts a fresh Adam, whose steps move every weight by ~lr however small the gradient: once an
    answer is learned, more steps are noise (the same ACCEPT in a second round looped 20 of 40 answers)."""
    model = copy.deepcopy(base.model).requires_grad_(False)
    job = _job(base, "kai", ["accept"], 9)
    (learned,), _, _ = train_round(model, base.tokenizer, [job], TrainerConfig())
    again = UserJob("t", "kai", None, learned, job.events)
    probe = TrainerConfig(steps=1, min_steps=1, max_steps=1, fit_steps=0, lr=1e-12)  # a first step: no dropout
    assert train_round(model, base.tokenizer, [again], probe)[2][0] <= TrainerConfig().learned_loss  # learned
    (after,), _, _ = train_round(model, base.tokenizer, [again], TrainerConfig())
    for key, (a, b) in learned.weights.items():
        assert torch.equal(a, after.weights[key][0]) and torch.equal(b, after.weights[key][1])


def test_an_answer_nearly_learned_when_the_round_begins_takes_no_step(base: BaseModel) -> None:
    """Below learned_loss at the round's start a resent answer is left alone even above fit_loss: retraining a
    nearly learned answer every resend (a fresh Adam each time) sent 15 of 40 unrelated answers into loops."""
    model = copy.deepcopy(base.model).requires_grad_(False)
    job = _job(base, "lena", ["accept"], 10)
    (learned,), _, _ = train_round(model, base.tokenizer, [job], TrainerConfig())
    again = UserJob("t", "lena", None, learned, job.events)
    probe = TrainerConfig(steps=1, min_steps=1, max_steps=1, fit_steps=0, lr=1e-12)
    (_, _, (start,)) = train_round(model, base.tokenizer, [again], probe)
    for learned_loss, moves in ((2 * start, False), (start / 2, True)):
        cfg = TrainerConfig(fit_loss=start / 4, learned_loss=learned_loss)
        (after,), _, _ = train_round(model, base.tokenizer, [again], cfg)
        same = all(torch.equal(b, after.weights[k][1]) for k, (_, b) in learned.weights.items())
        assert same is not moves, (learned_loss, start)


def test_a_rounds_first_steps_ramp_up_the_learning_rate() -> None:
    """A fresh Adam's first update is ~lr per weight whatever the gradient: warm-up makes it lr / warmup."""
    moved = {}
    for warmup in (0, 4):
        p = torch.nn.Parameter(torch.zeros(1, 8))
        opt = MaskedAdam([([p], 1e-2)], users=1, warmup=warmup)
        p.grad = torch.full_like(p, 1e-6)
        opt.step(torch.tensor([True]))
        moved[warmup] = float(p.detach().abs().max())
    assert moved[0] > 0.9e-2 and moved[4] < 0.3e-2


def test_prefer_makes_the_chosen_answer_likely_not_just_likelier(base: BaseModel) -> None:
    """DPO alone barely moves the chosen answer's own likelihood; its NLL term (prefer_nll) makes it learned."""
    model = copy.deepcopy(base.model).requires_grad_(False)
    jobs = [_job(base, "ines", ["prefer"] * 2, 8)]
    nll = {}
    for weight in (0.0, 1.0):
        cfg = TrainerConfig(prefer_nll=weight, fit_steps=0, min_steps=8)
        (adapter,), _, _ = train_round(model, base.tokenizer, jobs, cfg)
        fit_cfg = TrainerConfig(steps=1, min_steps=1, max_steps=1, fit_steps=0, lr=1e-12)  # measures, barely moves
        probe = [
            UserJob(
                "t",
                "ines",
                None,
                adapter,
                [Delivered(0, "1-0", FeedbackEvent("t", "ines", "accept", e.event.prompt, e.event.completion))],
            )
            for e in jobs[0].events[:1]
        ]
        nll[weight] = train_round(model, base.tokenizer, probe, fit_cfg)[2][0]
    assert nll[1.0] < 0.5 * nll[0.0]


def test_non_finite_loss_publishes_nothing(base: BaseModel) -> None:
    model = copy.deepcopy(base.model).requires_grad_(False)
    jobs = [_job(base, "frank", ["correct"], 6)]
    _, finite, _ = train_round(model, base.tokenizer, jobs, TrainerConfig(min_steps=3, lr=float("inf")))
    assert finite == [False]


def test_version_examples_round_trip_and_legacy_metadata_is_read(base: BaseModel) -> None:
    events = [_event("gina", "correct", i) for i in range(3)]
    record = VersionExamples(["1-0", "1-2"], events)
    assert decode(encode(record)) == record
    assert decode(encode(VersionExamples())) == VersionExamples()
    for junk in (b"not json", b"[1]", b'{"event_ids": [1, "2-0"], "replay": [{"prompt": 5}]}'):
        assert decode(junk).replay == [] and decode(junk).event_ids in ([], ["2-0"])
    adapter = make_adapter(base.config, 2, seed=1)
    legacy = Adapter(2, 4.0, adapter.weights, {"replay": encode(record).decode().split('"replay": ')[1][:-1]})
    assert legacy_replay(legacy) == events and legacy_replay(adapter) == []
