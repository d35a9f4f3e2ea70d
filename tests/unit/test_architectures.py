"""Every supported family through the fused engine forward: greedy text equals transformers' generate,
mixed-rank adapter batches equal PEFT, and the trainer's adapter exports to files PEFT loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from personalize.engine.engine import Engine, EngineConfig
from personalize.engine.llama import FastLlama, read_family
from personalize.engine.types import SamplingParams
from personalize.errors import InvalidArgument
from personalize.feedback.events import FeedbackEvent
from personalize.feedback.stream import Delivered
from personalize.feedback.trainer import TrainerConfig, UserJob, train_round
from personalize.lora.format import AdapterSpec, save_peft, zero_adapter
from personalize.lora.slots import SlotPool
from personalize.model import SUPPORTED_MODEL_TYPES, BaseModel, ModelConfig, load_base_model
from tests.helpers import make_adapter, peft_model
from tests.tiny_models import FAMILIES, save_tiny

PROMPTS = ["Hello there", "héllo wörld ✓", "日本語のテキスト", "emoji 🙂 and ∑", "the quick brown fox jumps over"]
NEW_TOKENS = 20


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, BaseModel]:
    directory = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, load_base_model(ModelConfig(path=str(directory)))


def _hf_greedy(base: BaseModel, prompt: str) -> str:
    ids = torch.tensor([base.tokenizer.encode(prompt, add_special_tokens=False)])
    out = base.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return str(base.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def test_engine_greedy_text_equals_transformers_generate(family: tuple[str, BaseModel]) -> None:
    _, base = family
    engine = Engine(base, EngineConfig(max_batch=len(PROMPTS), max_len=64))
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    handles = [engine.submit(p, params) for p in PROMPTS]  # one batch: padding and rows must not matter
    engine.run_until_idle()
    for prompt, handle in zip(PROMPTS, handles, strict=True):
        result = handle.result()
        assert result.completion_tokens == NEW_TOKENS
        assert result.text == _hf_greedy(base, prompt), prompt
        assert "".join(handle) == result.text  # streamed pieces join to the unary text


def test_mixed_rank_adapters_equal_peft_per_adapter(family: tuple[str, BaseModel]) -> None:
    _, base = family
    ranks = [4, 1, 8]
    adapters = [make_adapter(base.config, r, seed=50 + i, std=0.1) for i, r in enumerate(ranks)]
    slots: list[int | None] = [0, None, 1, 2, 0]
    lanes = SlotPool(base.config, num_slots=len(slots), r_max=8)
    for row, slot in enumerate(slots):
        if slot is not None:
            lanes.set_slot(row, adapters[slot])
    fast = FastLlama(base.model, max_batch=len(slots), max_len=64, lanes=lanes)
    encoded = [torch.tensor(base.tokenizer.encode(p, add_special_tokens=False)) for p in PROMPTS]
    ids = torch.nn.utils.rnn.pad_sequence(encoded, batch_first=True)
    logits = fast.prefill(ids, torch.tensor([len(e) for e in encoded]), 0)
    refs = {s: base.model if s is None else peft_model(base.model, adapters[s]) for s in set(slots)}
    for row, (slot, e) in enumerate(zip(slots, encoded, strict=True)):
        with torch.no_grad():
            ref = refs[slot](e.unsqueeze(0)).logits[0, -1]
        torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=1e-4)
    # and one decode step per row, against the reference's next position
    nxt = logits.argmax(-1)
    step = fast.decode(nxt, torch.tensor([len(e) for e in encoded]))
    for row, (slot, e) in enumerate(zip(slots, encoded, strict=True)):
        with torch.no_grad():
            ref = refs[slot](torch.cat([e, nxt[row : row + 1]]).unsqueeze(0)).logits[0, -1]
        torch.testing.assert_close(step[row], ref, atol=1e-4, rtol=1e-4)


def test_trained_adapter_exports_to_peft_that_generates_identically(
    family: tuple[str, BaseModel], tmp_path: Path
) -> None:
    name, base = family
    spec = AdapterSpec.for_model(base, 8)
    start = zero_adapter(spec, 4, 8.0, generator=torch.Generator().manual_seed(3))
    events = [
        Delivered(0, f"1-{i}", FeedbackEvent("t", "u", "accept", f"Q{i}: héllo?\nA: ", f"wörld {i} ✓"))
        for i in range(3)
    ]
    (trained,), finite, _ = train_round(
        base.model,
        base.tokenizer,
        [UserJob("t", "u", None, start, events)],
        TrainerConfig(steps=2, min_steps=2, max_steps=2, lr=1e-2),
    )
    assert finite == [True]
    assert any(b.abs().sum() > 0 for _, b in trained.weights.values())
    save_peft(trained, spec, tmp_path)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.name), str(tmp_path)).eval()
    pool = SlotPool(base.config, num_slots=1, r_max=8)
    pool.set_slot(0, trained)
    engine = Engine(base, EngineConfig(max_batch=2, max_len=64), pool)
    for prompt in PROMPTS[:2]:
        handle = engine.submit(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True), slot=0)
        engine.run_until_idle()
        ids = torch.tensor([base.tokenizer.encode(prompt, add_special_tokens=False)])
        out = peft.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert handle.result().text == base.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), name


@pytest.mark.parametrize("model_type", ["gpt_bigcode", "phi3"])  # phi3: fused qkv_proj/gate_up_proj
def test_unsupported_model_type_is_refused_before_any_weight_is_read(tmp_path: Path, model_type: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    (tmp_path / "model.safetensors").write_bytes(b"not a weight file")  # reading it would fail differently
    with pytest.raises(InvalidArgument, match=model_type) as info:
        load_base_model(ModelConfig(path=str(tmp_path)))
    assert all(t in str(info.value) for t in SUPPORTED_MODEL_TYPES)


def test_length_dependent_rope_is_refused() -> None:
    config = FAMILIES["llama"]()
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(InvalidArgument, match="dynamic"):
        read_family(config)
    assert read_family(FAMILIES["llama3-rope"]()).norm_offset == 0.0
    assert read_family(FAMILIES["gemma3"]()).windows == (7, None, 7)


def test_unimplemented_rope_is_refused_before_any_weight_is_read(tmp_path: Path) -> None:
    config = FAMILIES["llama"]()
    config.rope_parameters = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 8,
        "long_factor": [1.0] * 8,
        "original_max_position_embeddings": 16,
    }
    config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a weight file")
    with pytest.raises(InvalidArgument, match="longrope"):
        load_base_model(ModelConfig(path=str(tmp_path)))
