"""Choosing the next token: greedy, or temperature + top-p with a per-request generator."""

from __future__ import annotations

import torch
from torch import Tensor


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


def sample_token(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Next token from logits [V] (float32): argmax when temperature == 0, else a seeded draw."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    filtered = top_p_filter(logits / temperature, top_p)
    probs = torch.softmax(filtered, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
