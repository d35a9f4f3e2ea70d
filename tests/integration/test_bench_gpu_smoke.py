"""bench_gpu.py's pipeline end to end on the CPU at a scaled-down shape that keeps what the real shapes bring
(a 128k vocabulary, tied embeddings, grouped KV heads): bench_engine.py runs in its own process, every mode
generates, and its JSON renders into rows. A GPU run then fails only for GPU reasons."""

from __future__ import annotations

from pathlib import Path

from loadtest.bench_gpu import SHAPES, render, run_shape

SMALL = {
    **SHAPES["llama-3.2-1b"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
"""Llama-3.2-1B's vocabulary, tied embeddings and rope theta at a width the CPU runs in seconds."""


def test_the_gpu_benchmark_runs_a_real_vocabulary_and_renders_its_rows(tmp_path: Path) -> None:
    extra = ["--quick", "--batch", "4", "--prompt-tokens", "8", "--new-tokens", "4"]
    result = run_shape(SMALL, tmp_path / "small.json", "cpu", "float32", extra)
    assert result["config"]["vocab_size"] == 128256 and result["config"]["tie_word_embeddings"] is True
    assert all(v > 0 for v in result["tokens_per_s"].values()), result["tokens_per_s"]
    table = render({"small": result}, "cpu", "2026-12-03")
    (row,) = [line for line in table.splitlines() if line.startswith("| small |")]
    assert row.count("|") == 10 and "float32" in row
