"""The engine's mixed-adapter batches equal PEFT row by row, and batching never changes a request's text."""

from __future__ import annotations

import pytest
import torch

from personalize.engine.engine import Engine, EngineConfig
from personalize.engine.llama import FastLlama
from personalize.engine.types import SamplingParams
from personalize.errors import InvalidArgument
from personalize.lora.layers import inject, slots_tensor, use_slots
from personalize.lora.slots import SlotPool
from personalize.model import BaseModel
from tests.helpers import make_adapter, peft_model

RANKS = [8, 2, 4, 1, 8]
PROMPTS = ["Hello there", "abc", "The quick brown fox jumps", "x", "personalize me"]


@pytest.fixture(scope="module")
def adapters(base: BaseModel) -> list:
    return [make_adapter(base.config, r, seed=100 + i) for i, r in enumerate(RANKS)]


@pytest.fixture()
def pool(base: BaseModel, adapters: list) -> SlotPool:
    pool = SlotPool(base.config, num_slots=8, r_max=8)
    for slot, adapter in enumerate(adapters):
        pool.set_slot(slot, adapter)
    return pool


def _ids(base: BaseModel, prompt: str) -> torch.Tensor:
    return torch.tensor([base.tokenizer.encode(prompt, add_special_tokens=False)])


def test_mixed_batch_logits_equal_peft_row_by_row(base: BaseModel, adapters: list, pool: SlotPool) -> None:
    slots: list[int | None] = [0, None, 1, 2, 3, None, 4]
    prompts = ["Hello there", "abc", "The quick brown fox", "x", "zz top", "base row", "last one"]
    lanes = SlotPool(base.config, num_slots=len(slots), r_max=8)
    for row, slot in enumerate(slots):
        if slot is not None:
            lanes.copy_slot(pool, slot, row)
    fast = FastLlama(base.model, max_batch=len(slots), max_len=64, lanes=lanes)
    encoded = [_ids(base, p)[0] for p in prompts]
    ids = torch.nn.utils.rnn.pad_sequence(encoded, batch_first=True)
    logits = fast.prefill(ids, torch.tensor([len(e) for e in encoded]), 0)
    for row, (slot, e) in enumerate(zip(slots, encoded, strict=True)):
        ref_model = base.model if slot is None else peft_model(base.model, adapters[slot])
        with torch.no_grad():
            ref = ref_model(e.unsqueeze(0)).logits[0, -1]
        torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=0)


def test_injected_layers_equal_peft(base: BaseModel, adapters: list, pool: SlotPool) -> None:
    import copy

    model = copy.deepcopy(base.model)
    state = inject(model, pool)
    slots: list[int | None] = [3, None, 0, 3]
    ids = torch.randint(3, 250, (len(slots), 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), use_slots(state, slots_tensor(slots)):
        logits = model(ids).logits
    for row, slot in enumerate(slots):
        ref_model = base.model if slot is None else peft_model(base.model, adapters[slot])
        with torch.no_grad():
            ref = ref_model(ids[row : row + 1]).logits[0]
        torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=0)


def _generate(engine: Engine, prompt: str, slot: int | None, n: int = 24) -> str:
    handle = engine.submit(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), slot=slot)
    engine.run_until_idle()
    return handle.result().text


def test_mixed_batch_generation_equals_alone(base: BaseModel, pool: SlotPool) -> None:
    engine = Engine(base, EngineConfig(max_batch=8, max_len=96), pool)
    slots: list[int | None] = [0, 1, None, 2, 4]
    alone = [_generate(engine, p, s) for p, s in zip(PROMPTS, slots, strict=True)]
    handles = [
        engine.submit(p, SamplingParams(max_new_tokens=24, ignore_eos=True), slot=s)
        for p, s in zip(PROMPTS, slots, strict=True)
    ]
    engine.run_until_idle()
    assert [h.result().text for h in handles] == alone
    assert engine.max_occupancy == len(PROMPTS)
    assert len(set(alone)) == len(alone)  # different adapters really give different text


def test_request_added_mid_batch_equals_alone(base: BaseModel, pool: SlotPool) -> None:
    engine = Engine(base, EngineConfig(max_batch=4, max_len=96), pool)
    alone = _generate(engine, "joining late", 3, n=16)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    early = [engine.submit(p, params, slot=s) for p, s in (("first", 0), ("second", None))]
    for _ in range(5):
        engine.step()
    late = engine.submit("joining late", SamplingParams(max_new_tokens=16, ignore_eos=True), slot=3)
    engine.run_until_idle()
    assert late.result().text == alone
    assert all(h.result().completion_tokens == 30 for h in early)


