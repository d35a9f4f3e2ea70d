"""Choosing the next token: greedy, or temperature + top-k + top-p with a per-request generator, after an
optional repetition penalty; and the chosen tokens' log-probabilities.

`penalize_rows` acts on the running batch's logits [B, V], each row with its own penalty, in one op;
`penalize_row` is the plain per-row loop it is tested against."""

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


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """Mask (to -inf) every token but the top_k largest logits (0 = keep all). logits: [V]."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def penalize_row(logits: Tensor, seen: list[int], penalty: float) -> Tensor:
    """The CTRL repetition penalty (as transformers and vLLM apply it) on one row, as a plain loop: each
    distinct token in `seen` gets its logit divided by `penalty` when positive, multiplied when not. [V]."""
    out = logits.clone()
    p = torch.tensor(penalty, dtype=logits.dtype)  # in the logits' precision, as the batched op divides
    for token in set(seen):
        value = out[token]
        out[token] = value / p if value > 0 else value * p
    return out


def penalize_rows(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """`penalize_row` for every row at once. logits [B, V] float, seen [B, V] bool (token occurred in row b's
    prompt or completion), penalty [B] (1.0 = none) -> [B, V]."""
    p = penalty.to(logits.dtype).unsqueeze(-1)  # [B, 1]
    scaled = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, scaled, logits)


def token_logprob(logits: Tensor, token: int) -> float:
    """log softmax(logits)[token] in float32. logits: [V]."""
    return float(torch.log_softmax(logits.float(), dim=-1)[token])


def is_greedy(temperature: float) -> bool:
    """Whether a request decodes by argmax (temperature 0, or so small that dividing by it overflows)."""
    return temperature < MIN_TEMPERATURE


def finite_rows(logits: Tensor) -> list[bool]:
    """Per row of logits [B, V]: whether every value is finite (a row with NaN or inf cannot be decoded)."""
    return torch.isfinite(logits).all(dim=-1).tolist()


def sample_token(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None, top_k: int = 0
) -> int:
    """Next token from finite logits [V] (float32): argmax when greedy, else a seeded draw among the top_k
    (0 = all) within the top_p mass.

    The scaled logits are shifted by their max first, so no temperature >= MIN_TEMPERATURE overflows."""
    if is_greedy(temperature):
        return int(torch.argmax(logits))
    scaled = logits.float() / temperature
    scaled = scaled - scaled.max()
    filtered = top_p_filter(top_k_filter(scaled, top_k), top_p)
    probs = torch.softmax(filtered, dim=-1)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs, 1, generator=generator))
