"""The shared base model: a Hugging Face causal-LM checkpoint (local directory or cached repo id), or the
built-in tiny default.

The default is a Llama-architecture model built from a fixed config and seed with a byte-level tokenizer,
so it needs no download and is bit-identical in every process on every machine (same torch build).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from personalize.checkpoint import checkpoint_fingerprint, eos_ids, read_config, resolve
from personalize.engine.llama import read_family
from personalize.engine.text import BUILTIN_CHAT_TEMPLATE
from personalize.errors import InvalidArgument

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
"""config.json `model_type`s the fused engine forward implements (engine/llama.py)."""
DEFAULT_SEED = 1234
DEFAULT_EMBED_STD = 1.0
DEFAULT_HEAD_STD = 0.1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and where it runs."""

    path: str = ""
    """Hugging Face checkpoint: a local directory, or a repo id in the local HF cache (offline); empty =
    the built-in tiny default model."""
    dtype: str = "float32"
    """Weight dtype: float32, bfloat16 or float16."""
    device: str = "cpu"
    """torch device: cpu, cuda, cuda:1, ..."""
    seed: int = DEFAULT_SEED
    """Seed of the built-in default model's weights (every node must use the same one)."""
    threads: int = 0
    """torch intra-op threads of this process; 0 = torch's default (one per core). Several processes on
    one machine must share its cores: oversubscribed, their threads spin against each other."""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise InvalidArgument(f"model dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.threads < 0:
            raise InvalidArgument(f"model threads must be >= 0 (0 = torch's default), got {self.threads}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def default_llama_config(**overrides: Any) -> LlamaConfig:
    """The tiny default: byte vocabulary, 4 layers, hidden 128, GQA (4 heads over 2 KV heads)."""
    fields: dict[str, Any] = dict(
        vocab_size=384,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.05,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_random_llama(
    config: LlamaConfig,
    seed: int,
    dtype: torch.dtype = torch.float32,
    embed_std: float | None = None,
    head_std: float | None = None,
) -> LlamaForCausalLM:
    """A Llama with weights drawn from a fixed seed on the CPU (deterministic for one torch build).

    Layer weights use config.initializer_range; embeddings and the LM head may use their own scale.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    std = config.initializer_range
    special = {"model.embed_tokens.weight": embed_std or std, "lm_head.weight": head_std or std}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * special.get(name, std))
    return model.to(dtype).eval()  # type: ignore[arg-type]


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer and fingerprint."""

    model: PreTrainedModel
    """The transformers causal-LM module (eval mode, no grad)."""
    tokenizer: PreTrainedTokenizerBase
    fingerprint: str
    """sha256 over config and stored weights (not the serving dtype): adapters record it and serving
    refuses a mismatch."""
    name: str
    eos_ids: frozenset[int] = frozenset()
    """Every token id that ends generation (generation_config.json's list, config's, the tokenizer's)."""

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def fingerprint(model: torch.nn.Module) -> str:
    """Identity of an in-memory base model: a hash of its architecture fields and every weight's bytes (a
    checkpoint on disk uses `checkpoint.checkpoint_fingerprint` instead, computed once and cached)."""
    digest = hashlib.sha256()
    cfg = model.config.to_dict()  # type: ignore[union-attr,operator]
    keep = {
        k: cfg.get(k)
        for k in sorted(cfg)
        if k not in ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures", "use_cache")
    }
    digest.update(json.dumps(keep, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


def _check_supported(config: dict[str, Any], path: Path) -> None:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgument(
            f"model type {model_type!r} of {path} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _load_checkpoint(config: ModelConfig) -> BaseModel:
    """A checkpoint straight into the target dtype and device (no float32 copy), after its config.json
    has been checked, with its cached fingerprint and every EOS id."""
    path = resolve(config.path)
    hf_config = read_config(path)
    _check_supported(hf_config, path)
    read_family(AutoConfig.from_pretrained(path, local_files_only=True))  # refuse what the forward lacks
    digest = checkpoint_fingerprint(path, hf_config)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=config.torch_dtype, local_files_only=True, device_map=torch.device(config.device)
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model.eval().requires_grad_(False)
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        fingerprint=digest,
        name=config.path,
        eos_ids=eos_ids(path, hf_config, tokenizer.eos_token_id),
    )


def load_base_model(config: ModelConfig) -> BaseModel:
    """Load the configured base model onto its device, with its tokenizer and fingerprint (and set this
    process's torch threads when `config.threads` asks for a number)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.path:
        return _load_checkpoint(config)
    # Token identity dominates the residual stream (embeddings >> layer outputs), as in trained models:
    # a random model built this way can be personalized from a handful of examples. Fingerprinted in
    # float32, before the cast, so every serving dtype gives the same identity.
    model = build_random_llama(
        default_llama_config(), config.seed, torch.float32, embed_std=DEFAULT_EMBED_STD, head_std=DEFAULT_HEAD_STD
    )
    model.eval().requires_grad_(False)
    digest = fingerprint(model)
    model.to(device=config.device, dtype=config.torch_dtype)  # type: ignore[arg-type,call-arg]
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = BUILTIN_CHAT_TEMPLATE
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        fingerprint=digest,
        name=f"personalize-tiny-llama(seed={config.seed})",
        eos_ids=frozenset({tokenizer.eos_token_id}),
    )
