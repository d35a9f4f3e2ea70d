"""Device slots: preallocated stacked LoRA tensors, one row ("slot") per resident adapter.

Projections that share an input are fused (q,k,v and gate,up), so their adapters are stored fused too:
per layer and group, `lora_a[num_slots, parts * r_max, d_in]` (A of each part stacked along the rank)
and per part `lora_b[num_slots, r_max, d_out]` (B transposed). Smaller ranks are zero-padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from personalize.errors import AdapterError, InvalidArgument
from personalize.lora.adapter import TARGET_MODULES, Adapter, module_key

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("o", ("o_proj",)),
    ("gate_up", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)),
)
"""Fused projection groups of a Llama decoder layer: members share one input and one base matmul."""


@dataclass(frozen=True)
class LoraGroup:
    """One fused projection and which of its members carry LoRA."""

    name: str
    members: tuple[str, ...]
    """All projections fused in the base matmul, in output order."""
    out_slices: dict[str, tuple[int, int]]
    """member -> [start, end) of its columns in the fused output."""
    d_in: int
    parts: tuple[str, ...]
    """Members that are LoRA targets, in member order."""


def module_shapes(hf_config: Any) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of each target projection of a Llama-family config."""
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hidden // heads
    inter = hf_config.intermediate_size
    return {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def llama_groups(hf_config: Any, target_modules: tuple[str, ...]) -> tuple[LoraGroup, ...]:
    """The fused groups of one layer with their LoRA parts (identical for every layer)."""
    unknown = set(target_modules) - set(TARGET_MODULES)
    if unknown:
        raise InvalidArgument(f"unsupported target modules {sorted(unknown)}; supported: {TARGET_MODULES}")
    shapes = module_shapes(hf_config)
    groups = []
    for name, members in GROUPS:
        start, slices = 0, {}
        for m in members:
            slices[m] = (start, start + shapes[m][0])
            start += shapes[m][0]
        parts = tuple(m for m in members if m in target_modules)
        groups.append(LoraGroup(name, members, slices, shapes[members[0]][1], parts))
    return tuple(groups)


def slot_nbytes(
    hf_config: Any, r_max: int, target_modules: tuple[str, ...] = TARGET_MODULES, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes one SlotPool slot takes for this model, rank and dtype (equals `SlotPool.slot_nbytes`)."""
    per_layer = 0
    for group in llama_groups(hf_config, target_modules):
        for part in group.parts:
            start, end = group.out_slices[part]
            per_layer += r_max * (group.d_in + end - start)
    return (hf_config.num_hidden_layers * per_layer + 1) * dtype.itemsize  # + 1: the slot's scaling


class SlotPool:
    """Stacked adapter tensors for `num_slots` adapters on one device. Not thread-safe: the owner locks."""

    def __init__(
        self,
        hf_config: Any,
        num_slots: int,
        r_max: int,
        target_modules: tuple[str, ...] = TARGET_MODULES,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_slots < 1 or r_max < 1:
            raise InvalidArgument(f"num_slots and r_max must be >= 1, got {num_slots}, {r_max}")
        self.num_slots, self.r_max = num_slots, r_max
        self.num_layers = hf_config.num_hidden_layers
        self.groups = llama_groups(hf_config, target_modules)
        self.target_modules = tuple(m for m in TARGET_MODULES if m in target_modules)
        self.lora_a: list[dict[str, Tensor]] = []
        self.lora_b: list[dict[str, Tensor]] = []  # key: member name
        for _ in range(self.num_layers):
            a_layer, b_layer = {}, {}
            for g in self.groups:
                if not g.parts:
                    continue
                a_layer[g.name] = torch.zeros(num_slots, len(g.parts) * r_max, g.d_in, dtype=dtype, device=device)
                for m in g.parts:
                    d_out = g.out_slices[m][1] - g.out_slices[m][0]
                    b_layer[m] = torch.zeros(num_slots, r_max, d_out, dtype=dtype, device=device)
            self.lora_a.append(a_layer)
            self.lora_b.append(b_layer)
        self.scaling = torch.zeros(num_slots, dtype=dtype, device=device)

    @property
    def slot_nbytes(self) -> int:
        """Bytes one slot occupies (at r_max): `slot_nbytes(...)` of this pool's model, read off its tensors."""
        return self.nbytes // self.num_slots

    @property
    def nbytes(self) -> int:
        tensors = [t for layer in self.lora_a for t in layer.values()]
        tensors += [t for layer in self.lora_b for t in layer.values()] + [self.scaling]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise InvalidArgument(f"slot {slot} out of range [0, {self.num_slots})")

    def set_slot(self, slot: int, adapter: Adapter) -> None:
        """Write an adapter into a slot (zero-padding its rank); modules it lacks stay zero."""
        self._check_slot(slot)
        if adapter.rank > self.r_max:
            raise AdapterError(f"adapter rank {adapter.rank} exceeds the pool's r_max {self.r_max}")
        extra = {k.rsplit(".", 1)[1] for k in adapter.weights} - set(self.target_modules)
        if extra:
            raise AdapterError(f"adapter targets {sorted(extra)}, not enabled here ({self.target_modules})")
        self.clear_slot(slot)
        r = adapter.rank
        for layer in range(self.num_layers):
            for g in self.groups:
                for p, m in enumerate(g.parts):
                    pair = adapter.weights.get(module_key(layer, m))
                    if pair is None:
                        continue
                    lora_a, lora_b = pair
                    self.lora_a[layer][g.name][slot, p * self.r_max : p * self.r_max + r].copy_(lora_a)
                    self.lora_b[layer][m][slot, :r].copy_(lora_b.T)
        self.scaling[slot] = adapter.scaling

    def clear_slot(self, slot: int) -> None:
        """Zero a slot: it then contributes exactly nothing."""
        self._check_slot(slot)
        for layer in range(self.num_layers):
            for t in self.lora_a[layer].values():
                t[slot].zero_()
            for t in self.lora_b[layer].values():
                t[slot].zero_()
        self.scaling[slot] = 0

    def copy_slot(self, src: SlotPool, src_slot: int, dst_slot: int) -> None:
        """Copy slot `src_slot` of pool `src` (same layout) into `dst_slot` of this pool."""
        for layer in range(self.num_layers):
            for name, t in self.lora_a[layer].items():
                t[dst_slot].copy_(src.lora_a[layer][name][src_slot], non_blocking=True)
            for name, t in self.lora_b[layer].items():
                t[dst_slot].copy_(src.lora_b[layer][name][src_slot], non_blocking=True)
        self.scaling[dst_slot] = src.scaling[src_slot]

    def module_view(self, layer: int, module: str) -> tuple[Tensor, Tensor]:
        """(lora_a [S, r_max, d_in], lora_b [S, r_max, d_out]) of one target module, as views."""
        for g in self.groups:
            if module in g.parts:
                p = g.parts.index(module)
                return self.lora_a[layer][g.name][:, p * self.r_max : (p + 1) * self.r_max], self.lora_b[layer][module]
        raise InvalidArgument(f"{module} is not a LoRA target of this pool")
