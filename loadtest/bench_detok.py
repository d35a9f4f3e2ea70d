"""Incremental detokenizer: work per generated token from 16 to 2,048 tokens (should stay flat).

Streams n ids through `TextStream`, one token at a time, for a byte-level BPE and a SentencePiece-style
(byte fallback) tokenizer trained on the spot. The ids repeat one 16-token block of multilingual text, so
every length has the same content mix and only the length differs. Lengths are interleaved within each
repeat and the fastest repeat is kept (the least disturbed by other processes); reported: microseconds
per token and its ratio to the 16-token figure, with a full re-decode per token (what a naive
detokenizer does) beside it for contrast. Run:
    python loadtest/bench_detok.py [--quick] [--json loadtest/results/bench_detok.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personalize.engine.text import TextStream
from tests.tiny_models import CORPUS, train_tokenizer

LENGTHS = (16, 64, 256, 1024, 2048)


def _windowed(tokenizer: Any, ids: list[int]) -> None:
    stream = TextStream(tokenizer, ())
    for i in ids:
        stream.push(i)
    stream.flush()


def _redecode(tokenizer: Any, ids: list[int]) -> None:
    for n in range(1, len(ids) + 1):
        tokenizer.decode(ids[:n], skip_special_tokens=True)


def us_per_token(fn: Any, tokenizer: Any, ids: list[int], budget_s: float) -> float:
    """Time per token of one run that loops `fn` over `ids` until `budget_s` has passed."""
    loops, start = 0, time.perf_counter()
    while loops == 0 or time.perf_counter() - start < budget_s:
        fn(tokenizer, ids)
        loops += 1
    return (time.perf_counter() - start) / (loops * len(ids)) * 1e6


def run(quick: bool) -> list[dict[str, Any]]:
    rows = []
    repeats, budget = (3, 0.05) if quick else (15, 0.05)
    for kind in ("byte_level", "sentencepiece"):
        tokenizer = train_tokenizer(kind)
        block = tokenizer.encode(" ".join(CORPUS[1:3]), add_special_tokens=False)[: LENGTHS[0]]
        samples: dict[int, list[float]] = {n: [] for n in LENGTHS}
        for _ in range(repeats):
            for n in LENGTHS:
                samples[n].append(us_per_token(_windowed, tokenizer, block * (n // len(block)), budget))
        base = min(samples[LENGTHS[0]])
        for n in LENGTHS:
            ids = block * (n // len(block))
            redecode = us_per_token(_redecode, tokenizer, ids, budget) if n <= 1024 or not quick else None
            rows.append(
                {
                    "tokenizer": kind,
                    "tokens": n,
                    "us_per_token": round(min(samples[n]), 2),
                    "ratio_to_16": round(min(samples[n]) / base, 3),
                    "redecode_us_per_token": None if redecode is None else round(redecode, 2),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter repeats")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    rows = run(args.quick)
    print(f"{'tokenizer':<14} {'tokens':>6} {'us/token':>9} {'ratio':>6} {'re-decode us/token':>19}")
    for r in rows:
        redecode = "-" if r["redecode_us_per_token"] is None else f"{r['redecode_us_per_token']:.1f}"
        print(
            f"{r['tokenizer']:<14} {r['tokens']:>6} {r['us_per_token']:>9.1f} {r['ratio_to_16']:>6.2f} {redecode:>19}"
        )
    flat = all(0.8 <= r["ratio_to_16"] <= 1.2 for r in rows)
    print(f"work per token flat within ±20% from {LENGTHS[0]} to {LENGTHS[-1]} tokens: {'yes' if flat else 'NO'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "flat_within_20pct": flat}, indent=2))


if __name__ == "__main__":
    main()