def test_base_rows_equal_bare_base_model(base: BaseModel, pool: SlotPool) -> None:
    engine = Engine(base, EngineConfig(max_batch=4, max_len=96), pool)
    handles = [
        engine.submit(p, SamplingParams(max_new_tokens=20, ignore_eos=True), slot=s)
        for p, s in (("Hello there", None), ("Hello there", 0))
    ]
    engine.run_until_idle()
    ids = _ids(base, "Hello there")
    out = base.model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, eos_token_id=None)
    expected = base.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert handles[0].result().text == expected
    assert handles[1].result().text != expected


def test_sampling_is_reproducible_per_seed(base: BaseModel) -> None:
    engine = Engine(base, EngineConfig(max_batch=4, max_len=96))

    def sample(seed: int) -> str:
        h = engine.submit(
            "sample", SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True)
        )
        engine.run_until_idle()
        return h.result().text

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_stream_pieces_stop_strings_and_limits(base: BaseModel) -> None:
    engine = Engine(base, EngineConfig(max_batch=4, max_len=96))
    full = _generate(engine, "stop here", None, n=40)
    stop = full[10:13]
    h = engine.submit("stop here", SamplingParams(max_new_tokens=40, stop=(stop,), ignore_eos=True))
    engine.run_until_idle()
    pieces = list(h)
    result = h.result()
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert "".join(pieces) == result.text
    h2 = engine.submit("limit", SamplingParams(max_new_tokens=5, ignore_eos=True))
    engine.run_until_idle()
    assert h2.result().finish_reason == "length" and h2.result().completion_tokens == 5


def _stream_wakeups(base: BaseModel, interval: int, new_tokens: int) -> tuple[int, int, list[str], str]:
    """(tokens made when the first piece was queued, pieces queued, the pieces read, the result's text)."""
    engine = Engine(base, EngineConfig(max_batch=2, max_len=96, stream_interval=interval))
    h = engine.submit("abc", SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    queued = h._req.pieces  # the handle's own queue: each item is one wake-up of its reader, one gRPC message
    while not queued.qsize():
        engine.step()
    first_at = h._req.generated
    engine.run_until_idle()
    puts = queued.qsize() - 1  # less the end marker
    return first_at, puts, list(h), h.result().text


def test_stream_interval_gathers_pieces_and_sends_the_first_at_once(base: BaseModel) -> None:
    """With stream_interval N the reader is woken for the first text at once, then once per N tokens at most,
    not per token; the pieces still join to the same text, and the first goes on the same step whatever N
    is, so time to first token does not wait for the interval."""
    n = 40
    runs = {interval: _stream_wakeups(base, interval, n) for interval in (1, 4, 7)}
    firsts = {first for first, _, _, _ in runs.values()}
    assert len(firsts) == 1
    texts = {text for _, _, _, text in runs.values()}
    assert len(texts) == 1
    for interval, (_, puts, pieces, text) in runs.items():
        assert "".join(pieces) == text
        assert puts <= 2 + -(-n // interval)  # the first, one per interval, the flush at the end
    assert runs[1][1] > runs[4][1] > runs[7][1]


def test_engine_config_refuses_a_zero_stream_interval() -> None:
    with pytest.raises(InvalidArgument, match="stream_interval"):
        EngineConfig(stream_interval=0)


def test_cancelled_request_leaves_the_batch(base: BaseModel) -> None:
    engine = Engine(base, EngineConfig(max_batch=4, max_len=200))
    long = engine.submit("long", SamplingParams(max_new_tokens=150, ignore_eos=True))
    short = engine.submit("short", SamplingParams(max_new_tokens=5, ignore_eos=True))
    for _ in range(3):
        engine.step()
    long.cancel()
    engine.run_until_idle()
    assert long.result().finish_reason == "cancelled"
    assert long.result().completion_tokens < 150
    assert short.result().completion_tokens == 5


def test_engine_thread_serves_concurrent_submissions(base: BaseModel, pool: SlotPool) -> None:
    engine = Engine(base, EngineConfig(max_batch=8, max_len=96), pool)
    engine.start()
    try:
        handles = [
            engine.submit(f"user {i}", SamplingParams(max_new_tokens=12, ignore_eos=True), slot=i % 5)
            for i in range(12)
        ]
        results = [h.result(timeout=60) for h in handles]
    finally:
        engine.stop()
    assert all(r.completion_tokens == 12 for r in results)
    assert engine.max_occupancy > 1
