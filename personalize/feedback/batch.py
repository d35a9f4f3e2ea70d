"""Turning events into a padded training batch: one row per answer, labels only on the answer tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from personalize.engine.text import ChatMessage, encode_input
from personalize.feedback.events import FeedbackEvent


@dataclass(frozen=True)
class TrainBatch:
    """Rows of a training round. Row n belongs to user `user_index[n]` (that user's stacked slot)."""

    input_ids: Tensor
    """[N, L] right-padded."""
    attention_mask: Tensor
    """[N, L] 1 = real token."""
    labels: Tensor
    """[N, L] answer token ids, -100 elsewhere."""
    user_index: Tensor
    """[N] long."""
    is_sft: Tensor
    """[N] bool: accept/correct rows (supervised)."""
    is_reject: Tensor
    """[N] bool: reject rows (unlikelihood)."""
    pairs: Tensor
    """[P, 2] rows (chosen, rejected) of prefer events (DPO)."""


def select_rows(batch: TrainBatch, rows: Tensor) -> TrainBatch:
    """The batch restricted to rows where `rows` (bool [N]) is set; a prefer pair is kept or dropped whole."""
    new_index = torch.cumsum(rows.long(), 0) - 1
    keep_pairs = rows[batch.pairs[:, 0]] & rows[batch.pairs[:, 1]] if batch.pairs.numel() else rows[:0]
    return TrainBatch(
        input_ids=batch.input_ids[rows],
        attention_mask=batch.attention_mask[rows],
        labels=batch.labels[rows],
        user_index=batch.user_index[rows],
        is_sft=batch.is_sft[rows],
        is_reject=batch.is_reject[rows],
        pairs=new_index[batch.pairs[keep_pairs]].view(-1, 2),
    )


def encode_example(
    tokenizer: Any, prompt: str | tuple[ChatMessage, ...], answer: str, max_tokens: int
) -> tuple[list[int], list[int]]:
    """(ids, labels) for prompt (text or chat) + answer + EOS; the prompt is context only. Keeps the end if
    too long."""
    prompt_ids = encode_input(tokenizer, prompt)  # as the engine encodes it when serving
    answer_ids = [*tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[-max_tokens:]
    labels = ([-100] * len(prompt_ids) + answer_ids)[-max_tokens:]
    return ids, labels


def build_batch(
    tokenizer: Any, users_events: list[list[FeedbackEvent]], max_tokens: int, device: torch.device | str = "cpu"
) -> TrainBatch:
    """One row per accept/correct/reject event and two per prefer event, for users 0..U-1."""
    rows: list[tuple[list[int], list[int], int, str]] = []
    pairs: list[tuple[int, int]] = []
    for u, events in enumerate(users_events):
        for e in events:
            if e.kind == "prefer":
                pairs.append((len(rows), len(rows) + 1))
                rows.append((*encode_example(tokenizer, e.question, e.completion, max_tokens), u, "chosen"))
                rows.append((*encode_example(tokenizer, e.question, e.rejected, max_tokens), u, "rejected"))
            else:
                rows.append((*encode_example(tokenizer, e.question, e.target, max_tokens), u, e.kind))
    length = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id or 0, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for n, (row_ids, row_labels, _, _) in enumerate(rows):
        ids[n, : len(row_ids)] = torch.tensor(row_ids)
        labels[n, : len(row_labels)] = torch.tensor(row_labels)
        mask[n, : len(row_ids)] = 1
    kinds = [r[3] for r in rows]
    return TrainBatch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        labels=labels.to(device),
        user_index=torch.tensor([r[2] for r in rows], dtype=torch.long, device=device),
        is_sft=torch.tensor([k in ("accept", "correct") for k in kinds], device=device),
        is_reject=torch.tensor([k == "reject" for k in kinds], device=device),
        pairs=torch.tensor(pairs, dtype=torch.long, device=device).view(-1, 2),
    )
