"""Choosing the next token: greedy, or temperature + top-p with a per-request generator."""

from __future__ import annotations

import torch
from torch import Tensor

MIN_TEMPERATURE = 1e-4
"""Temperatures below this decode greedily: logits / 1e-40 overflow to inf and the softmax to NaN."""


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Mask (to -inf) every token outside the smallest set whose probability mass reaches top_p. logits: [V]."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep a token if the mass before it is still below top_p (the first token is always kept).
    drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(0, order, sorted_logits)


def is_greedy(temperature: float) -> bool:
    """Whether a request decodes by argmax (temperature 0, or so small that dividing by it overflows)."""
    return temperature < MIN_TEMPERATURE


def finite_rows(logits: Tensor) -> list[bool]:
    """Per row of logits [B, V]: whether every value is finite (a row with NaN or inf cannot be decoded)."""
    return torch.isfinite(logits).all(dim=-1).tolist()


def sample_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Next token from finite logits [V] (float32): argmax when greedy, else a seeded draw.

    The scaled logits are shifted by their max first, so no temperature >= MIN_TEMPERATURE overflows."""
    if is_greedy(temperature):
        return int(torch.argmax(logits))
    scaled = logits.float() / temperature
    scaled = scaled - scaled.max()
    filtered = top_p_filter(scaled, top_p)
    probs = torch.softmax(filtered, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))
