"""Tiny random-weight models of every supported family, saved as Hugging Face directories with a BPE
tokenizer trained on the spot (no download), for end-to-end checks against transformers and PEFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CORPUS = [
    "Hello there, the quick brown fox jumps over the lazy dog.",
    "héllo wörld, ça va? naïve café — déjà vu ✓",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "personalize me: adapters, ranks, slots and versions 0123456789",
    "emoji 🙂🚀 and math ∑∫√ symbols",
]
VOCAB = 320
_SHAPE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=2,
    bos_token_id=None,
    pad_token_id=0,
)


CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""A ChatML chat template (Qwen's shape) for tiny models that need one."""


def _rope(rope_type: str, **extra: Any) -> dict[str, Any]:
    return {"rope_type": rope_type, "rope_theta": 10000.0, **extra}


FAMILIES: dict[str, Any] = {
    "llama": lambda: LlamaConfig(**_SHAPE),
    "llama3-rope": lambda: LlamaConfig(
        **_SHAPE,
        rope_parameters=_rope(
            "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
        ),
    ),
    "yarn-rope": lambda: LlamaConfig(
        **_SHAPE, rope_parameters=_rope("yarn", factor=16.0, original_max_position_embeddings=16)
    ),
    "mistral": lambda: MistralConfig(**_SHAPE, sliding_window=7),
    "qwen2": lambda: Qwen2Config(**_SHAPE, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**_SHAPE, head_dim=24, tie_word_embeddings=True),
    "gemma2": lambda: Gemma2Config(
        **_SHAPE,
        head_dim=16,
        sliding_window=7,
        query_pre_attn_scalar=12,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
    "gemma3": lambda: Gemma3TextConfig(
        **_SHAPE,
        head_dim=16,
        sliding_window=7,
        query_pre_attn_scalar=12,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": _rope("linear", factor=2.0), "sliding_attention": _rope("default")},
    ),
}
"""name -> a tiny config of that family; each exercises what the family adds (rope scaling, sliding
windows, qkv bias, tied embeddings, q/k norms, sandwich norms, per-layer rope)."""


def train_tokenizer(kind: str = "byte_level") -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on CORPUS: byte-level (GPT-2/Llama 3 style) or SentencePiece-style
    (metaspace pre-tokenizer with byte fallback, Llama 2/Mistral style)."""
    special = ["<pad>", "<unk>", "</s>"]
    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        bytes_tokens = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=VOCAB + 256, special_tokens=special + bytes_tokens)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Every weight random (biases and norms too, so they matter): norms around their init value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if "norm" in name:
                param.add_(noise * 0.1)
            else:
                param.copy_(noise * std)


def save_tiny(
    family: str, directory: Path, seed: int = 7, max_shard_size: str = "5GB", chat_template: str | None = None
) -> Path:
    """Write a random tiny model of `family` with its tokenizer (with `chat_template`, if given; none by
    default) into `directory` (in shards of at most `max_shard_size`); returns it."""
    config = FAMILIES[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    randomize(model, seed)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    tokenizer = train_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(directory)
    return directory
