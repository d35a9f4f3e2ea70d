"""Per-row losses turning feedback into gradients. Pure functions over token log-probabilities.

`token_logprobs` [N, T] holds log p(target token) at each position and `mask` [N, T] marks the answer
tokens the loss covers (the prompt is context only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Shifted next-token log-probs. logits [N, L, V], labels [N, L] (-100 = ignore) -> ([N, L-1], mask [N, L-1])."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def sft_loss(logp: Tensor, mask: Tensor) -> Tensor:
    """Mean negative log-likelihood of the answer, per row: accept and correct. -> [N]."""
    return -(logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def unlikelihood_loss(logp: Tensor, mask: Tensor) -> Tensor:
    """Mean -log(1 - p) over the answer's tokens, per row: lowers a rejected answer's likelihood. -> [N]."""
    p = logp.exp().clamp(max=1 - 1e-6)
    return -(torch.log1p(-p) * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float) -> Tensor:
    """DPO on sequence log-probs [P] of preferred/other answers under the policy and the reference. -> [P]."""
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -F.logsigmoid(beta * margin)
