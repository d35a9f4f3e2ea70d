"""Trainer memory at a real vocabulary size, and device slots per GiB by target modules.

1. One training round of EVENTS events x TOKENS tokens (--answer-tokens of them the answer, the rest the
   prompt) at vocab 128,256 on a small-hidden random Llama, with the loss computed in chunks (the trainer as
   it is): peak RSS growth. The loss's work grows with the answer tokens only (logits are computed at answer
   positions); the full-logits path it replaced formed [rows, length, vocab] whatever the answer length.
2. The loss alone (hidden states -> loss -> backward), chunked vs full [rows, length, vocab] logits, at a
   row count where the full one fits; the full round's logits are then estimated from the measured bytes
   per logit (it would need tens of GB: it is not run).
3. Bytes per device slot and slots per GiB for q/v-only vs all-module adapters at Llama-3.2-1B and
   Llama-3.1-8B shapes (rank 16, bfloat16), read off SlotPool's tensors.

Each measurement runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own.
Run: python loadtest/bench_trainer_memory.py [--json] [--events N]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 128_256
TOKENS = 256
HIDDEN = 64
SHAPE: dict[str, Any] = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN}
SHAPE |= {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
REAL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8
    ),
}
GIB = 1024**3


def _rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _model() -> Any:
    from personalize.model import build_random_llama, default_llama_config

    model = build_random_llama(default_llama_config(**SHAPE), seed=7, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def measure_round(events: int, answer_tokens: int) -> dict[str, Any]:
    """Peak RSS growth of one train_round (one step per user) of `events` events of TOKENS tokens."""
    from transformers import ByT5Tokenizer

    from personalize.feedback.events import FeedbackEvent
    from personalize.feedback.stream import Delivered
    from personalize.feedback.trainer import TrainerConfig, UserJob, train_round
    from personalize.lora.format import AdapterSpec, zero_adapter

    model, tokenizer = _model(), ByT5Tokenizer()
    users = 16
    spec = AdapterSpec.for_model(model, 16)
    jobs = []
    for u in range(users):
        per_user = [
            Delivered(
                0,
                f"1-{i}",
                FeedbackEvent("t", f"u{u}", "accept", "q" * (TOKENS - answer_tokens), "a" * (answer_tokens - 1)),
            )
            for i in range(events // users)
        ]
        adapter = zero_adapter(spec, 8, 16.0, generator=torch.Generator().manual_seed(u))
        jobs.append(UserJob("t", f"u{u}", None, adapter, per_user))
    config = TrainerConfig(steps=1, min_steps=1, max_steps=1, fit_steps=1, replay=0, max_tokens=TOKENS)
    before = _rss()
    start = time.perf_counter()
    train_round(model, tokenizer, jobs, config)
    return {
        "events": events,
        "tokens_per_event": TOKENS,
        "answer_tokens_per_event": answer_tokens,
        "vocab": VOCAB,
        "loss_chunk_tokens": config.loss_chunk_tokens,
        "peak_rss_growth_mib": round((_peak() - before) / 2**20, 1),
        "seconds": round(time.perf_counter() - start, 1),
    }


def measure_loss(rows: int, chunked: bool) -> dict[str, Any]:
    """Peak RSS growth of the loss and its backward from hidden states, for `rows` rows of TOKENS tokens."""
    from personalize.feedback.losses import chunked_token_logprobs, sft_loss, token_logprobs

    model = _model()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, TOKENS, HIDDEN, generator=g).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (rows, TOKENS), generator=g)
    labels[:, : TOKENS // 2] = -100  # the prompt half is context only
    before = _rss()
    if chunked:
        logp, mask = chunked_token_logprobs(hidden, model.lm_head, labels, 1024)
    else:
        logp, mask = token_logprobs(model.lm_head(hidden), labels)
    sft_loss(logp, mask).sum().backward()
    return {"rows": rows, "chunked": chunked, "peak_rss_growth_mib": round((_peak() - before) / 2**20, 1)}


def slot_sizes() -> list[dict[str, Any]]:
    from personalize.lora.slots import SlotPool
    from personalize.model import default_llama_config

    out = []
    for name, shape in REAL_SHAPES.items():
        config = default_llama_config(vocab_size=VOCAB, **shape)
        for label, modules in (("q_proj+v_proj", ("q_proj", "v_proj")), ("all 7", None)):
            kwargs = {} if modules is None else {"target_modules": modules}
            pool = SlotPool(config, num_slots=1, r_max=16, dtype=torch.bfloat16, device="meta", **kwargs)
            out.append(
                {
                    "shape": name,
                    "modules": label,
                    "rank": 16,
                    "dtype": "bfloat16",
                    "bytes_per_slot": pool.slot_nbytes,
                    "slots_per_gib": GIB // pool.slot_nbytes,
                }
            )
    return out


def _child(what: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", what, *args], check=True, capture_output=True, text=True
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--events", type=int, default=256, help="events in the measured round")
    parser.add_argument("--answer-tokens", type=int, default=32, help="answer tokens per event (with EOS)")
    parser.add_argument("--loss-rows", type=int, default=8, help="rows of the full-vs-chunked loss measurement")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what, *rest = args.child
        if what == "round":
            result = measure_round(int(rest[0]), int(rest[1]))
        else:
            result = measure_loss(int(rest[0]), rest[1] == "1")
        print(json.dumps(result))
        return
    torch.set_num_threads(2)
    full = _child("loss", str(args.loss_rows), "0")
    chunked = _child("loss", str(args.loss_rows), "1")
    per_logit = full["peak_rss_growth_mib"] * 2**20 / (args.loss_rows * TOKENS * VOCAB)
    report = {
        "machine": "2-core CPU VM (shared), torch CPU float32",
        "round_chunked": _child("round", str(args.events), str(args.answer_tokens)),
        "loss_full_vs_chunked": [full, chunked],
        "round_full_estimated_gib": round(per_logit * args.events * TOKENS * VOCAB / GIB, 1),
        "round_full_estimate_note": "not run: measured bytes per logit of the full loss x events x tokens x vocab",
        "slots": slot_sizes(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for key, value in report.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
