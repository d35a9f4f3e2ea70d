"""On a CUDA device in bfloat16: the engine's mixed-adapter forward stays as close to the float32 truth
as PEFT's own bfloat16 forward does, and a training round runs. Skipped without CUDA.

Tolerance: on every row, max |engine_bf16 - peft_fp32| <= 2 * max |peft_bf16 - peft_fp32| + 0.05 (logits),
i.e. the fused forward adds no more rounding than twice what bf16 already costs in the reference.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from personalize.engine.engine import Engine, EngineConfig
from personalize.engine.llama import FastLlama
from personalize.engine.types import SamplingParams
from personalize.feedback.events import FeedbackEvent
from personalize.feedback.stream import Delivered
from personalize.feedback.trainer import TrainerConfig, UserJob, train_round
from personalize.lora.format import AdapterSpec, zero_adapter
from personalize.lora.slots import SlotPool
from personalize.model import ModelConfig, load_base_model
from tests.helpers import make_adapter, peft_model
from tests.tiny_models import save_tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PROMPTS = ["Hello there", "héllo wörld ✓", "日本語のテキスト", "the quick brown fox"]


@pytest.mark.parametrize("family", ["llama3-rope", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"])
def test_bf16_engine_is_as_close_to_fp32_as_peft_bf16(family: str, tmp_path: Path) -> None:
    directory = save_tiny(family, tmp_path)
    fp32 = load_base_model(ModelConfig(path=str(directory), device="cuda"))
    bf16 = load_base_model(ModelConfig(path=str(directory), device="cuda", dtype="bfloat16"))
    adapters = [make_adapter(fp32.config, r, seed=9 + r, std=0.1) for r in (2, 8)]
    slots: list[int | None] = [0, None, 1, 0]
    lanes = SlotPool(bf16.config, len(slots), 8, dtype=torch.bfloat16, device="cuda")
    for row, slot in enumerate(slots):
        if slot is not None:
            lanes.set_slot(row, adapters[slot])
    fast = FastLlama(bf16.model, len(slots), 64, lanes)
    encoded = [torch.tensor(fp32.tokenizer.encode(p, add_special_tokens=False), device="cuda") for p in PROMPTS]
    ids = torch.nn.utils.rnn.pad_sequence(encoded, batch_first=True)
    got = fast.prefill(ids, torch.tensor([len(e) for e in encoded], device="cuda"), 0)
    for row, (slot, e) in enumerate(zip(slots, encoded, strict=True)):
        refs = []
        for base in (fp32, bf16):
            model = base.model if slot is None else peft_model(base.model, adapters[slot]).to(base.dtype)
            with torch.no_grad():
                refs.append(model(e.unsqueeze(0)).logits[0, -1].float())
        truth, peft_bf16 = refs
        bound = 2 * (peft_bf16 - truth).abs().max().item() + 0.05
        assert (got[row] - truth).abs().max().item() <= bound, (family, row)


def test_engine_generates_and_trainer_trains_on_cuda_bf16(tmp_path: Path) -> None:
    base = load_base_model(ModelConfig(path=str(save_tiny("qwen2", tmp_path)), device="cuda", dtype="bfloat16"))
    pool = SlotPool(base.config, 2, 8, dtype=torch.bfloat16, device="cuda")
    pool.set_slot(0, make_adapter(base.config, 4, seed=1))
    engine = Engine(base, EngineConfig(max_batch=2, max_len=64), pool)
    handle = engine.submit("héllo", SamplingParams(max_new_tokens=8, ignore_eos=True), slot=0)
    engine.run_until_idle()
    assert handle.result().completion_tokens == 8
    spec = AdapterSpec.for_model(base, 8)
    start = zero_adapter(spec, 4, 8.0, generator=torch.Generator().manual_seed(3))
    events = [Delivered(0, "1-0", FeedbackEvent("t", "u", "accept", "Q: héllo?\nA: ", "wörld"))]
    model = copy.deepcopy(base.model)
    (trained,), finite, _ = train_round(
        model,
        base.tokenizer,
        [UserJob("t", "u", None, start, events)],
        TrainerConfig(steps=1, min_steps=1, max_steps=1),
        device="cuda",
    )
    assert finite == [True] and any(b.abs().sum() > 0 for _, b in trained.weights.values())
