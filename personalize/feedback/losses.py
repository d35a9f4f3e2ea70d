"""Per-row losses turning feedback into gradients. Pure functions over token log-probabilities.

`token_logprobs` [N, T] holds log p(target token) at each position and `mask` [N, T] marks the answer
tokens the loss covers (the prompt is context only). `chunked_token_logprobs` computes the same from the
hidden states, a chunk of answer positions at a time, for real vocabulary sizes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Shifted next-token log-probs. logits [N, L, V], labels [N, L] (-100 = ignore) -> ([N, L-1], mask [N, L-1])."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * mask, mask


def _chunk_logprobs(head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Tensor) -> Tensor:
    return torch.log_softmax(head(hidden).float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def chunked_token_logprobs(
    hidden: Tensor, head: Callable[[Tensor], Tensor], labels: Tensor, chunk_tokens: int
) -> tuple[Tensor, Tensor]:
    """`token_logprobs` without the full logits: hidden [N, L, H] (the model's last hidden states), head
    maps hidden [T, H] -> logits [T, V]. Logits are computed only at answer positions, `chunk_tokens` of
    them at a time, and recomputed in backward (checkpointed), so at most [chunk_tokens, V] float32 logits
    are alive at once. -> ([N, L-1], mask [N, L-1]), equal to token_logprobs(head(hidden), labels)."""
    targets = labels[:, 1:]
    mask = targets != -100
    picked, wanted = hidden[:, :-1][mask], targets[mask]  # [T, H], [T]
    pieces = [
        checkpoint(
            _chunk_logprobs, head, picked[i : i + chunk_tokens], wanted[i : i + chunk_tokens], use_reentrant=False
        )
        for i in range(0, picked.shape[0], chunk_tokens)
    ]
    flat = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    logp = torch.zeros(mask.shape, dtype=flat.dtype, device=hidden.device).masked_scatter(mask, flat)
    return logp, mask


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


def distinctive_mask(mask: Tensor, targets: Tensor, user_index: Tensor, wanted: Tensor, reject: Tensor) -> Tensor:
    """`mask` [N, T] with each reject row's tokens that the same user's wanted rows (bool [N]) also contain
    taken out: a reject lowers what is distinctive of the rejected answer (its greeting), not the words and
    names it shares with what the user taught otherwise, which its unlikelihood would erase too. Other rows
    are unchanged. targets [N, T] are the token ids under `mask`; user_index [N]; reject bool [N]."""
    vocab = int(targets.max().clamp(min=0)) + 1 if targets.numel() else 1
    keys = user_index.unsqueeze(-1) * vocab + targets.clamp(min=0)  # (user, token) as one id
    taught = keys[mask & wanted.unsqueeze(-1)]
    shared = torch.isin(keys, taught) & reject.unsqueeze(-1)
    return mask & ~shared


def distinctive_mask_reference(
    mask: Tensor, targets: Tensor, user_index: Tensor, wanted: Tensor, reject: Tensor
) -> Tensor:
    """`distinctive_mask` written as loops over sets, for the equivalence test."""
    taught: dict[int, set[int]] = {}
    for n in range(mask.shape[0]):
        if wanted[n]:
            tokens = (int(t) for t, m in zip(targets[n], mask[n], strict=True) if m)
            taught.setdefault(int(user_index[n]), set()).update(tokens)
    out = mask.clone()
    for n in range(mask.shape[0]):
        if reject[n]:
            for i in range(mask.shape[1]):
                if mask[n, i] and int(targets[n, i]) in taught.get(int(user_index[n]), set()):
                    out[n, i] = False
    return out
