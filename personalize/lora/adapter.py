"""The in-memory form of one user's LoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear modules of a Llama-family decoder layer that can carry LoRA, in canonical order."""


def module_key(layer: int, module: str) -> str:
    """Canonical name of a target module, as in the Hugging Face model: `model.layers.3.self_attn.q_proj`."""
    group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{group}.{module}"


@dataclass(frozen=True)
class Adapter:
    """A user's LoRA weights: for each target module `lora_a` [rank, d_in] and `lora_b` [d_out, rank].

    The delta of module m is `scaling * lora_b @ lora_a`, with `scaling = alpha / rank`.
    """

    rank: int
    alpha: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """module_key(layer, module) -> (lora_a [rank, d_in], lora_b [d_out, rank])."""
    metadata: dict[str, str] = field(default_factory=dict)
    """Free-form string metadata travelling with the adapter (base_fingerprint, version, ...)."""

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def target_modules(self) -> tuple[str, ...]:
        names = {key.rsplit(".", 1)[1] for key in self.weights}
        return tuple(m for m in TARGET_MODULES if m in names)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())
