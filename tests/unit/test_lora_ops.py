"""Every fast multi-LoRA path equals the plain reference loop."""

from __future__ import annotations

import pytest
import torch

from personalize.lora.ops import lora_gathered, lora_lanes, lora_reference

CASES = [
    # (slots, tokens per row)
    ([0, 1, 2, 3], 1),  # decode, all distinct
    ([2, 2, 2, 2], 1),  # one adapter for all rows
    ([3, -1, 3, 0, -1], 1),  # base-only rows mixed in
    ([1, 0, 1, 2], 7),  # prefill, segments
    ([-1, -1], 4),  # nobody has an adapter
]


def _weights(num_slots: int, rank: int, d_in: int, d_out: int, ranks: list[int]) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    a = torch.randn(num_slots, rank, d_in, generator=g)
    b = torch.randn(num_slots, rank, d_out, generator=g)
    for s, r in enumerate(ranks):  # smaller ranks are zero-padded
        a[s, r:] = 0
        b[s, r:] = 0
    return a, b, torch.rand(num_slots, generator=g) + 0.5


@pytest.mark.parametrize(("slots", "length"), CASES)
def test_fast_paths_equal_reference(slots: list[int], length: int) -> None:
    a, b, scaling = _weights(4, 8, 32, 48, ranks=[8, 2, 4, 1])
    x = torch.randn(len(slots), length, 32, generator=torch.Generator().manual_seed(3))
    idx = torch.tensor(slots)
    ref = lora_reference(x, a, b, scaling, idx)
    torch.testing.assert_close(lora_gathered(x, a, b, scaling, idx), ref, atol=1e-5, rtol=1e-5)
    safe = idx.clamp(min=0)
    lane_scale = torch.where(idx >= 0, scaling[safe], torch.zeros(()))
    torch.testing.assert_close(lora_lanes(x, a[safe], b[safe], lane_scale), ref, atol=1e-5, rtol=1e-5)


def test_base_only_rows_get_exact_zero() -> None:
    a, b, scaling = _weights(2, 4, 16, 16, ranks=[4, 4])
    x = torch.randn(3, 2, 16)
    out = lora_gathered(x, a, b, scaling, torch.tensor([-1, 1, -1]))
    assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[2]) == 0
    assert torch.count_nonzero(out[1]) > 0
