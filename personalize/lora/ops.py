"""Batched multi-LoRA math: pure functions, each with the plain loop it must equal.

Notation: a batch has N rows; row n uses adapter slot `slots[n]` (-1 = no adapter, base only).
For one target module, the LoRA delta of row n is `scaling[s] * (x[n] @ lora_a[s].T) @ lora_b[s]`
with `lora_a[s]`: [r, d_in] and `lora_b[s]`: [r, d_out] (B transposed, so the expand is a row-major gemm).
Adapters of smaller rank are zero-padded to r; a zero pad contributes exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_reference(x: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: Tensor, slots: Tensor) -> Tensor:
    """Slow twin of every fast path: a Python loop over rows.

    x: [N, L, d_in]; lora_a: [S, r, d_in]; lora_b: [S, r, d_out]; scaling: [S]; slots: [N] (-1 = none).
    Returns the delta [N, L, d_out] (zeros for rows without an adapter).
    """
    out = x.new_zeros(x.shape[0], x.shape[1], lora_b.shape[-1])
    for n in range(x.shape[0]):
        s = int(slots[n])
        if s >= 0:
            out[n] = scaling[s] * ((x[n] @ lora_a[s].T) @ lora_b[s])
    return out


def lora_lanes(x: Tensor, lane_a: Tensor, lane_b: Tensor, lane_scaling: Tensor) -> Tensor:
    """Delta when row n's adapter already sits in lane n (the engine's per-row copy): two bmm, no gather.

    x: [N, L, d_in]; lane_a: [N, r, d_in]; lane_b: [N, r, d_out]; lane_scaling: [N] (0 = no adapter).
    Equals lora_reference(x, lane_a, lane_b, lane_scaling, arange(N)).
    """
    shrunk = torch.bmm(x, lane_a.transpose(1, 2))  # [N, L, r]
    shrunk = shrunk * lane_scaling.view(-1, 1, 1)
    return torch.bmm(shrunk, lane_b)  # [N, L, d_out]


def lora_gathered(x: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: Tensor, slots: Tensor) -> Tensor:
    """Gather each row's slot weights, then two bmm (one op each for the whole batch; decode).

    Shapes as lora_reference. Rows with slot -1 read slot 0 and are masked by a zero scale.
    """
    safe = slots.clamp(min=0)
    row_scale = torch.where(slots >= 0, scaling[safe], torch.zeros_like(scaling[safe]))
    return lora_lanes(x, lora_a[safe], lora_b[safe], row_scale)


@dataclass(frozen=True)
class SlotSegments:
    """Rows of a batch regrouped by slot, so each used slot is one contiguous segment."""

    order: Tensor
    """[M] row indices that have an adapter, sorted by slot (stable)."""
    used_slots: Tensor
    """[G] distinct slots in order of their segments."""
    offsets: Tensor
    """[G] int32 cumulative segment ends in `order` (grouped_mm's `offs`)."""


def slot_segments(slots: Tensor) -> SlotSegments:
    """Index bookkeeping for lora_grouped: which rows form which slot's segment. slots: [N] (-1 = none)."""
    has = torch.nonzero(slots >= 0).flatten()
    by_slot = torch.argsort(slots[has], stable=True)
    order = has[by_slot]
    used, counts = torch.unique_consecutive(slots[order], return_counts=True)
    return SlotSegments(order=order, used_slots=used, offsets=torch.cumsum(counts, 0).to(torch.int32))


def lora_grouped(x: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: Tensor, seg: SlotSegments) -> Tensor:
    """Segment matmul (SGMV): tokens of each slot's segment times that slot's weights, one grouped op.

    x: [N, L, d_in]; weights as lora_reference; `seg` from slot_segments(slots). Rows sharing a slot
    read its weights once (prefill, single-adapter batches). Returns [N, L, d_out].
    """
    n, length, _ = x.shape
    out = x.new_zeros(n, length, lora_b.shape[-1])
    if seg.order.numel() == 0:
        return out
    # grouped_mm groups along dim 0 of a 2-D input: a row's L tokens stay inside its segment.
    tokens = x[seg.order].reshape(-1, x.shape[-1])  # [M*L, d_in]
    offs = seg.offsets * length
    a = lora_a[seg.used_slots].transpose(1, 2)  # [G, d_in, r]
    shrunk = F.grouped_mm(tokens, a, offs=offs)  # [M*L, r]
    seg_scale = torch.repeat_interleave(scaling[seg.used_slots], torch.diff(offs, prepend=offs.new_zeros(1)))
    shrunk = shrunk * seg_scale.unsqueeze(1).to(shrunk.dtype)
    delta = F.grouped_mm(shrunk, lora_b[seg.used_slots], offs=offs)  # [M*L, d_out]
    out[seg.order] = delta.view(-1, length, delta.shape[-1])
    return out
