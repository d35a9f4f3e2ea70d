"""`make bench-gpu`'s shapes are the real checkpoints' sizes, the target runs loadtest/bench_gpu.py on CUDA in
bfloat16, and its rows replace only the marked block of docs/benchmarks.md."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from loadtest.bench_gpu import BEGIN, END, SHAPES, main, render, replace_block
from personalize.model import default_llama_config

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED_PARAMETERS = {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248}
"""The parameter counts of meta-llama/Llama-3.2-1B and Llama-3.1-8B (their model cards' safetensors totals)."""


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_each_shape_has_its_checkpoints_parameter_count(name: str) -> None:
    config = default_llama_config(**SHAPES[name])
    with torch.device("meta"):  # no memory: only the shapes
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]
    assert config.head_dim == {"llama-3.2-1b": 64, "llama-3.1-8b": 128}[name]


def test_make_bench_gpu_runs_the_gpu_benchmark_into_the_docs() -> None:
    dry = subprocess.run(["make", "-n", "bench-gpu"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(line for line in dry.splitlines() if "bench_gpu.py" in line)
    assert "--doc docs/benchmarks.md" in line and "--json-dir loadtest/results" in line
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    assert doc.count(BEGIN) == 1 and doc.count(END) == 1 and doc.index(BEGIN) < doc.index(END)


def _result(base: float, distinct: float) -> dict[str, object]:
    ratios = {
        "distinct_vs_base": distinct / base,
        "distinct_vs_single": 0.99,
        "distinct_vs_peft_mixed": 3.0,
        "distinct_vs_peft_loop_mixed": 2.0,
        "distinct_vs_peft_sequential": 9.0,
    }
    config = {"dtype": "bfloat16", "batch": 32, "prompt_tokens": 64, "new_tokens": 32, "rank": 8, "repeats": 3}
    return {"tokens_per_s": {"base": base, "distinct_adapters": distinct}, "ratios": ratios, "config": config}


def test_rows_replace_only_the_marked_block_and_a_rerun_replaces_them_again() -> None:
    doc = f"# Title\nbefore\n{BEGIN}\nNo GPU rows yet.\n{END}\nafter\n"
    first = replace_block(doc, render({"llama-3.2-1b": _result(4000.0, 3800.0)}, "NVIDIA H200", "2026-12-03"))
    assert first.startswith("# Title\nbefore\n") and first.endswith(f"{END}\nafter\n")
    assert "No GPU rows yet" not in first
    row = next(line for line in first.splitlines() if line.startswith("| llama-3.2-1b"))
    assert row == "| llama-3.2-1b | bfloat16 | 4,000 | 3,800 | 0.95 | 0.99 | 3.00 | 2.00 | 9.00 |"
    assert "on NVIDIA H200 (batch 32, 64 prompt + 32 new tokens, rank 8" in first
    second = replace_block(first, render({"llama-3.1-8b": _result(900.0, 450.0)}, "NVIDIA H200", "2026-12-04"))
    assert "| llama-3.2-1b" not in second and "| llama-3.1-8b | bfloat16 | 900 | 450 | 0.50 |" in second
    with pytest.raises(ValueError, match="bench-gpu"):
        replace_block("no markers here", "rows")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_it_refuses_before_building_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json-dir", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_a_doc_without_markers_is_refused_before_any_benchmark_runs(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# no markers\n")
    with pytest.raises(ValueError, match="bench-gpu"):  # on the CPU: it would otherwise build an 8B model
        main(["--device", "cpu", "--doc", str(doc), "--json-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and doc.read_text() == "# no markers\n"
