"""Multi-LoRA layers injected into a transformers model: each row of a batch picks its adapter slot.

Used where the transformers forward itself must run with many adapters: training (autograd through
the slot tensors) and equivalence checks. The serving engine uses its own fused forward (engine/llama.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from personalize.lora.ops import lora_gathered


class MultiLoraLinear(nn.Module):
    """A base linear plus a stack of adapters: y = x W^T + b + scaling[s] (x A[s]^T) B[s] for row slot s.

    lora_a [S, r, d_in], lora_b [S, r, d_out] and scaling [S] are shared views of a SlotPool (or trainable
    tensors); `slots` [N] is set for the whole model by `use_slots` before a forward (-1 = base only).
    """

    def __init__(self, base: nn.Linear, lora_a: Tensor, lora_b: Tensor, scaling: Tensor, state: dict[str, Any]):
        super().__init__()
        self.base = base
        self.lora_a, self.lora_b, self.scaling = lora_a, lora_b, scaling
        self._state = state

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        slots: Tensor | None = self._state.get("slots")
        if slots is None:
            return y
        squeeze = x.dim() == 2  # [N, d] input: a one-token batch
        x3 = (x.unsqueeze(1) if squeeze else x).to(self.lora_a.dtype)  # float32 adapters on a bf16 base
        rates: Tensor | None = self._state.get("dropout")
        if rates is not None:  # LoRA dropout (training only): never the base path
            x3 = lora_dropout(x3, rates, self._state["generator"])
        delta = lora_gathered(x3, self.lora_a, self.lora_b, self.scaling, slots)
        return y + (delta.squeeze(1) if squeeze else delta).to(y.dtype)


def lora_dropout(x: Tensor, p: Tensor, generator: torch.Generator) -> Tensor:
    """Inverted dropout of the adapter input x [N, T, d] at rate p [N] per row (0 = none), its mask drawn
    from `generator` (a round trained again from the same events draws the same masks)."""
    rate = p.to(x.dtype)[:, None, None]
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= rate
    return x * keep / (1.0 - rate)


def _target_modules(model: nn.Module) -> Iterator[tuple[int, str, nn.Module, str]]:
    for i, layer in enumerate(model.model.layers):  # type: ignore[union-attr,arg-type]
        for parent_name in ("self_attn", "mlp"):
            parent = getattr(layer, parent_name)
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    yield i, name, parent, parent_name


class SlotTensors(Protocol):
    """What `inject` reads: per-slot LoRA tensors by layer and module (SlotPool, the trainer's StackedAdapters)."""

    target_modules: tuple[str, ...]
    """Projections that carry LoRA."""
    scaling: Tensor
    """[S] per-slot scaling."""

    def module_view(self, layer: int, module: str) -> tuple[Tensor, Tensor]:
        """(lora_a [S, r, d_in], lora_b [S, r, d_out]) of one module of one layer, shared views."""
        ...


def inject(model: nn.Module, tensors: SlotTensors) -> dict[str, Any]:
    """Replace each target linear of `model` with a MultiLoraLinear over `tensors` (a SlotPool, or any
    SlotTensors). Returns the shared state dict whose
    "slots" entry drives every injected layer; prefer `use_slots` to set them."""
    state: dict[str, Any] = {"slots": None}
    for i, name, parent, _ in _target_modules(model):
        if name in tensors.target_modules:
            lora_a, lora_b = tensors.module_view(i, name)
            setattr(parent, name, MultiLoraLinear(getattr(parent, name), lora_a, lora_b, tensors.scaling, state))
    return state


@contextmanager
def use_slots(
    state: dict[str, Any], slots: Tensor, dropout: tuple[Tensor, torch.Generator] | None = None
) -> Iterator[None]:
    """Run forwards inside the block with row n using slot slots[n] (`lora_gathered`); `dropout`, (rates [N]
    per row, generator), applies LoRA dropout to the adapter input (training)."""
    rates, generator = dropout if dropout is not None else (None, None)
    state.update(slots=slots, dropout=rates, generator=generator)
    try:
        yield
    finally:
        state.update(slots=None, dropout=None, generator=None)


def eject(model: nn.Module) -> None:
    """Undo inject: put the base linears back."""
    for layer in model.model.layers:  # type: ignore[union-attr,arg-type]
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, MultiLoraLinear):
                    setattr(parent, name, child.base)


def slots_tensor(slots: list[int | None], device: torch.device | str = "cpu") -> Tensor:
    """Per-row slot list (None = base only) as the [N] long tensor the layers expect."""
    return torch.tensor([-1 if s is None else s for s in slots], dtype=torch.long, device=device)
