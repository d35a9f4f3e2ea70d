"""Shared test helpers: random adapters and PEFT references built without our own file format."""

from __future__ import annotations

import copy
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from personalize.lora.adapter import TARGET_MODULES, Adapter, module_key
from personalize.lora.slots import SlotPool, module_shapes


def make_adapter(
    hf_config: Any,
    rank: int,
    seed: int,
    alpha: float | None = None,
    targets: tuple[str, ...] = TARGET_MODULES,
    std: float = 0.05,
) -> Adapter:
    """A random adapter whose lora_b is non-zero, so it changes the model's outputs."""
    g = torch.Generator().manual_seed(seed)
    shapes = module_shapes(hf_config)
    weights = {}
    for layer in range(hf_config.num_hidden_layers):
        for m in targets:
            d_out, d_in = shapes[m]
            weights[module_key(layer, m)] = (
                torch.randn(rank, d_in, generator=g) * std,
                torch.randn(d_out, rank, generator=g) * std,
            )
    return Adapter(rank=rank, alpha=alpha if alpha is not None else 2.0 * rank, weights=weights)


def peft_model(base_model: Any, adapter: Adapter) -> Any:
    """PEFT's own PeftModel on a copy of the base, with this adapter's tensors copied in."""
    cfg = LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        target_modules=list(adapter.target_modules),
        lora_dropout=0.0,
        init_lora_weights=False,
    )
    model = get_peft_model(copy.deepcopy(base_model), cfg)
    inner = model.base_model.model
    with torch.no_grad():
        for key, (a, b) in adapter.weights.items():
            module = inner.get_submodule(key)
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
    return model.eval()


def holds(pool: SlotPool, slot: int, adapter: Adapter) -> bool:
    """Whether `slot` of the pool holds exactly `adapter` (its rank zero-padded, its scaling)."""
    r = adapter.rank
    for layer in range(pool.num_layers):
        for m in TARGET_MODULES:
            lora_a, lora_b = pool.module_view(layer, m)
            a, b = adapter.weights[module_key(layer, m)]
            if not (
                torch.equal(lora_a[slot, :r], a) and torch.equal(lora_b[slot, :r], b.T) and not lora_a[slot, r:].any()
            ):
                return False
    return bool(pool.scaling[slot] == adapter.scaling)


def hf_greedy(model: Any, ids: list[int], new_tokens: int, **options: Any) -> Any:
    """Hugging Face's own greedy generation of exactly `new_tokens` tokens after `ids` (no EOS stop): the
    reference the engine's outputs are held to. `options` go to `model.generate` (repetition_penalty, ...)."""
    with torch.no_grad():
        return model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **options,
        )
