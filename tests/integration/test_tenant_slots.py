"""Device slots under one tenant's many users, over a real worker (bootstrap: real Valkey, file:// store,
cache and engine on the tiny default model): a tenant holds at most its share of the slots pinned, and a
running row holds none."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from personalize import bootstrap
from personalize.adapters.registry import RegistryConfig
from personalize.config import Config, LoraConfig
from personalize.engine.types import SamplingParams
from personalize.errors import ResourceExhausted
from personalize.lora.format import random_adapter, write_peft
from personalize.lora.slots import slot_nbytes
from personalize.model import default_llama_config
from personalize.worker import Worker

R_MAX = 8
SLOTS = 4
PROMPT = "Tell me about LoRA"
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


def make_worker(data_dir: Path, registry_url: str) -> Worker:
    """A worker of 4 device slots, at most half of them per tenant; not started (requests stay queued). The
    load timeout is also how long a capped tenant waits before its refusal: long enough for a real load on a
    busy machine (0.5 s was not always)."""
    lora = LoraConfig(r_max=R_MAX, device_bytes=SLOTS * slot_nbytes(default_llama_config(), R_MAX))
    config = Config(node_id="worker-0", data_dir=str(data_dir), load_timeout_s=3.0, lora=lora)
    return bootstrap.worker(
        replace(config, registry=RegistryConfig(url=registry_url), store_url=(data_dir / "objects").as_uri())
    )


def give_adapter(worker: Worker, tenant: str, user_id: str, seed: int) -> None:
    adapter = random_adapter(worker.spec, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(seed), std=0.2)
    worker.import_adapter(tenant, user_id, write_peft(adapter, worker.spec))


def test_one_tenant_on_many_users_never_holds_every_slot(tmp_path: Path, valkey_url: str) -> None:
    worker = make_worker(tmp_path, valkey_url)
    try:
        assert worker.cache.config.max_tenant_slots == SLOTS // 2
        for i in range(4):
            give_adapter(worker, "tenantA", f"a{i}", seed=i)
        give_adapter(worker, "tenantB", "bob", seed=9)
        queued = [worker.generate("tenantA", f"a{i}", PROMPT, GREEDY) for i in range(2)]  # each pins its slot
        with pytest.raises(ResourceExhausted, match=r"tenant 'tenantA' holds 2 .*\(max_tenant_slots"):
            worker.generate("tenantA", "a2", PROMPT, GREEDY)
        theirs = worker.generate("tenantB", "bob", PROMPT, GREEDY)  # a slot is still free for another tenant
        worker.start()
        assert theirs.result(60).completion_tokens == GREEDY.max_new_tokens
        assert all(g.result(60).completion_tokens == GREEDY.max_new_tokens for g in queued)
        # admitted rows hold no pin: tenant A's next users load again, none of the slots is still pinned
        later = [worker.generate("tenantA", f"a{i}", PROMPT, GREEDY) for i in (2, 3)]
        assert all(g.result(60).completion_tokens == GREEDY.max_new_tokens for g in later)
        assert sum(worker.cache._slots.pins) == 0
    finally:
        worker.stop()
