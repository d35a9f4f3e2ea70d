"""Sampling options: top_k, repetition_penalty (the batched op held to its per-row loop, and the engine to
transformers' generate) and the chosen tokens' logprobs."""

from __future__ import annotations

import pytest
import torch

from personalize.engine.engine import Engine, EngineConfig
from personalize.engine.sampling import penalize_row, penalize_rows, sample_token, top_k_filter
from personalize.engine.text import encode_prompt
from personalize.engine.types import SamplingParams
from personalize.model import BaseModel
from tests.helpers import hf_greedy

PROMPTS = ["the the the cat", "héllo wörld ✓", "abcabcabc"]
NEW_TOKENS = 16


@pytest.mark.parametrize("penalties", [[1.0, 1.0, 1.0], [1.3, 0.7, 2.0], [1.0, 5.0, 0.1]])
def test_batched_repetition_penalty_equals_the_per_row_loop(penalties: list[float]) -> None:
    g = torch.Generator().manual_seed(0)
    vocab = 50
    logits = torch.randn(len(penalties), vocab, generator=g) * 3  # both signs
    seen = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (1, 7, 30)]
    mask = torch.zeros(len(penalties), vocab, dtype=torch.bool)
    for row, ids in enumerate(seen):
        mask[row, ids] = True
    fast = penalize_rows(logits, mask, torch.tensor(penalties))
    slow = torch.stack([penalize_row(logits[r], seen[r], penalties[r]) for r in range(len(penalties))])
    assert torch.equal(fast, slow)
    changed = (fast != logits).any(dim=-1).tolist()
    assert changed == [p != 1.0 for p in penalties]


def test_top_k_keeps_only_the_k_largest_and_sampling_stays_inside_them() -> None:
    logits = torch.tensor([0.5, 3.0, -1.0, 2.0, 2.5, 0.0])
    kept = torch.isfinite(top_k_filter(logits, 3)).nonzero().flatten().tolist()
    assert kept == [1, 3, 4]
    assert torch.equal(top_k_filter(logits, 0), logits)
    g = torch.Generator().manual_seed(1)
    draws = {sample_token(logits, 5.0, 1.0, g, top_k=3) for _ in range(300)}
    assert draws == {1, 3, 4}  # a high temperature would reach every token without top_k
    assert {sample_token(logits, 5.0, 1.0, g, top_k=1) for _ in range(50)} == {1}


def _hf_greedy_ids(base: BaseModel, prompt: str, penalty: float) -> list[int]:
    ids = encode_prompt(base.tokenizer, prompt)
    out = hf_greedy(base.model, ids, NEW_TOKENS, repetition_penalty=penalty)
    return out[0, len(ids) :].tolist()


def test_greedy_with_repetition_penalty_equals_transformers_in_a_mixed_batch(base: BaseModel) -> None:
    engine = Engine(base, EngineConfig(max_batch=2 * len(PROMPTS), max_len=128))
    penalties = [1.0, 1.5, 3.0]
    handles = [
        engine.submit(p, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, repetition_penalty=r))
        for p, r in zip(PROMPTS, penalties, strict=True)
    ]
    engine.run_until_idle()
    texts = [h.result().text for h in handles]
    for prompt, penalty, text in zip(PROMPTS, penalties, texts, strict=True):
        want = base.tokenizer.decode(_hf_greedy_ids(base, prompt, penalty), skip_special_tokens=True)
        assert text == want, (prompt, penalty)
    assert texts[2] != base.tokenizer.decode(_hf_greedy_ids(base, PROMPTS[2], 1.0), skip_special_tokens=True)


def test_greedy_logprobs_are_the_models_log_softmax_of_each_chosen_token(base: BaseModel) -> None:
    engine = Engine(base, EngineConfig(max_batch=2, max_len=128))
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)
    handle = engine.submit(PROMPTS[1], params)
    plain = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.run_until_idle()
    assert plain.result().logprobs == ()
    ids = encode_prompt(base.tokenizer, PROMPTS[1])
    out = hf_greedy(base.model, ids, NEW_TOKENS, return_dict_in_generate=True, output_logits=True)
    chosen = out.sequences[0, len(ids) :]
    logits = torch.cat(out.logits).float()  # [NEW_TOKENS, V], the raw logits of each step
    want = torch.log_softmax(logits, dim=-1).gather(-1, chosen[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(handle.result().logprobs), want, atol=1e-4)


def test_sampled_logprobs_are_seeded_and_of_the_drawn_tokens(base: BaseModel) -> None:
    engine = Engine(base, EngineConfig(max_batch=3, max_len=128))

    def params(seed: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=NEW_TOKENS, temperature=1.5, top_k=20, seed=seed, ignore_eos=True, logprobs=True
        )

    handles = [engine.submit(PROMPTS[0], params(s)) for s in (5, 5, 6)]
    engine.run_until_idle()
    a, b, c = (h.result() for h in handles)
    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)  # rows differ in ulps
    assert not torch.allclose(torch.tensor(a.logprobs), torch.tensor(c.logprobs), atol=1e-2)
    assert len(a.logprobs) == NEW_TOKENS and all(lp <= 0.0 for lp in a.logprobs)


@pytest.mark.parametrize("with_stop", [False, True], ids=["no-stop", "stop-string"])
def test_each_streamed_piece_carries_the_logprobs_of_its_own_tokens(base: BaseModel, with_stop: bool) -> None:
    """Piece k carries the logprobs of the tokens whose text it releases: the first (count so far) tokens
    decode to the text so far; joined, the pieces' logprobs are the result's."""
    engine = Engine(base, EngineConfig(max_batch=2, max_len=128))
    engine.start()
    try:
        prompt = PROMPTS[1]  # multi-byte text: the byte tokenizer holds back unfinished characters
        ids = _hf_greedy_ids(base, prompt, 1.0)
        full = base.tokenizer.decode(ids, skip_special_tokens=True)
        stop = (full[len(full) // 2 :][:2],) if with_stop else ()  # a stop string the completion reaches
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True, stop=stop)
        handle = engine.submit(prompt, params)
        pieces = list(handle.pieces())
        result = handle.result(30)
    finally:
        engine.stop()
    assert result.logprobs and tuple(lp for p in pieces for lp in p.logprobs) == result.logprobs
    assert "".join(p.text for p in pieces) == result.text
    count, text = 0, ""
    for piece in pieces:
        count, text = count + len(piece.logprobs), text + piece.text
        if piece.text and not stop:
            assert base.tokenizer.decode(ids[:count], skip_special_tokens=True) == text
    if stop:
        assert result.finish_reason == "stop" and len(result.logprobs) < NEW_TOKENS
