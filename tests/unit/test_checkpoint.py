"""Base-model checkpoints: found locally or in the HF cache, sharded, in any dtype, with a cached,
dtype-independent fingerprint and every EOS id of generation_config.json."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from personalize.checkpoint import FINGERPRINT_FILE, checkpoint_fingerprint, read_config
from personalize.engine.engine import Engine, EngineConfig
from personalize.engine.types import SamplingParams
from personalize.errors import InvalidArgument
from personalize.model import ModelConfig, load_base_model
from tests.tiny_models import save_tiny


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 saved in several safetensors shards."""
    directory = tmp_path_factory.mktemp("sharded")
    save_tiny("qwen2", directory, max_shard_size="100KB")
    return directory


def test_sharded_checkpoint_loads_in_the_target_dtype(sharded: Path) -> None:
    assert len(list(sharded.glob("*.safetensors"))) > 1
    base = load_base_model(ModelConfig(path=str(sharded), dtype="bfloat16"))
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}
    assert base.model.config.model_type == "qwen2"


def test_fingerprint_is_independent_of_the_serving_dtype(sharded: Path) -> None:
    fp32 = load_base_model(ModelConfig(path=str(sharded))).fingerprint
    assert load_base_model(ModelConfig(path=str(sharded), dtype="float16")).fingerprint == fp32
    assert load_base_model(ModelConfig(dtype="bfloat16")).fingerprint == load_base_model(ModelConfig()).fingerprint


def test_fingerprint_is_cached_beside_the_checkpoint_until_a_file_changes(tmp_path: Path, sharded: Path) -> None:
    directory = Path(shutil.copytree(sharded, tmp_path / "model"))
    (directory / FINGERPRINT_FILE).unlink(missing_ok=True)
    config = read_config(directory)
    first = checkpoint_fingerprint(directory, config)
    cache = directory / FINGERPRINT_FILE
    stored = json.loads(cache.read_text())
    cache.write_text(json.dumps({**stored, "fingerprint": "sha256:cached"}))
    assert checkpoint_fingerprint(directory, config) == "sha256:cached"  # no file was hashed again
    shard = sorted(directory.glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000))
    assert checkpoint_fingerprint(directory, config) == first  # a touched file: hashed again


def test_repo_id_resolves_from_the_local_hf_cache(
    tmp_path: Path, sharded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-qwen"
    commit = "0" * 40
    shutil.copytree(sharded, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    base = load_base_model(ModelConfig(path="acme/tiny-qwen"))
    assert base.model.config.model_type == "qwen2"
    with pytest.raises(InvalidArgument, match=f"acme/missing.*{cache}"):
        load_base_model(ModelConfig(path="acme/missing"))


def test_missing_directory_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=str(tmp_path / "nope")):
        load_base_model(ModelConfig(path=str(tmp_path / "nope")))


def test_every_eos_id_of_generation_config_stops_generation(tmp_path: Path) -> None:
    directory = save_tiny("llama", tmp_path / "m")
    base = load_base_model(ModelConfig(path=str(directory)))
    for prompt in ("Hello there", "héllo wörld", "personalize me", "日本語"):
        ids = torch.tensor([base.tokenizer.encode(prompt, add_special_tokens=False)])
        out = base.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, ids.shape[1] :].tolist()
        # the first token after two that is new and neither token before it is the tokenizer's EOS (2)
        k = next((i for i in range(2, len(out)) if out[i] not in out[:i] and 2 not in out[: i + 1]), None)
        if k is not None:
            break
    assert k is not None
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, out[k]]}))
    base = load_base_model(ModelConfig(path=str(directory)))
    assert base.eos_ids == {2, out[k]}
    engine = Engine(base, EngineConfig(max_batch=1, max_len=64))
    handle = engine.submit(prompt, SamplingParams(max_new_tokens=12))
    engine.run_until_idle()
    result = handle.result()
    assert (result.finish_reason, result.completion_tokens) == ("eos", k + 1)
