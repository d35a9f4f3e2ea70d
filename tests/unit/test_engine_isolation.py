"""One request can never fail another: poisoned rows fail alone, a raising step fails only what it touched,
and the waiting queue admits tenants in turn."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from personalize.engine.engine import Engine, EngineConfig
from personalize.engine.sampling import sample_token
from personalize.engine.types import SamplingParams
from personalize.errors import AdapterError
from personalize.lora.slots import SlotPool
from personalize.model import BaseModel
from tests.helpers import make_adapter

POISON = 0


@pytest.fixture()
def pool(base: BaseModel) -> SlotPool:
    pool = SlotPool(base.config, num_slots=4, r_max=8)
    pool.set_slot(POISON, make_adapter(base.config, 8, seed=7, std=1e30))  # finite weights, infinite logits
    pool.set_slot(1, make_adapter(base.config, 4, seed=8))
    return pool


def _params(n: int = 12, temperature: float = 0.0) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=temperature, top_p=0.9, seed=3, ignore_eos=True)


def _alone(engine: Engine, prompt: str, slot: int | None, params: SamplingParams) -> str:
    h = engine.submit(prompt, params, slot=slot)
    engine.run_until_idle()
    return h.result().text


@pytest.mark.parametrize("temperature", [0.0, 1e-40, 1e-5, 0.8])
def test_poisoned_adapter_fails_alone_and_tiny_temperature_decodes(
    base: BaseModel, pool: SlotPool, temperature: float
) -> None:
    engine = Engine(base, EngineConfig(max_batch=4, max_len=64), pool)
    good = [("healthy row", 1, _params(temperature=temperature)), ("base row", None, _params(temperature=1e-40))]
    alone = [_alone(engine, p, s, params) for p, s, params in good]
    bad = engine.submit("poisoned", _params(temperature=temperature), slot=POISON, label="adapter v2 of user 'm'")
    handles = [engine.submit(p, params, slot=s) for p, s, params in good]
    engine.run_until_idle()
    with pytest.raises(AdapterError, match=r"adapter v2 of user 'm'.*non-finite"):
        bad.result()
    assert [h.result().text for h in handles] == alone
    assert all(h.result().completion_tokens == 12 for h in handles)


def test_tiny_temperature_is_greedy() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample_token(logits, 1e-40, 1.0, torch.Generator().manual_seed(0)) == 1
    huge = torch.tensor([1e35, -1e35, 3e38])  # finite, but dividing by any small temperature overflows
    assert sample_token(huge, 1e-3, 1.0, torch.Generator().manual_seed(0)) == 2


def _raise_once(target: Any, name: str) -> None:
    real = getattr(target, name)
    calls = {"n": 0}

    def flaky(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device fault")
        return real(*args)

    setattr(target, name, flaky)


def test_failed_prefill_fails_only_its_joiners(base: BaseModel, pool: SlotPool) -> None:
    engine = Engine(base, EngineConfig(max_batch=4, max_len=64), pool)
    expected = _alone(engine, "running", 1, _params(20))
    running = engine.submit("running", _params(20), slot=1)
    engine.step()
    _raise_once(engine.model, "prefill")
    joiner = engine.submit("joiner", _params())
    engine.run_until_idle()
    with pytest.raises(RuntimeError, match="device fault"):
        joiner.result()
    assert running.result().text == expected


def test_failed_decode_keeps_the_queue_and_the_thread(base: BaseModel, pool: SlotPool) -> None:
    engine = Engine(base, EngineConfig(max_batch=1, max_len=64), pool)
    expected = _alone(engine, "queued", None, _params())
    _raise_once(engine.model, "decode")
    first = engine.submit("first", _params())
    queued = engine.submit("queued", _params())
    engine.start()
    try:
        with pytest.raises(RuntimeError, match="device fault"):
            first.result(timeout=60)
        assert queued.result(timeout=60).text == expected
        after = engine.submit("queued", _params())
        assert after.result(timeout=60).text == expected  # the engine thread lives on
    finally:
        engine.stop()


def test_waiting_queue_admits_tenants_in_turn(base: BaseModel) -> None:
    """Tenant A queues 60 requests before B's one: B joins as soon as the first row frees (one step)."""
    engine = Engine(base, EngineConfig(max_batch=2, max_len=64))
    flood = [engine.submit(f"a{i}", _params(4), tenant="a") for i in range(60)]
    engine.step()
    other = engine.submit("b", _params(4), tenant="b")
    steps = 0
    while not other._req.generated:
        engine.step()
        steps += 1
    assert steps <= 4  # the running rows' remaining tokens, then B is next
    engine.run_until_idle()
    assert all(h.result().completion_tokens == 4 for h in flood)


def test_slot_is_let_go_at_admission_and_may_change_under_the_running_row(base: BaseModel, pool: SlotPool) -> None:
    """on_admit runs once the row's lane holds the slot's copy; the cache may then write another adapter
    into the slot (it is unpinned) and the running row still decodes with its own copy."""
    engine = Engine(base, EngineConfig(max_batch=4, max_len=64), pool)
    expected = _alone(engine, "mine", 1, _params(16))
    admitted: list[bool] = []

    def reuse_slot() -> None:
        admitted.append(True)
        pool.set_slot(1, make_adapter(base.config, 4, seed=99))  # another user's adapter lands in the slot

    handle = engine.submit("mine", _params(16), slot=1, on_admit=reuse_slot)
    engine.step()
    assert len(admitted) == 1  # at admission, before the request is done
    engine.run_until_idle()
    assert len(admitted) == 1 and handle.result().text == expected
