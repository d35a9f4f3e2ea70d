"""An imported adapter is refused by magnitude in the served dtype, and its metadata is parsed strictly."""

from __future__ import annotations

import pytest
import torch

from personalize.errors import AdapterError, InvalidArgument
from personalize.lora.adapter import Adapter
from personalize.lora.format import MAX_DELTA_NORM, AdapterSpec, check_served, max_delta_norm
from personalize.model import BaseModel
from personalize.worker import imported_examples_seen
from tests.helpers import make_adapter


@pytest.fixture(scope="module")
def spec(base: BaseModel) -> AdapterSpec:
    return AdapterSpec.for_model(base, r_max=8)


def _scaled(adapter: Adapter, factor: float, alpha: float | None = None) -> Adapter:
    weights = {k: (a * factor, b * factor) for k, (a, b) in adapter.weights.items()}
    return Adapter(adapter.rank, adapter.alpha if alpha is None else alpha, weights)


@pytest.mark.parametrize(
    ("factor", "alpha", "dtype", "refused"),
    [
        (1.0, None, torch.float32, ""),
        (1.0, None, torch.float16, ""),
        (1.0, None, torch.bfloat16, ""),
        (2e4, None, torch.float32, r"lora_A\.weight has a value of magnitude"),  # |w| over MAX_WEIGHT
        (1e30, None, torch.float32, "magnitude"),
        (1e30, None, torch.float16, "Inf values after conversion"),
        (1.0, 1e6, torch.float32, r"lora_alpha / r"),
        (20.0, 16.0, torch.float32, ""),
        (20.0, 80.0, torch.float32, "norm bound"),  # each weight and the scaling pass, their product does not
        (6.0, None, torch.float32, ""),
        (6.0, None, torch.float16, "norm bound.*float16"),  # fine in float32, overflows fp16 activations
    ],
)
def test_magnitude_bounds_in_the_served_dtype(
    base: BaseModel, spec: AdapterSpec, factor: float, alpha: float | None, dtype: torch.dtype, refused: str
) -> None:
    adapter = _scaled(make_adapter(base.config, 8, seed=1), factor, alpha)
    if not refused:
        check_served(adapter, dtype)
        return
    with pytest.raises(AdapterError, match=refused):
        check_served(adapter, dtype)


def test_fp16_bound_is_tighter() -> None:
    assert max_delta_norm(torch.float16) < MAX_DELTA_NORM == max_delta_norm(torch.float32)


@pytest.mark.parametrize(("raw", "expected"), [("", 0), ("0", 0), ("12", 12), (str((1 << 48) - 1), (1 << 48) - 1)])
def test_examples_seen_parses(raw: str, expected: int) -> None:
    assert imported_examples_seen({"examples_seen": raw}) == expected


@pytest.mark.parametrize("raw", ["abc", "1e3", "-1", "1.5", " 3", "٣", str(1 << 48), "9" * 5000])
def test_examples_seen_malformed_is_invalid_argument(raw: str) -> None:
    with pytest.raises(InvalidArgument, match="examples_seen"):
        imported_examples_seen({"examples_seen": raw})
