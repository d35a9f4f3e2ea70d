"""Device slots sized by the configured target modules: smaller slots for fewer modules, adapters with fewer
modules zero-filled, an adapter on a module outside the set refused at import naming it, bytes per slot
in Stats."""

from __future__ import annotations

import pytest

from personalize.engine.engine import Engine, EngineConfig
from personalize.engine.types import SamplingParams
from personalize.errors import InvalidArgument
from personalize.lora.adapter import TARGET_MODULES
from personalize.lora.format import AdapterSpec, read_peft, write_peft
from personalize.lora.slots import SlotPool
from personalize.model import BaseModel
from personalize.worker import NodeStats
from personalize_service.cli import settings
from personalize_service.cli.settings import SettingsError, build, resolve
from personalize_service.server import convert
from tests.helpers import make_adapter

QV = ("q_proj", "v_proj")


def test_slots_are_sized_by_the_configured_modules(base: BaseModel) -> None:
    full = SlotPool(base.config, num_slots=2, r_max=8)
    qv = SlotPool(base.config, num_slots=2, r_max=8, target_modules=QV)
    c = base.config
    head = c.hidden_size // c.num_attention_heads
    d_q, d_kv = c.num_attention_heads * head, c.num_key_value_heads * head
    expected = c.num_hidden_layers * 8 * ((c.hidden_size + d_q) + (c.hidden_size + d_kv)) * 4 + 4  # + scaling
    assert qv.slot_nbytes == expected
    assert qv.slot_nbytes < full.slot_nbytes / 3


def test_an_adapter_with_fewer_modules_fills_the_rest_with_zeros(base: BaseModel) -> None:
    """A q/v adapter in an all-module pool generates as in a q/v-only pool."""
    adapter = make_adapter(base.config, 4, seed=3, targets=QV)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    texts = []
    for modules in (TARGET_MODULES, QV):
        pool = SlotPool(base.config, num_slots=1, r_max=8, target_modules=modules)
        pool.set_slot(0, adapter)
        engine = Engine(base, EngineConfig(max_batch=1, max_len=64), pool)
        handle = engine.submit("Hello there", params, slot=0)
        engine.run_until_idle()
        texts.append(handle.result().text)
    assert texts[0] == texts[1]
    assert all(float(t.abs().sum()) == 0.0 for t in SlotPool(base.config, 1, 8).lora_a[0].values())


def test_an_adapter_on_a_module_outside_the_configured_set_is_refused_naming_it(base: BaseModel) -> None:
    files = write_peft(make_adapter(base.config, 4, seed=1), AdapterSpec.for_model(base.model, 8))
    refused = r"adapts (k_proj|o_proj|gate_proj|up_proj|down_proj), which is not a target module here"
    with pytest.raises(InvalidArgument, match=refused):
        read_peft(files, AdapterSpec.for_model(base.model, 8, QV))
    qv_files = write_peft(make_adapter(base.config, 4, seed=1, targets=QV), AdapterSpec.for_model(base.model, 8))
    assert set(read_peft(qv_files, AdapterSpec.for_model(base.model, 8, QV)).target_modules) == set(QV)


def test_the_setting_configures_lora_target_modules() -> None:
    values = resolve(settings.UP, {}, {"PERSONALIZE_TARGET_MODULES": "q_proj, v_proj"})
    assert build(values).config.lora.target_modules == QV
    env = {"PERSONALIZE_TARGET_MODULES": "q_proj,lm_head"}
    with pytest.raises((InvalidArgument, SettingsError), match="target_modules"):
        build(resolve(settings.UP, {}, env))


def test_bytes_per_slot_reach_stats() -> None:
    stats = convert.node_stats(NodeStats("n", slot_bytes=123456, device_slots=7))
    assert (stats.slot_bytes, stats.device_slots) == (123456, 7)
