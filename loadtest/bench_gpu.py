"""The engine benchmark (bench_engine.py) at the shapes of real checkpoints, random weights, bfloat16 on CUDA:
`make bench-gpu`. Each shape's JSON goes to `--json-dir` (bench_gpu_<shape>.json) and, with `--doc`, the
rows go into docs/benchmarks.md between its `bench-gpu` markers, with the device and the date.

    python loadtest/bench_gpu.py [--shapes llama-3.2-1b,llama-3.1-8b] [--quick] [--json-dir DIR] [--doc FILE]

The shapes are the published configs' sizes (hidden, layers, heads, KV heads, MLP, vocabulary, tied
embeddings, rope theta); rope scaling is left out: it changes the rotary frequencies, not the work per token.
Without CUDA it refuses (exit 2) unless `--device cpu` is given (a smoke pass, far too slow at these shapes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_LLAMA3 = dict(
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=131072,
)
"""What the Llama 3 checkpoints share."""
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        _LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, tie_word_embeddings=True
    ),
    "llama-3.1-8b": dict(
        _LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False
    ),
}
"""bench_engine.py --shape overrides giving each checkpoint's parameter count (tests/unit/test_bench_gpu.py)."""
BEGIN, END = "<!-- bench-gpu:begin -->", "<!-- bench-gpu:end -->"
"""Where in the doc the rows go (everything between is replaced)."""
COLUMNS = (
    ("base tok/s", lambda r: f"{r['tokens_per_s']['base']:,.0f}"),
    ("32 distinct adapters tok/s", lambda r: f"{r['tokens_per_s']['distinct_adapters']:,.0f}"),
    ("distinct / base", lambda r: f"{r['ratios']['distinct_vs_base']:.2f}"),
    ("distinct / single adapter", lambda r: f"{r['ratios']['distinct_vs_single']:.2f}"),
    ("distinct / PEFT mixed batch (generate)", lambda r: f"{r['ratios']['distinct_vs_peft_mixed']:.2f}"),
    ("distinct / PEFT forward loop, mixed", lambda r: f"{r['ratios']['distinct_vs_peft_loop_mixed']:.2f}"),
    ("distinct / PEFT one adapter at a time", lambda r: f"{r['ratios']['distinct_vs_peft_sequential']:.2f}"),
)


def run_shape(
    shape: Mapping[str, Any], json_path: Path, device: str, dtype: str, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """bench_engine.py at `shape` in its own process (each shape's memory is freed with it); its result."""
    command = [sys.executable, str(ROOT / "loadtest" / "bench_engine.py"), "--device", device, "--dtype", dtype]
    command += ["--shape", json.dumps(dict(shape)), "--json", str(json_path), *extra]
    subprocess.run(command, check=True, cwd=ROOT)
    return dict(json.loads(json_path.read_text()))


def device_name(device: str) -> str:
    """The accelerator's name (or the CPU's) for the rows."""
    import torch

    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(torch.device(device)))
    return platform.processor() or platform.machine()


def render(results: Mapping[str, Mapping[str, Any]], machine: str, day: str) -> str:
    """The markdown table of one run: a row per shape."""
    head = ["shape", "dtype", *(name for name, _ in COLUMNS)]
    c = next(iter(results.values()))["config"]
    sizes = f"batch {c['batch']}, {c['prompt_tokens']} prompt + {c['new_tokens']} new tokens, rank {c['rank']}"
    lines = [
        f"`make bench-gpu`, {day}, on {machine} ({sizes}, random weights, {c['repeats']} repeats):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, result in results.items():
        cells = [name, str(result["config"]["dtype"]), *(cell(result) for _, cell in COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(doc: str, block: str) -> str:
    """`doc` with what lies between the bench-gpu markers replaced by `block`. Raises ValueError without them."""
    start, end = doc.find(BEGIN), doc.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the doc has no {BEGIN} ... {END} block for the rows")
    return doc[: start + len(BEGIN)] + "\n" + block + "\n" + doc[end:]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--quick", action="store_true", help="one repetition (bench_engine.py --quick)")
    ap.add_argument("--json-dir", type=Path, default=ROOT / "loadtest" / "results")
    ap.add_argument("--doc", type=Path, default=None, help="write the rows into this markdown file")
    args = ap.parse_args(argv)
    names = [n for n in args.shapes.split(",") if n]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; known: {sorted(SHAPES)}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench-gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine")
        return 2
    if args.doc:
        replace_block(args.doc.read_text(), "")  # no markers: refused now, not after the GPU time
    args.json_dir.mkdir(parents=True, exist_ok=True)
    extra = ["--quick"] if args.quick else []
    results = {
        name: run_shape(SHAPES[name], args.json_dir / f"bench_gpu_{name}.json", args.device, args.dtype, extra)
        for name in names
    }
    table = render(results, device_name(args.device), datetime.date.today().isoformat())
    print(table)
    if args.doc:
        args.doc.write_text(replace_block(args.doc.read_text(), table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
