"""Batched multi-LoRA math: pure functions, each with the plain loop it must equal.

Notation: a batch has N rows; row n uses adapter slot `slots[n]` (-1 = no adapter, base only).
For one target module, the LoRA delta of row n is `scaling[s] * (x[n] @ lora_a[s].T) @ lora_b[s]`
with `lora_a[s]`: [r, d_in] and `lora_b[s]`: [r, d_out] (B transposed, so the expand is a row-major gemm).
Adapters of smaller rank are zero-padded to r; a zero pad contributes exactly 0.
"""

from __future__ import annotations

import torch
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
