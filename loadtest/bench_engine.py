"""Batched multi-LoRA engine vs the base model and PEFT, on a Llama-shaped bench model.

Every mode generates the same 32 prompts (64 tokens each, 32 new tokens, greedy); modes are interleaved
and repeated, and the median tokens/s of each is reported. Run: python loadtest/bench_engine.py [--quick]

What each ratio compares: distinct_vs_peft_{mixed,sequential} mix two things (our fused decode loop vs
HF `generate`, and multi-LoRA batching); distinct_vs_ours_sequential is batching alone (our loop, the
same requests one at a time); distinct_vs_peft_loop_{mixed,sequential} put PEFT's forward in a bare
decode loop with no `generate` overhead (mixed-adapter batch, or one adapter at a time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personalize.engine.engine import Engine, EngineConfig
from personalize.engine.types import SamplingParams
from personalize.lora.slots import SlotPool, module_shapes
from personalize.model import BaseModel, build_random_llama, default_llama_config, fingerprint
from tests.helpers import make_adapter, peft_model

BENCH_SHAPE = dict(  # overrides of personalize.model.default_llama_config; bench_cache.py uses the same
    hidden_size=2048,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=16,
    intermediate_size=5632,
    initializer_range=0.02,
)


def build_bench_model(shape: dict[str, Any], dtype: torch.dtype, device: str) -> BaseModel:
    from transformers import ByT5Tokenizer

    model = build_random_llama(default_llama_config(**shape), seed=7, dtype=dtype).to(device)
    model.generation_config.eos_token_id = None
    return BaseModel(model=model, tokenizer=ByT5Tokenizer(), fingerprint=fingerprint(model), name="bench-llama")


def run_engine(engine: Engine, prompts: list[list[int]], slots: list[int | None], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    handles = [engine.submit(p, params, slot=s) for p, s in zip(prompts, slots, strict=True)]
    engine.run_until_idle()
    elapsed = time.perf_counter() - start
    assert all(h.result().completion_tokens == new_tokens for h in handles)
    return len(prompts) * new_tokens / elapsed


def run_peft_mixed(model: Any, prompts: torch.Tensor, names: list[str], new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            adapter_names=names,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompts.shape[1] + new_tokens
    return prompts.shape[0] * new_tokens / elapsed


def run_peft_sequential(model: Any, prompts: torch.Tensor, names: list[str], new_tokens: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for row, name in zip(prompts, names, strict=True):
            model.set_adapter(name)
            ids = row.unsqueeze(0)
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
    return len(names) * new_tokens / (time.perf_counter() - start)


def run_engine_sequential(engine: Engine, prompts: list[list[int]], slots: list[int | None], new_tokens: int) -> float:
    """Our decode loop without batching across adapters: each request alone, one after the other."""
    start = time.perf_counter()
    for prompt, slot in zip(prompts, slots, strict=True):
        handle = engine.submit(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), slot=slot)
        engine.run_until_idle()
        assert handle.result().completion_tokens == new_tokens
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def run_peft_loop(model: Any, prompts: torch.Tensor, names: list[str], new_tokens: int, mixed: bool) -> float:
    """PEFT's forward inside a bare greedy decode loop (prefill, then one token per step on the KV cache; no
    `generate` machinery): all rows in one mixed-adapter batch (`mixed`), or each row with its adapter
    set, one after the other."""
    groups = [(prompts, names)] if mixed else [(prompts[i : i + 1], [names[i]]) for i in range(len(names))]
    start = time.perf_counter()
    with torch.inference_mode():
        for ids, group in groups:
            kwargs: dict[str, Any] = {"adapter_names": group} if mixed else {}
            if not mixed:
                model.set_adapter(group[0])
            out = model(input_ids=ids, use_cache=True, **kwargs)
            for _ in range(new_tokens - 1):
                token = out.logits[:, -1].argmax(-1, keepdim=True)
                out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True, **kwargs)
    return prompts.shape[0] * new_tokens / (time.perf_counter() - start)


def build_peft(base: BaseModel, adapters: list[Any]) -> Any:
    from peft import LoraConfig

    model = peft_model(base.model, adapters[0])  # a deep copy of the base with adapter "default"
    inner = model.base_model.model
    for i, adapter in enumerate(adapters[1:], start=1):
        cfg = LoraConfig(
            r=adapter.rank,
            lora_alpha=adapter.alpha,
            target_modules=list(adapter.target_modules),
            lora_dropout=0.0,
            init_lora_weights=False,
        )
        model.add_adapter(f"a{i}", cfg)
        with torch.no_grad():
            for key, (a, b) in adapter.weights.items():
                module = inner.get_submodule(key)
                module.lora_A[f"a{i}"].weight.copy_(a)
                module.lora_B[f"a{i}"].weight.copy_(b)
    return model.eval()


def lora_bytes_ratio(cfg: Any, rank: int, batch: int) -> float:
    """Adapter bytes read per decode step with every row distinct / base weight bytes per step."""
    shapes = module_shapes(cfg)
    lora = sum(rank * (d_out + d_in) for d_out, d_in in shapes.values()) * batch
    base = sum(d_out * d_in for d_out, d_in in shapes.values())
    return lora / base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one repetition, PEFT-sequential on 8 of the requests")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shape", default="", help="JSON overrides of the bench model config (e.g. larger on a GPU)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    shape = {**BENCH_SHAPE, **(json.loads(args.shape) if args.shape else {})}
    dtype = getattr(torch, args.dtype)
    base = build_bench_model(shape, dtype, args.device)
    cfg = base.config
    adapters = [make_adapter(cfg, args.rank, seed=i, std=0.02) for i in range(args.batch)]
    pool = SlotPool(cfg, num_slots=args.batch, r_max=args.rank, dtype=dtype, device=args.device)
    for slot, adapter in enumerate(adapters):
        pool.set_slot(slot, adapter)
    g = torch.Generator().manual_seed(0)
    prompt_t = torch.randint(3, 259, (args.batch, args.prompt_tokens), generator=g)
    prompts = prompt_t.tolist()
    sizes = dict(
        max_batch=args.batch,
        max_len=args.prompt_tokens + args.new_tokens + 1,
        max_prefill_tokens=args.batch * args.prompt_tokens,
    )
    engine = Engine(base, EngineConfig(**sizes), pool)
    base_engine = Engine(base, EngineConfig(**sizes), None)  # the same sizes, no adapter slots
    peft = build_peft(
        base,
        [
            a.__class__(a.rank, a.alpha, {k: (x.to(dtype), y.to(dtype)) for k, (x, y) in a.weights.items()})
            for a in adapters
        ],
    ).to(args.device)
    names = ["default"] + [f"a{i}" for i in range(1, args.batch)]
    seq_n = min(8, args.batch) if args.quick else args.batch
    n, dev = args.new_tokens, args.device
    modes = {
        "base": lambda: run_engine(base_engine, prompts, [None] * args.batch, n),
        "single_adapter": lambda: run_engine(engine, prompts, [0] * args.batch, n),
        "distinct_adapters": lambda: run_engine(engine, prompts, list(range(args.batch)), n),
        "peft_mixed": lambda: run_peft_mixed(peft, prompt_t.to(dev), names, n),
        "peft_sequential": lambda: run_peft_sequential(peft, prompt_t[:seq_n].to(dev), names[:seq_n], n),
        "ours_sequential": lambda: run_engine_sequential(engine, prompts[:seq_n], list(range(seq_n)), n),
        "peft_loop_mixed": lambda: run_peft_loop(peft, prompt_t.to(dev), names, n, mixed=True),
        "peft_loop_sequential": lambda: run_peft_loop(peft, prompt_t[:seq_n].to(dev), names[:seq_n], n, mixed=False),
    }
    run_engine(engine, prompts[:2], [0, 1], 2)  # warm-up: first calls pay for allocation and thread start
    run_engine(base_engine, prompts[:2], [None, None], 2)
    run_peft_mixed(peft, prompt_t[:2].to(dev), names[:2], 2)
    samples: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(repeats):
        for mode, fn in modes.items():
            samples[mode].append(fn())
            print(f"rep {rep} {mode:18s} {samples[mode][-1]:9.1f} tok/s", flush=True)
    tps = {m: statistics.median(v) for m, v in samples.items()}
    d = tps["distinct_adapters"]
    result = {
        "tokens_per_s": tps,
        "ratios": {
            "distinct_vs_single": d / tps["single_adapter"],
            "distinct_vs_base": d / tps["base"],
            "distinct_vs_peft_mixed": d / tps["peft_mixed"],
            "distinct_vs_peft_sequential": d / tps["peft_sequential"],
            "distinct_vs_ours_sequential": d / tps["ours_sequential"],
            "distinct_vs_peft_loop_mixed": d / tps["peft_loop_mixed"],
            "distinct_vs_peft_loop_sequential": d / tps["peft_loop_sequential"],
        },
        "config": {
            **shape,
            "dtype": args.dtype,
            "device": args.device,
            "batch": args.batch,
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": n,
            "rank": args.rank,
            "repeats": repeats,
            "peft_sequential_requests": seq_n,
            "threads": torch.get_num_threads(),
            "lora_bytes_per_step_vs_base": lora_bytes_ratio(cfg, args.rank, args.batch),
            "samples": samples,
        },
    }
    print(f"\n{'mode':20s} {'tokens/s':>10s}")
    for m, v in tps.items():
        print(f"{m:20s} {v:10.1f}")
    for k, v in result["ratios"].items():
        print(f"{k:30s} {v:6.2f}")
    print(f"lora_bytes_per_step_vs_base      {result['config']['lora_bytes_per_step_vs_base']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
